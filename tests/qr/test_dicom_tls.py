"""The DICOM TLS port (``dicom.tls_port``, issue 14): DCMTK's echoscu, storescu and findscu with
``+tls`` (a client certificate) and ``+tla`` (none), C-GET with pynetdicom (DCMTK's getscu has no
TLS), client certificates optional or required, the same access control as the plain port, and
unusable certificate files refused at start."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from macpacs.pacs_server import config
from macpacs.pacs_server.dimse import tls
from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import write_series

from .conftest import macpacs


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=cwd)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)  # fmt: skip


def _signed(d: Path, name: str, ca: str, cn: str, *dates: str, key: str = "") -> None:
    """A certificate for ``cn`` signed by ``ca``, with a new key or ``key``'s (``dates``: openssl ca's options)."""
    if key:
        _openssl("req", "-new", "-key", f"{key}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=d)
    else:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
    (d / "index.txt").write_text("")
    (d / "serial").write_text(f"{len(list(d.glob('*.csr'))):02X}\n")  # one serial per certificate
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = t\n[t]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n"
        "[ext]\nsubjectAltName = IP:127.0.0.1\n"
    )
    days = list(dates) or ["-days", "2"]
    _openssl("ca", "-batch", "-config", "ca.cnf", "-extensions", "ext", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
             "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext", *days, cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site CA; the server's certificate and a modality's, signed by it; a rogue CA's client; an expired one."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "siteca")
    _ca(d, "rogueca")
    _signed(d, "server", "siteca", "127.0.0.1")
    _signed(d, "modality", "siteca", "MODALITY")
    _signed(d, "rogue", "rogueca", "ROGUE", key="modality")
    _signed(
        d,
        "expired",
        "siteca",
        "127.0.0.1",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        key="server",
    )
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "locked.key", cwd=d)
    shutil.copy(d / "modality.key", d / "rogue.key")
    return d


def _tls_env(pki: Path, tls_port: int, **more: str) -> dict[str, str]:
    env = {
        "MACPACS_DICOM_TLS_PORT": str(tls_port),
        "MACPACS_DICOM_TLS_CERT": str(pki / "server.pem"),
        "MACPACS_DICOM_TLS_KEY": str(pki / "server.key"),
    }
    env.update({f"MACPACS_DICOM_{k.upper()}": v for k, v in more.items()})
    return env


def _client(pki: Path, name: str | None) -> list[str]:
    """DCMTK's TLS options: a client certificate (``+tls key cert``) or none (``+tla``); the site CA trusted."""
    who = ["+tls", str(pki / f"{name}.key"), str(pki / f"{name}.pem")] if name else ["+tla"]
    return [*who, "+cf", str(pki / "siteca.pem")]


def _at(server: ServerProcess, port: int, calling: str = "MODALITY") -> list[str]:
    return ["-aet", calling, "-aec", server.ae_title, "127.0.0.1", str(port)]


def test_every_service_over_tls_with_optional_client_certificates(pki: Path, tmp_path: Path):
    tls_port = free_port()
    env = _tls_env(pki, tls_port, tls_ca=str(pki / "siteca.pem"))
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), env=env).start()
    try:
        assert server.logged(f"DICOM TLS on port {tls_port} (client certificates verified when presented)")
        run_tool("echoscu", *_client(pki, "modality"), *_at(server, tls_port))
        assert server.logged("client certificate commonName=MODALITY")
        sources = write_series(tmp_path / "in", 4, size=16, patient_id="TLS1")
        run_tool("storescu", *_client(pki, None), *_at(server, tls_port, "ANONTLS"), *map(str, sources))
        assert server.logged("4 stored")
        out = tmp_path / "find"
        out.mkdir()
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLS1", "-k", "StudyInstanceUID"]
        run_tool("findscu", *_client(pki, "modality"), "-S", "-X", "-od", str(out), *_at(server, tls_port), *keys)
        found = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
        study = str(pydicom.dcmread(sources[0]).StudyInstanceUID)
        assert [str(ds.StudyInstanceUID) for ds in found] == [study]
        # C-GET (DCMTK's getscu has no TLS): the instances come back on the TLS association itself.
        sop_class = str(pydicom.dcmread(sources[0]).SOPClassUID)
        uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in sources}
        assert _c_get_over_tls(pki, tls_port, study, sop_class) == uids
        # A client certificate from a CA we do not trust is refused even when certificates are optional.
        rogue = run_tool("echoscu", *_client(pki, "rogue"), *_at(server, tls_port), check=False)
        assert rogue.returncode != 0
        assert server.logged("not signed by a CA in dicom.tls_ca")
        # Plain DICOM on the TLS port: refused with a reason; the plain port serves as before.
        plain = run_tool("echoscu", *_at(server, tls_port), check=False, timeout=60)
        assert plain.returncode != 0
        assert server.logged("it does not speak TLS")
        run_tool("echoscu", *_at(server, server.dicom_port))
    finally:
        server.stop()


def test_required_client_certificate_and_access_control(pki: Path, tmp_path: Path):
    """With dicom.workers = 1 (associations served in the main process: the other path of connections.py)."""
    tls_port = free_port()
    env = _tls_env(
        pki,
        tls_port,
        tls_ca=str(pki / "siteca.pem"),
        tls_require_client_cert="true",
        accept_unknown_nodes="false",
        workers="1",
    )
    data = tmp_path / "data"
    server = ServerProcess(data, free_port(), free_port(), free_port(), env=env).start()
    try:
        assert server.logged("(client certificates required)")
        macpacs("nodes", "add", "MODALITY", "--ae-title", "MODALITY", "--host", "127.0.0.1", "--port", "104",
                data_dir=data)  # fmt: skip
        anonymous = run_tool("echoscu", *_client(pki, None), *_at(server, tls_port), check=False)
        assert anonymous.returncode != 0
        assert server.logged("the client sent no certificate, and dicom.tls_require_client_cert is on")
        run_tool("echoscu", *_client(pki, "modality"), *_at(server, tls_port))
        # The nodes table decides on the TLS port as on the plain one.
        unknown = run_tool("echoscu", *_client(pki, "modality"), *_at(server, tls_port, "STRANGER"), check=False)
        assert unknown.returncode != 0
        assert server.logged("calling AE title 'STRANGER' is not a registered node")
    finally:
        server.stop()


def _c_get_over_tls(pki: Path, port: int, study: str, sop_class: str) -> set[str]:
    """pynetdicom as an outside C-GET SCU over TLS, with the modality's certificate: the UIDs received."""
    context = ssl.create_default_context(cafile=str(pki / "siteca.pem"))
    context.load_cert_chain(pki / "modality.pem", pki / "modality.key")
    received: set[str] = set()

    def on_store(event: evt.Event) -> int:
        received.add(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="MACPACS",
        ext_neg=[build_role(sop_class, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        tls_args=(context, "127.0.0.1"),
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    statuses = [status.Status for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000, statuses
    return received


def test_unusable_tls_files_stop_serve_with_one_line(pki: Path, tmp_path: Path):
    env = {
        **os.environ,
        **_tls_env(pki, free_port()),
        "MACPACS_DICOM_TLS_KEY": str(pki / "modality.key"),  # not the server certificate's key
        **{f"MACPACS_{part}_BIND": "127.0.0.1" for part in ("DICOM", "WEB", "XMLRPC")},
    }
    argv = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port()).argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    expected = f"Error: configuration error: dicom.tls_key {pki}/modality.key is not the key of the certificate"
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"tls_key": "missing.key"}, "dicom.tls_key {d}/missing.key does not exist"),
        (
            {"tls_cert": "expired.pem", "tls_key": "server.key"},
            "dicom.tls_cert {d}/expired.pem expired on 2020-01-02 00:00 UTC",
        ),
        ({"tls_cert": "server.key"}, "dicom.tls_cert {d}/server.key is not a PEM certificate"),
        ({"tls_key": "locked.key"}, "dicom.tls_key {d}/locked.key is protected by a passphrase"),
        ({"tls_ca": "server.key"}, "dicom.tls_ca {d}/server.key holds no usable PEM certificate"),
        ({"tls_cert": "."}, "dicom.tls_cert {d} is a folder"),
    ],
)
def test_each_unusable_file_is_named_with_its_fix(pki: Path, settings: dict[str, str], expected: str):
    """What serve prints for each kind of bad file (tls.server_context, on real files)."""
    values = {"tls_cert": "server.pem", "tls_key": "server.key", **settings}
    d = config.load(environ={}, overrides={"dicom": {k: str(pki / v) for k, v in values.items()}}).dicom
    with pytest.raises(config.ConfigError) as raised:
        tls.server_context(d)
    assert expected.format(d=pki) in str(raised.value)


@pytest.mark.parametrize("port", ["dicom", "web"])
def test_every_tls_port_names_a_locked_key_the_same_way(pki: Path, tmp_path: Path, port: str):
    """tls_files reads the files of every TLS port: a passphrase-protected key stops serve with one
    line naming the setting, and OpenSSL never prompts for the passphrase (nobody would type it)."""
    env = {
        **os.environ,
        f"MACPACS_{port.upper()}_TLS_CERT": str(pki / "server.pem"),
        f"MACPACS_{port.upper()}_TLS_KEY": str(pki / "locked.key"),
        **{f"MACPACS_{part}_BIND": "127.0.0.1" for part in ("DICOM", "WEB", "XMLRPC")},
    }
    argv = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port()).argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    expected = f"Error: configuration error: {port}.tls_key {pki}/locked.key is protected by a passphrase"
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
