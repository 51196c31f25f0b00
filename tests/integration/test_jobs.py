"""The persistent job queue (issue 16): sends that wait for a node, survive restarts, alert, and are
seen, retried and cancelled by an admin in a real Chromium and with ``macpacs jobs``.

The destination is a DCMTK storescp that is down, then comes up. Jobs are taken by one runner at
a time: four processes claiming from one SQLite file share 300 jobs without taking one twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pydicom.uid import generate_uid

from macpacs.pacs_server.archive import open_archive
from macpacs.pacs_server.config import load
from tests.browser.conftest import browser, page  # noqa: F401  (the real Chromium and a fresh page)
from tests.conftest import BACKENDS, MACPACS, ROOT, ServerProcess, free_port, index_url_for
from tests.synthetic import write_series

from .jobs_helpers import Storescp, add_node, health, job_counts, jobs, macpacs, wait_until

ADMIN, PASSWORD = "admin", "correct horse 42"
FAST_RETRIES = {"MACPACS_JOBS_RETRY_BASE_S": "0.3", "MACPACS_JOBS_RETRY_MAX_S": "0.6"}
# Long enough that a job that failed stays "waiting to retry" while the test lists and cancels it
# (with 0.3 s it was often caught running its next attempt), short enough for the retry at the end.
STEADY_RETRIES = {"MACPACS_JOBS_RETRY_BASE_S": "5", "MACPACS_JOBS_RETRY_MAX_S": "5"}


@pytest.fixture
def study_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A server with one imported 4-image study and an admin; failed jobs retried after 5 s."""
    data = tmp_path / "data"
    study = generate_uid()
    write_series(tmp_path / "in", 4, size=16, study_uid=study)
    for argv, stdin in (
        (["import", str(tmp_path / "in")], None),
        (["users", "add", ADMIN, "--password-stdin"], PASSWORD + "\n"),
    ):
        subprocess.run(
            [MACPACS, *argv, "--data-dir", str(data)], input=stdin, text=True, check=True, capture_output=True
        )
    server = ServerProcess(data, free_port(), free_port(), free_port(), env=dict(STEADY_RETRIES)).start()
    yield server, study
    server.stop()


def _jobs(server: ServerProcess) -> list[dict]:
    return jobs(server)


def test_a_browser_send_to_a_down_node_is_retried_cancelled_and_retried_by_an_admin(
    study_server,
    page,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    server, study = study_server
    dest = Storescp(tmp_path / "viewer", "VIEWER")
    add_node(server, "viewer", dest.port, "VIEWER")
    url = f"http://127.0.0.1:{server.web_port}"
    page.goto(f"{url}/login?next=/studies/{study}")
    page.fill("input[name=username]", ADMIN)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.select_option("#send-node", "viewer")
    page.click("#send")
    page.wait_for_function("document.getElementById('study-message').textContent.includes('retries it')")
    message = page.inner_text("#study-message")
    assert "4 of 4 images were not accepted by viewer" in message and "connection refused" in message
    listed = macpacs(server, "jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (job,) = json.loads(listed.stdout)
    assert job["kind"] == "send" and job["state"] == "queued" and job["retrying"] and job["node"] == "viewer"

    # The status page lists it; the admin cancels it there.
    page.goto(f"{url}/status")
    row = page.locator(f"#job-list tr[data-job='{job['id']}']")
    assert "waiting to retry" in row.inner_text() and "send study" in row.inner_text()
    row.locator("button[data-action=cancel]").click()
    page.wait_for_function("document.getElementById('job-message').textContent.includes('cancelled')")
    assert _jobs(server)[0]["state"] == "cancelled"
    page.reload()
    assert page.locator(f"#job-list tr[data-job='{job['id']}']").count() == 0, "a cancelled job leaves the list"

    # `macpacs jobs retry` queues it again; the node comes up; the study arrives once.
    done = macpacs(server, "jobs", "retry", str(job["id"]))
    assert done.returncode == 0 and f"job {job['id']} queued again" in done.stdout, done.stderr
    dest.start()
    wait_until("the send to be done", lambda: _jobs(server)[0]["state"] == "done")
    final = _jobs(server)[0]
    assert final["message"] == "Sent 4 images to viewer." and (final["done"], final["total"]) == (4, 4)
    assert len(dest.received()) == len(set(dest.received())) == 4
    done = macpacs(server, "jobs", "cancel", str(job["id"]))
    assert done.returncode == 1 and "is done: it can no longer be cancelled" in done.stderr
    dest.stop()


def test_queued_jobs_survive_a_kill_and_alert_then_stop_after_max_attempts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**FAST_RETRIES, "MACPACS_JOBS_ALERT_AFTER": "2", "MACPACS_JOBS_MAX_ATTEMPTS": "4"}
    server = ServerProcess(data, free_port(), free_port(), free_port(), env=env).start()
    try:
        add_node(server, "down", free_port())
        study = generate_uid()
        write_series(tmp_path / "in", 2, size=16, study_uid=study)
        imported = [MACPACS, "import", str(tmp_path / "in"), "--data-dir", str(data)]
        subprocess.run(imported, check=True, capture_output=True)
        # Any process may queue a job (a plugin in a DICOM worker, a command): here, this one.
        settings = load(overrides={"storage": {"data_dir": str(data)}}, environ={})
        queuer = open_archive(settings)
        try:
            job = queuer.jobs.submit(
                "send", f"send study {study} to down", {"node": "down", "keys": {"StudyInstanceUID": study}}
            )
        finally:
            queuer.close()
        wait_until("the alert", lambda: server.logged("ALERT jobs: 1 job(s) failed 2 times or more", timeout=0))
        assert health(server)["jobs"]["alerting"] == 1
        server.stop(9)
        server.start()
        assert _jobs(server)[0]["id"] == job.id, "the queue is in the index"
        try:
            wait_until("the job to stop", lambda: _jobs(server)[0]["state"] == "failed")
        except AssertionError:
            print(server.log()[-6000:], _jobs(server))
            raise
        final = _jobs(server)[0]
        assert final["attempts"] == 4 and final["message"].startswith("gave up after 4 attempts: 2 of 2 images")
        assert server.logged(f"ALERT jobs: job {job.id} (send study {study} to down) stopped: gave up after 4")
        assert server.logged(f"`macpacs jobs retry {job.id}`")
        assert job_counts(server)["failed"] == 1 and job_counts(server)["alerting"] == 1
    finally:
        server.stop()


CLAIMER = """
import json, pathlib, sys, time
from macpacs.pacs_server.index import Index
from macpacs.pacs_server.index.jobs_table import JobTable
table = JobTable(Index(sys.argv[1]))
# Start together: the first process ready took every job before the others had imported.
folder = pathlib.Path(sys.argv[3])
(folder / ("ready-" + sys.argv[2])).touch()
while not (folder / "go").exists():
    time.sleep(0.01)
taken = []
while True:
    rows = table.claim(["send"], sys.argv[2], 60.0, 7)
    if not rows:
        break
    taken += [row["pk"] for row in rows]
    table.finish({row["pk"]: {"state": "done"} for row in rows}, sys.argv[2])
print(json.dumps(taken))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_job_is_taken_by_one_of_several_processes(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """On SQLite the writers take turns; on PostgreSQL the claims run at once (FOR UPDATE SKIP LOCKED)."""
    index = {"url": index_url_for(request, backend)}
    settings = load(overrides={"storage": {"data_dir": str(tmp_path / "data")}, "index": index}, environ={})
    archive = open_archive(settings)
    try:
        batches = [f"send:node{n % 3}:" for n in range(300)]
        pks = archive.jobs.submit_many([("send", f"job {n}", {}, key, None) for n, key in enumerate(batches)])
    finally:
        archive.close()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CLAIMER), settings.index_url, f"host:{n}:claimer", str(barrier)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for n in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    (barrier / "go").touch()
    taken = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    every = [pk for one in taken for pk in one]
    assert sorted(every) == sorted(pks), "every job taken, none twice"
    assert sum(1 for one in taken if one) >= 2, "the processes shared the queue"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread nice values as Linux keeps them")
def test_job_runners_run_below_the_server_s_cpu_priority(study_server) -> None:
    """jobs.nice: the runners (routing, sends) yield the cores to ingest (docs/benchmarks.md, "Routing")."""
    server, _study = study_server
    assert server.proc is not None
    base = os.getpriority(os.PRIO_PROCESS, server.proc.pid)
    niced = wait_until(
        "the job runner threads at nice +19",
        lambda: [t.id for t in psutil.Process(server.proc.pid).threads()
                 if os.getpriority(os.PRIO_PROCESS, t.id) == min(19, base + 19)],
        timeout=10,
    )  # fmt: skip
    assert len(niced) >= 2, "one per jobs.workers (2), at nice +19"
    assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == base, "the server's own threads keep theirs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_taken_dedupe_key_queues_nothing_and_names_the_job_queued_before(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """A hook that runs twice (after a crash) queues nothing twice, alone or in another's
    transaction (an instance's, as ingest queues its jobs): the first job's id comes back."""
    index = {"url": index_url_for(request, backend)}
    settings = load(overrides={"storage": {"data_dir": str(tmp_path / "data")}, "index": index}, environ={})
    archive = open_archive(settings)
    try:
        (first,) = archive.jobs.submit_many([("send", "first", {"n": 1}, "send:DEST:", "route:r:DEST:1.2.3")])
        again, other = archive.jobs.submit_many(
            [("send", "again", {"n": 2}, "send:DEST:", "route:r:DEST:1.2.3"), ("send", "other", {}, None, None)]
        )
        rows = archive.jobs.prepare([("send", "in a transaction", {}, None, "route:r:DEST:1.2.3")])
        with archive.index.engine.begin() as conn:
            (within,) = archive.jobs.insert(rows, conn)
        assert again == within == first and other != first
        assert sorted(job.description for job in archive.jobs.list()) == ["first", "other"]
        assert archive.jobs.get(first).payload == {"n": 1}
    finally:
        archive.close()
