"""The routing plugin (issue 16): rules send on to DCMTK storescp destinations through the job queue.

The destinations are down when the instances arrive, the server is killed (SIGKILL) with the
jobs waiting to retry and started again, then the destinations come up: every routed instance
arrives at each of them, exactly once (storescp keeps a repeat as a file of its own), and the
rule's conditions keep the others home. A rule on stable studies sends a whole study as
another transfer syntax.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pydicom
from pydicom.uid import RLELossless, generate_uid

from macpacs.pacs_server.plugins.routing import load_rules
from tests.conftest import run_tool
from tests.synthetic import write_series

from .jobs_helpers import Storescp, add_node, job_counts, jobs, wait_until

CONFIG = """
[storage]
stable_after = 1.0

[jobs]
retry_base_s = 0.3
retry_max_s = 1.0

[plugins]
enable = ["routing"]

[[plugins.routing.rules]]
name = "CT from the scanner"
on = "stored"
to = ["DEST1", "DEST2"]
modality = ["CT"]
calling_ae = ["CT_SCANNER"]

[[plugins.routing.rules]]
name = "brains, compressed"
on = "stable"
to = ["DEST3"]
tags = { StudyDescription = "*BRAIN*", "0008,0090" = "WELBY^*" }
transfer_syntax = "1.2.840.10008.1.2.5"
"""


def _store(server, files: list[Path], calling_ae: str) -> None:
    run_tool("storescu", "-aet", calling_ae, *server.dicom_args(), *map(str, files))


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def test_routed_instances_arrive_once_after_outages_and_a_restart(make_server, tmp_path: Path) -> None:
    config = tmp_path / "macpacs.toml"
    config.write_text(CONFIG)
    server = make_server(extra_args=["--config", str(config)])
    dest1, dest2, dest3 = (Storescp(tmp_path / name.lower(), name) for name in ("DEST1", "DEST2", "DEST3"))
    for dest in (dest1, dest2, dest3):
        add_node(server, dest.ae_title, dest.port)
    study = generate_uid()
    ct = write_series(tmp_path / "ct", 12, size=16, study_uid=study, study_description="CT CHEST")
    mr = write_series(tmp_path / "mr", 3, size=16, study_uid=study, modality="MR", study_description="CT CHEST")
    other_ae = write_series(tmp_path / "other", 2, size=16, study_description="CT CHEST")
    _store(server, ct + mr, "CT_SCANNER")
    _store(server, other_ae, "ELSEWHERE")  # CT, but not from the scanner the rule names

    # Both destinations are down: each routed instance is a job per destination, retried.
    wait_until(
        "every routed instance to have failed at least once",
        lambda: (found := _waiting(server)) and len(found) == 2 * len(ct) and all(j["attempts"] >= 1 for j in found),
        every=0.3,
    )
    assert server.logged("send job(s) failed (job ")
    server.stop(signal.SIGKILL)
    server.start()  # the jobs are in the index: the restart keeps them
    counts = job_counts(server)
    assert counts["queued"] + counts["running"] == 2 * len(ct) and counts["done"] == 0

    dest1.start()
    dest2.start()
    later = write_series(tmp_path / "ct2", 3, size=16, study_uid=study, study_description="CT CHEST")
    _store(server, later, "CT_SCANNER")
    routed = _uids(ct + later)
    for dest in (dest1, dest2):
        wait_until(f"every routed CT at {dest.ae_title}", lambda d=dest: len(d.files()) >= len(routed))
    wait_until("the queue to be empty", lambda: job_counts(server)["queued"] == job_counts(server)["running"] == 0)
    for dest in (dest1, dest2):
        received = dest.received()
        assert sorted(received) == sorted(routed), f"{dest.ae_title}: each routed instance once, nothing else"
    assert job_counts(server)["done"] == 2 * len(routed)
    for dest in (dest1, dest2):
        dest.stop()


def test_a_stable_study_is_routed_whole_as_another_transfer_syntax(make_server, tmp_path: Path) -> None:
    config = tmp_path / "macpacs.toml"
    config.write_text(CONFIG)
    server = make_server(extra_args=["--config", str(config)])
    dest3 = Storescp(tmp_path / "dest3", "DEST3").start()
    add_node(server, "DEST3", dest3.port)
    brain = write_series(tmp_path / "brain", 4, size=16, modality="MR", study_description="MR BRAIN")
    chest = write_series(tmp_path / "chest", 2, size=16, modality="MR", study_description="MR CHEST")
    _store(server, brain + chest, "MRI")
    wait_until("the brain study at DEST3", lambda: len(dest3.files()) >= len(brain))
    assert sorted(dest3.received()) == sorted(_uids(brain)), "only the study whose tags match"
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in dest3.files()} == {RLELossless}
    assert server.logged(f"routing: study {pydicom.dcmread(brain[0]).StudyInstanceUID} queued for DEST3")
    dest3.stop()


def test_a_bad_rule_is_logged_and_the_others_still_route(caplog) -> None:
    rules = [
        {"name": "typo", "to": ["DEST1"], "when": "always"},
        {"name": "not a syntax", "to": ["DEST1"], "transfer_syntax": "1.2.3"},
        {"name": "nowhere", "on": "stored"},
        {"name": "fine", "to": "DEST1", "modality": "ct", "tags": {"0008,1030": ["*HEAD*", "*BRAIN*"]}},
    ]
    with caplog.at_level(logging.ERROR):
        loaded = load_rules({"rules": rules})
    assert [rule.name for rule in loaded] == ["fine"]
    assert loaded[0].modality == {"CT"} and loaded[0].to == ("DEST1",)
    text = caplog.text
    assert "routing rule 1 ('typo'): unknown setting when" in text
    assert "routing rule 2 ('not a syntax'): transfer_syntax '1.2.3' is not a transfer syntax UID" in text
    assert "routing rule 3 ('nowhere'): say where to send with to = [\"NODE\"]" in text
    assert text.count("this rule is skipped until the configuration is fixed") == 3


def _waiting(server) -> list[dict]:
    return jobs(server, ("queued",), ("send",))
