"""A node registered with ``--tls``: ``macpacs send`` and ``nodes echo`` over TLS to DCMTK's storescp.

The peer's certificate is signed by a test CA that the server trusts through ``SSL_CERT_FILE``
(read by ``ssl.create_default_context``, as the system trust store would be on a real host).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import dataset_bytes, run_macpacs

from .conftest import CT_STUDY, macpacs, received, storescp


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, and a key and certificate for 127.0.0.1 signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=macpacs test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "peer.key"), "-out", str(d / "peer.csr"))  # fmt: skip
    (d / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "peer.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "peer.pem"))  # fmt: skip
    return {"ca": d / "ca.pem", "key": d / "peer.key", "cert": d / "peer.pem"}


def test_send_and_echo_over_tls(loaded, tmp_path: Path, pki: dict[str, Path]):
    server, sources, _base = loaded
    trust = {"SSL_CERT_FILE": str(pki["ca"])}
    tls = ("+tls", str(pki["key"]), str(pki["cert"]), "-ic")  # storescp: TLS; it does not ask for our certificate
    with storescp(tmp_path / "out", "TLSDEST", "+B", *tls) as port:
        macpacs("nodes", "add", "TLSDEST", "--ae-title", "TLSDEST", "--host", "127.0.0.1", "--port", str(port),
                "--tls", data_dir=server.data_dir)  # fmt: skip
        assert "success in" in macpacs("nodes", "echo", "TLSDEST", data_dir=server.data_dir, env=trust).stdout
        out = macpacs("send", "TLSDEST", "--study", CT_STUDY, data_dir=server.data_dir, env=trust)
        assert "sent to TLSDEST: 5 completed, 0 warning, 0 failed, 0 remaining" in out.stdout
        # Without the CA, the peer's certificate is not trusted: a clear failure, nothing sent. In
        # its own process, as an admin runs it: the reason is a log line, which goes to stderr there.
        untrusted = run_macpacs("send", "TLSDEST", "--study", CT_STUDY, "--data-dir", str(server.data_dir))
    got = received(tmp_path / "out")
    assert len(got) == 5
    for uid, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(sources[uid])
    assert untrusted.returncode == 1, untrusted.stdout + untrusted.stderr
    assert "TLS: the node's certificate is not trusted" in untrusted.stderr, untrusted.stderr
