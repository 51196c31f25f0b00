"""The pynetdicom internals macpacs relies on are checked at start-up (issue 13).

This is the test pyproject.toml's pynetdicom pin names: it passes on the installed release, and a
missing internal stops ``macpacs serve`` with a message naming it and the version macpacs needs.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import threading
import time
import tomllib

import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pynetdicom.transport import AssociationSocket

from macpacs.pacs_server.dimse import pynetdicom_ext
from tests.conftest import ROOT, free_port, wait_for_port


def test_check_passes_on_the_installed_pynetdicom():
    pynetdicom_ext.check()


def test_required_version_is_the_pin_and_is_installed():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [Requirement(d) for d in dependencies if Requirement(d).name == "pynetdicom"]
    assert pin.specifier == SpecifierSet(pynetdicom_ext.REQUIRED_VERSION)
    assert pin.specifier.contains(importlib.metadata.version("pynetdicom"))


def _message(excinfo: pytest.ExceptionInfo[pynetdicom_ext.PynetdicomMismatch]) -> str:
    message = str(excinfo.value)
    assert f"pynetdicom {importlib.metadata.version('pynetdicom')} is installed" in message
    assert f"needs pynetdicom{pynetdicom_ext.REQUIRED_VERSION}" in message
    return message


def test_a_missing_class_attribute_is_named(monkeypatch):
    monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
    monkeypatch.delattr(pynetdicom.dimse_messages, "NamedTemporaryFile")
    with pytest.raises(pynetdicom_ext.PynetdicomMismatch) as excinfo:
        pynetdicom_ext.check()
    message = _message(excinfo)
    assert "pynetdicom.dul.DULServiceProvider._is_transport_event" in message
    assert "pynetdicom.dimse_messages.NamedTemporaryFile" in message


def test_a_missing_instance_attribute_is_named(monkeypatch):
    original = pynetdicom.association.Association.__init__

    def without_checkpoint(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._reactor_checkpoint
        del self.dul._idle_timer

    monkeypatch.setattr(pynetdicom.association.Association, "__init__", without_checkpoint)
    with pytest.raises(pynetdicom_ext.PynetdicomMismatch) as excinfo:
        pynetdicom_ext.check()
    message = _message(excinfo)
    assert "Association._reactor_checkpoint" in message
    assert "DULServiceProvider._idle_timer" in message


def test_apply_is_idempotent_and_stages_received_datasets_where_told(monkeypatch, tmp_path):
    monkeypatch.setattr(pynetdicom_ext, "_stage", pynetdicom_ext._stage)  # restored afterwards

    def stage():
        return open(tmp_path / f"staged-{len(list(tmp_path.iterdir()))}.dcm", "xb")

    clock = pynetdicom_ext.apply(1.0, stage)
    monkeypatch.setattr(clock, "poll", clock.poll)
    assert pynetdicom_ext.apply(0.5) is clock and clock.poll == 0.0005
    assert AssociationSocket.__init__ is pynetdicom_ext._socket_init
    assert pynetdicom.association.time is clock and pynetdicom.dul.time is clock
    # pynetdicom's own call for a received C-STORE dataset, and the direct path's, land in the stage.
    with pynetdicom.dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm") as fh:
        assert fh.name == str(tmp_path / "staged-0.dcm")
    with pynetdicom_ext.staged_file() as fh:
        assert fh.name == str(tmp_path / "staged-1.dcm")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_to_start_without_an_internal(tmp_path, workers):
    """In the main process, before any listener or worker starts: a clear error, no traceback."""
    script = (
        "import sys, pynetdicom.association as a\n"
        "del a.Association._abort_blocking\n"
        "from macpacs.installer.entry import main\n"
        "sys.argv[0] = 'macpacs'\n"
        "main()\n"
    )
    ports = [str(free_port()) for _ in range(3)]
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", ports[0], "--web-port", ports[1]]
    env = {**os.environ, "MACPACS_DICOM_WORKERS": workers, "MACPACS_DICOM_BIND": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv, "--xmlrpc-port", ports[2]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Error: configuration error: pynetdicom" in proc.stderr, proc.stderr
    assert "pynetdicom.association.Association._abort_blocking" in proc.stderr
    assert "Traceback" not in proc.stderr


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reactors_wake_on_work_and_every_doorbell_is_closed(tmp_path):
    """The wake-on-work clock, end to end with DCMTK on both sides: our acceptor answers 20
    ``echoscu`` associations and our requestor 20 C-ECHOs to DCMTK's ``storescp``; afterwards no
    doorbell pipe is left open (each DUL closes its own when it ends)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    pynetdicom_ext.apply(1.0)
    ae = AE("PROBE")
    ae.add_supported_context(Verification)
    ae.add_requested_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    scp_port = free_port()
    storescp = subprocess.Popen(["/usr/bin/storescp", "-od", str(tmp_path), str(scp_port)])
    try:
        wait_for_port(scp_port)
        before = _open_descriptors()
        for _ in range(20):
            subprocess.run(["/usr/bin/echoscu", "-aec", "PROBE", "127.0.0.1", str(port)], check=True, timeout=30)
            assoc = ae.associate("127.0.0.1", scp_port, ae_title="STORESCP")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (server.active_associations or _open_descriptors() > before):
            time.sleep(0.05)
        assert _open_descriptors() <= before
    finally:
        server.shutdown()
        storescp.kill()
        storescp.wait()


def test_a_doorbell_ends_the_wait_when_rung_or_when_the_peer_sends():
    """``_Doorbell.wait`` returns at once for either reason, not at the end of its interval."""
    import socket

    bell = pynetdicom_ext._Doorbell()
    ours, peer = socket.socketpair()
    try:
        threading.Timer(0.05, bell.ring).start()
        started = time.monotonic()
        bell.wait(ours.fileno(), 30.0)
        assert time.monotonic() - started < 10
        threading.Timer(0.05, peer.send, args=(b"x",)).start()
        started = time.monotonic()
        bell.wait(ours.fileno(), 30.0)
        assert time.monotonic() - started < 10
    finally:
        bell.close()
        bell.ring()  # after the close: a no-op, never a write into a reused descriptor
        ours.close()
        peer.close()
