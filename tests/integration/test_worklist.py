"""The worklist plugin against DCMTK: ``findscu -W`` asks us and DCMTK's own ``wlmscpfs``, the answers agree.

A real ``macpacs serve`` (DICOM worker processes: the Modality Worklist SCP comes from the
``dicom_services`` hook in each of them) gets its items through ``POST /api/worklist``;
``wlmscpfs`` serves the same items from ``.wl`` files written with ``dump2dcm``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.conftest import ServerProcess
from tests.integration.helpers import (
    ADMIN,
    Step,
    findscu_worklist,
    flat,
    integration_server,
    item,
    post_item,
    wlmscpfs,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module; each test leaves the worklist as it found it."""
    with integration_server(tmp_path_factory.mktemp("worklist")) as started:
        yield started


STEPS = [
    Step("DOE^JOHN", "P001", "ACC001", "CT01", "CT", "20250101", "083000", "S001"),
    Step("DOE^JANE", "P002", "ACC002", "CT01", "CT", "20250101", "101500", "S002"),
    Step("SMITH^ANNA", "P003", "ACC003", "MR01", "MR", "20250101", "090000", "S003"),
    Step("SMITH^BOB", "P004", "ACC004", "MR01", "MR", "20250102", "140000", "S004"),
    Step("MILLER^CARL", "P005", "ACC005", "CT01", "CT", "20250102", "073000", "S005"),
    Step("DOEBLER^EVA", "P006", "ACC006", "US01", "US", "20250103", "120000", "S006"),
    Step("BROWN^TOM", "P007", "ACC007", "CT02", "CT", "20250103", "160000", "S007"),
]
SPS = "ScheduledProcedureStepSequence[0]"
RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    f"{SPS}.ScheduledStationAETitle",
    f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime",
    f"{SPS}.Modality",
    f"{SPS}.ScheduledPerformingPhysicianName",
    f"{SPS}.ScheduledProcedureStepDescription",
    f"{SPS}.ScheduledStationName",
    f"{SPS}.ScheduledProcedureStepLocation",
    f"{SPS}.ScheduledProcedureStepID",
]
# (matching keys, accession numbers expected)
QUERIES = [
    ({}, {s.accession for s in STEPS}),
    ({f"{SPS}.ScheduledStationAETitle": "CT01"}, {"ACC001", "ACC002", "ACC005"}),
    ({f"{SPS}.Modality": "MR"}, {"ACC003", "ACC004"}),
    ({f"{SPS}.ScheduledProcedureStepStartDate": "20250102"}, {"ACC004", "ACC005"}),
    ({f"{SPS}.ScheduledProcedureStepStartDate": "20250102-20250103"}, {"ACC004", "ACC005", "ACC006", "ACC007"}),
    (
        {f"{SPS}.ScheduledProcedureStepStartDate": "20250101", f"{SPS}.ScheduledProcedureStepStartTime": "0800-1000"},
        {"ACC001", "ACC003"},
    ),
    (
        {f"{SPS}.ScheduledStationAETitle": "CT01", f"{SPS}.ScheduledProcedureStepStartDate": "20250101"},
        {"ACC001", "ACC002"},
    ),
    ({"PatientName": "DOE*"}, {"ACC001", "ACC002", "ACC006"}),
    ({"PatientID": "P003"}, {"ACC003"}),
    ({"AccessionNumber": "ACC007"}, {"ACC007"}),
]


def _keys(matching: dict[str, str]) -> list[str]:
    return [f"{key}={matching.get(key, '')}" for key in RETURN_KEYS] + [
        f"{key}={value}" for key, value in matching.items() if key not in RETURN_KEYS
    ]


def _answers(responses: list) -> list[dict]:
    return sorted((flat(r) for r in responses), key=lambda r: r["AccessionNumber"])


def test_findscu_worklist_agrees_with_wlmscpfs(server, tmp_path) -> None:
    items = [item(step) for step in STEPS]
    for ds in items:
        post_item(server, ds)
    # A completed step is stored but leaves the worklist.
    done = item(Step("DOE^DONE", "P009", "ACC009", "CT01", "CT", "20250101", "090000", "S009"))
    done.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = "COMPLETED"
    done_id = post_item(server, done)["id"]

    with wlmscpfs(items, tmp_path) as (dcmtk_ae, dcmtk_port):
        for matching, expected in QUERIES:
            keys = _keys(matching)
            ours = _answers(findscu_worklist(server.ae_title, server.dicom_port, tmp_path / "ours", *keys))
            theirs = _answers(findscu_worklist(dcmtk_ae, dcmtk_port, tmp_path / "theirs", *keys))
            assert {r["AccessionNumber"] for r in ours} == expected, matching
            assert ours == theirs, matching
    assert server.logged("worklist C-FIND from FINDSCU")
    listed = requests.get(f"http://127.0.0.1:{server.web_port}/api/worklist", params={"include_ended": "true"},
                          auth=ADMIN, timeout=10).json()  # fmt: skip
    assert done_id in [entry["id"] for entry in listed]
    for entry in listed:
        requests.delete(f"http://127.0.0.1:{server.web_port}/api/worklist/{entry['id']}", auth=ADMIN, timeout=10)


def test_rest_api_lists_deletes_and_refuses_bad_items(server, tmp_path) -> None:
    base = f"http://127.0.0.1:{server.web_port}/api/worklist"
    created = post_item(server, item(STEPS[0]))
    post_item(server, item(STEPS[2]))
    assert created["status"] == "SCHEDULED" and created["item"]["00100020"]["Value"] == ["P001"]

    listed = requests.get(base, params={"Modality": "CT"}, auth=ADMIN, timeout=10).json()
    assert [entry["id"] for entry in listed] == [created["id"]]
    assert len(requests.get(base, auth=ADMIN, timeout=10).json()) == 2

    # No credentials: refused, even from this machine (admin only).
    assert requests.get(base, timeout=10).status_code == 401
    # Bad items get a 400 that says why, and nothing is scheduled.
    no_step = item(STEPS[1])
    del no_step.ScheduledProcedureStepSequence
    response = requests.post(base, json=no_step.to_json_dict(), auth=ADMIN, timeout=10)
    assert response.status_code == 400 and "ScheduledProcedureStepSequence" in response.json()["detail"]
    response = requests.post(base, data=b"not json", auth=ADMIN, timeout=10)
    assert response.status_code == 400
    response = requests.post(base, json=[no_step.to_json_dict()], auth=ADMIN, timeout=10)
    assert response.status_code == 400 and "one by one" in response.json()["detail"]
    assert len(requests.get(base, auth=ADMIN, timeout=10).json()) == 2

    # Deleted: gone from the list and from C-FIND.
    assert requests.delete(f"{base}/{created['id']}", auth=ADMIN, timeout=10).status_code == 204
    assert requests.delete(f"{base}/{created['id']}", auth=ADMIN, timeout=10).status_code == 404
    answers = findscu_worklist(server.ae_title, server.dicom_port, tmp_path / "find", *_keys({}))
    assert [r.AccessionNumber for r in answers] == ["ACC003"]
    remaining = requests.get(base, auth=ADMIN, timeout=10).json()
    assert requests.delete(f"{base}/{remaining[0]['id']}", auth=ADMIN, timeout=10).status_code == 204
