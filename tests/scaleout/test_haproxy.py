"""docs/examples/haproxy.cfg as shipped, in front of two nodes on one PostgreSQL and one bucket:
storescu, findscu and /health through the balancer reach both nodes; a node killed with SIGKILL
is taken out by the /health checks and the balancer's DICOM port goes on storing through the
other. Marked slow (HAProxy is not among CI's packages): ``.ci/run -m slow``."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests

from tests.conftest import ROOT, findscu, free_port, run_tool, wait_for_port
from tests.synthetic import write_series

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("haproxy"), reason="HAProxy is not installed (apt-get install haproxy)"),
]


EXAMPLE_SERVERS = {"node-a": "10.0.0.11", "node-b": "10.0.0.12"}


def local_config(ports: dict[str, int], nodes: list) -> str:
    """The example with its listening ports and its two servers moved to this machine's."""
    text = (ROOT / "docs" / "examples" / "haproxy.cfg").read_text()
    for port, frontend in ((11112, "dicom"), (2762, "dicom_tls"), (3333, "web"), (8080, "xmlrpc")):
        text = text.replace(f"bind :{port}\n", f"bind 127.0.0.1:{ports[frontend]}\n")
        for (name, address), node in zip(EXAMPLE_SERVERS.items(), nodes, strict=True):
            target = {11112: node.dicom_port, 2762: node.dicom_port, 3333: node.web_port, 8080: node.xmlrpc_port}[port]
            text = text.replace(
                f"server {name} {address}:{port}\n", f"server {name} 127.0.0.1:{target} check port {node.web_port}\n"
            )
    text = text.replace(" check port 3333 ", " ")
    assert not re.search(r"^\s*server .*10\.0\.0\.", text, re.M), "every server moved"
    return text


def test_two_nodes_behind_the_example_haproxy(nodes: list, tmp_path: Path):
    ports = {name: free_port() for name in ("dicom", "dicom_tls", "web", "xmlrpc")}
    config = tmp_path / "haproxy.cfg"
    config.write_text(local_config(ports, nodes))
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(ports["dicom"], proc=proxy)
        time.sleep(3)  # both nodes pass their first checks
        balancer = ["-aec", "MACPACS", "127.0.0.1", str(ports["dicom"])]
        names = {requests.get(f"http://127.0.0.1:{ports['web']}/health", timeout=10).json()["node"] for _ in range(4)}
        assert len(names) == 2, f"round robin reaches both nodes: {names}"
        first = write_series(tmp_path / "first", 4, patient_id="LB", size=16)
        for path in first:  # one association each: leastconn spreads them
            run_tool("storescu", *balancer, str(path))
        nodes[0].proc.send_signal(signal.SIGKILL)
        nodes[0].proc.wait(10)
        time.sleep(8)  # 3 failed checks, 2 s apart
        head = pydicom.dcmread(first[0], stop_before_pixels=True)
        study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
        later = write_series(tmp_path / "later", 4, patient_id="LB", size=16, study_uid=study, series_uid=series)
        for path in later:
            run_tool("storescu", *balancer, str(path))
        found = findscu_through(balancer, tmp_path, study, series)
        assert found == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first + later}
    finally:
        proxy.terminate()
        proxy.wait(10)


def findscu_through(balancer: list[str], tmp_path: Path, study: str, series: str) -> set[str]:
    class Through:  # findscu's helper wants a server: the balancer stands in
        @staticmethod
        def dicom_args() -> list[str]:
            return balancer

    keys = ("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}", "SOPInstanceUID")
    return {str(ds.SOPInstanceUID) for ds in findscu(Through, tmp_path / "find", *keys)}  # type: ignore[arg-type]
