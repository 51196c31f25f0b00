"""`macpacs install --https` on the scripted Mac: a self-signed certificate for the web port, the
config and the supervisor pointed at it, and `doctor` reporting its expiry (issue 14).

The Mac's openssl is scripted (fakes.FakeMac._openssl, as LibreSSL answers); the
``cryptography`` path makes a real certificate in the test's own process."""

from __future__ import annotations

import datetime as dt
import plistlib
import ssl
import stat
import tomllib

import pytest

from macpacs.installer import certificate, doctor

from .fakes import UID, options

TLS = "usr/local/etc/macpacs/tls"


@pytest.fixture
def openssl_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installer's Python without the cryptography package, as a fresh macOS venv is."""
    monkeypatch.setattr(certificate, "cryptography_available", lambda: False)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _doctor(mac) -> dict[str, tuple[str, str]]:
    found = doctor.diagnose(mac.context(options(password=None, https=True)))
    return {f.what: (f.level, f.fix) for f in found if "tls_cert" in f.what}


def test_https_install_with_openssl(mac, openssl_only):
    mac.install(https=True)
    made = [argv for argv in mac.changes() if argv[:2] == ("openssl", "req")]
    assert len(made) == 1 and "825" in made[0] and "-config" in made[0]
    tls = mac.root / TLS
    assert _mode(tls) == 0o700 and tls.stat().st_uid == UID
    assert _mode(tls / "web.key") == 0o600 and (tls / "web.key").stat().st_uid == UID
    assert _mode(tls / "web.pem") == 0o644
    request = (tls / "web-cert.cnf").read_text()
    assert "subjectAltName = DNS:macpro,DNS:macpro.local,DNS:localhost,IP:127.0.0.1,IP:::1,IP:10.0.0.5" in request
    config = tomllib.loads((mac.root / "usr/local/etc/macpacs/macpacs.toml").read_text())
    assert config["web"] == {
        "port": 3333,
        "tls_cert": "/usr/local/etc/macpacs/tls/web.pem",
        "tls_key": "/usr/local/etc/macpacs/tls/web.key",
    }
    supervisor = plistlib.loads(
        (mac.root / "Users/pacs/Library/LaunchAgents/org.macpacs.supervisor.plist").read_bytes()
    )
    args = supervisor["ProgramArguments"]
    assert args[args.index("--web-url") + 1] == "https://127.0.0.1:3333/testdbalive"
    assert args[args.index("--ca-file") + 1] == "/usr/local/etc/macpacs/tls/web.pem"
    assert "  web           https://10.0.0.5:3333/" in mac.text()
    # The XML-RPC port serves HTTPS with the same certificate, and the supervisor probes it so.
    assert config["xmlrpc"] == {"port": 8080, "enabled": True, "tls": True}
    assert args[args.index("--xmlrpc-url") + 1] == "https://127.0.0.1:8080/"
    assert "  XML-RPC       https://10.0.0.5:8080/" in mac.text()
    # Again: the certificate is valid for years, so nothing is made.
    mac.install(https=True)
    assert not [argv for argv in mac.changes() if argv[:2] == ("openssl", "req")]
    assert "already done: /usr/local/etc/macpacs/tls/web.pem, valid until 2029-03-01" in mac.text()
    mac.uninstall()  # the install state remembers it was made: undone with the rest
    assert not (mac.root / TLS).exists()


def test_certificate_near_its_end_is_renewed_and_reported(mac, openssl_only):
    mac.install(https=True)
    assert _doctor(mac) == {
        "web.tls_cert /usr/local/etc/macpacs/tls/web.pem valid until 2029-03-01": ("PASS", ""),
    }
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1)
    mac.fake.cert_not_after = soon.strftime("%b %d %H:%M:%S %Y GMT")
    (level, fix), *_ = _doctor(mac).values()
    assert level == "WARN" and "--https` makes a new one" in fix
    assert any(what.endswith(f"expires in 10 days ({soon:%Y-%m-%d})") for what in _doctor(mac))
    mac.fake.cert_not_after = "Jan  2 00:00:00 2020 GMT"
    assert _doctor(mac) == {
        "web.tls_cert /usr/local/etc/macpacs/tls/web.pem expired on 2020-01-02": (
            "FAIL",
            "`sudo macpacs install --user pacs --https` makes a new one, then restart",
        ),
    }
    mac.install(https=True)  # renews it
    assert [argv for argv in mac.changes() if argv[:2] == ("openssl", "req")]


def test_dry_run_shows_the_openssl_command_and_writes_nothing(mac, openssl_only):
    mac.install(https=True, dry_run=True)
    assert mac.files() == []
    text = mac.text()
    assert "] https: self-signed certificate for the web and XML-RPC ports" in text
    assert "$ openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 -config" in text
    assert '      | tls_cert = "/usr/local/etc/macpacs/tls/web.pem"' in text


def test_without_https_the_step_is_skipped(mac):
    mac.install()
    assert "skipped: not asked for (--https makes a self-signed certificate" in mac.text()
    assert not (mac.root / TLS).exists()
    text = (mac.root / "usr/local/etc/macpacs/macpacs.toml").read_text()
    assert "tls_cert" not in text and "tls" not in tomllib.loads(text)["xmlrpc"]


def test_doctor_probes_xmlrpc_over_https_trusting_the_supervisors_certificate(mac, openssl_only):
    """doctor asks the XML-RPC port as the supervisor does: https, trusting its --ca-file."""
    mac.install(https=True)
    ctx = mac.context(options(password=None, https=True))
    found = {f.what: f.level for f in doctor.diagnose(ctx)}
    assert found["XML-RPC https://127.0.0.1:8080/ answers DBWindowFind"] == "PASS"
    assert ctx.host.xmlrpc_probes == [("https://127.0.0.1:8080/", "/usr/local/etc/macpacs/tls/web.pem")]


def test_an_existing_config_decides_whether_xmlrpc_speaks_https(mac, openssl_only):
    """Re-running with --https keeps a config made without it: XML-RPC stays plain, and so does its probe."""
    mac.install()
    mac.install(https=True)
    supervisor = plistlib.loads(
        (mac.root / "Users/pacs/Library/LaunchAgents/org.macpacs.supervisor.plist").read_bytes()
    )
    args = supervisor["ProgramArguments"]
    assert args[args.index("--xmlrpc-url") + 1] == "http://127.0.0.1:8080/"
    assert "tls" not in tomllib.loads((mac.root / "usr/local/etc/macpacs/macpacs.toml").read_text())["xmlrpc"]


def test_https_install_with_cryptography(mac):
    pytest.importorskip("cryptography")
    assert certificate.cryptography_available()
    mac.install(https=True)
    assert not [argv for argv in mac.fake.calls if argv[0][0] == "openssl"]  # made in-process
    pem = mac.root / TLS / "web.pem"
    decoded = ssl._ssl._test_decode_cert(str(pem))  # type: ignore[attr-defined]
    assert ("IP Address", "127.0.0.1") in decoded["subjectAltName"]
    assert ("DNS", "macpro.local") in decoded["subjectAltName"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem, mac.root / TLS / "web.key")  # a key that matches
    ends = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), dt.UTC)
    assert abs((ends - dt.datetime.now(dt.UTC)).days - 825) <= 1
    assert _doctor(mac) == {
        f"web.tls_cert /usr/local/etc/macpacs/tls/web.pem valid until {ends:%Y-%m-%d}": ("PASS", "")
    }
