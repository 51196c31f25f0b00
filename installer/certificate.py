"""HTTPS for the web and XML-RPC ports: a self-signed certificate made by ``macpacs install --https``, and its expiry.

The key and certificate go in ``<config dir>/tls/`` (``web.key`` 0600 and ``web.pem`` 0644, owned
by the account that runs the server, in a folder only it can enter), and the config written for a
new install points ``[web] tls_cert``/``tls_key`` at them and sets ``[xmlrpc] tls`` (the XML-RPC port
serves the same certificate). The certificate names this Mac as clients reach it (its host name,
``<name>.local``, ``localhost``, 127.0.0.1, ::1 and its address) and lasts 825 days, the longest
macOS accepts for a certificate a user adds to the keychain.

It is made with the ``cryptography`` package when the installer's Python has it, else with the
system's ``openssl`` through the command seam (shown in ``--dry-run``; macOS ships LibreSSL, whose
``req`` takes the extensions from a config file, written next to the key). Re-running the
install makes a new one when fewer than ``RENEW_DAYS`` remain. ``expiry`` reads any certificate's
end date the same two ways, for ``doctor``.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from .layout import Layout
from .steps import Check, Context, Finding, InstallError, Step

VALID_DAYS = 825
RENEW_DAYS = 30  # doctor warns, and install renews, under this


def tls_dir(layout: Layout) -> Path:
    return layout.config_dir / "tls"


def cert_path(layout: Layout) -> Path:
    return tls_dir(layout) / "web.pem"


def key_path(layout: Layout) -> Path:
    return tls_dir(layout) / "web.key"


def cryptography_available() -> bool:
    """Whether the installer's own Python can make and read certificates without ``openssl``."""
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def names(ctx: Context) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the certificate is made for: every way a client names this Mac."""
    host = ctx.host.hostname()
    short = host.split(".")[0]
    dns = list(dict.fromkeys([host, short, f"{short}.local", "localhost"]))
    ips = list(dict.fromkeys(["127.0.0.1", "::1", ctx.host.primary_ip()]))
    return dns, ips


class Certificate(Step):
    """A self-signed certificate and key for the web and XML-RPC ports (``--https``)."""

    key = "certificate"
    title = "https: self-signed certificate for the web and XML-RPC ports"

    def skip_reason(self, ctx: Context) -> str | None:
        # Once made (the install state says so), it is kept up (renewed) and undone like the rest.
        if not ctx.options.https and not ctx.state.get("certificate"):
            return (
                "not asked for (--https makes a self-signed certificate and serves the web and XML-RPC ports "
                "over HTTPS)"
            )
        return None

    def check(self, ctx: Context) -> Check:
        if not (ctx.host.exists(key_path(ctx.layout)) and ctx.host.exists(cert_path(ctx.layout))):
            return Check(False, f"no {cert_path(ctx.layout)} yet")
        ends = expiry(ctx, cert_path(ctx.layout))
        if ends is None or ends - dt.datetime.now(dt.UTC) < dt.timedelta(days=RENEW_DAYS):
            return Check(
                False, f"{cert_path(ctx.layout)} expires within {RENEW_DAYS} days (or cannot be read): renewing it"
            )
        return Check(True, f"{cert_path(ctx.layout)}, valid until {ends:%Y-%m-%d}")

    def apply(self, ctx: Context) -> None:
        ctx.host.mkdir(tls_dir(ctx.layout), mode=0o700, owner=ctx.owner())
        if ctx.host.dry_run and cryptography_available():
            ctx.host.say(f"    (the cryptography package makes a key and a certificate valid {VALID_DAYS} days for:")
            ctx.host.say(f"     {', '.join(n for group in names(ctx) for n in group)})")
            ctx.host.say(f"    > write {key_path(ctx.layout)} (mode 0600), owned by {ctx.options.user}")
            ctx.host.say(f"    > write {cert_path(ctx.layout)} (mode 0644)")
            return
        made = _with_cryptography(ctx) if cryptography_available() else _with_openssl(ctx)
        if made is None:  # dry run: openssl was shown, not run
            ctx.host.say(
                f"    > write {key_path(ctx.layout)} (mode 0600), owned by {ctx.options.user}: the key openssl makes"
            )
            return
        key, cert = made
        ctx.host.write(key_path(ctx.layout), key, mode=0o600, owner=ctx.owner(), secret=True)
        ctx.host.write(cert_path(ctx.layout), cert, mode=0o644, owner=ctx.owner())
        ctx.state["certificate"] = str(cert_path(ctx.layout))
        ctx.save_state()
        ctx.host.say("    (a running server uses a new certificate after its next restart)")

    def undo(self, ctx: Context) -> None:
        if ctx.state.get("certificate"):
            ctx.host.remove_tree(tls_dir(ctx.layout))


def _with_openssl(ctx: Context) -> tuple[bytes, bytes] | None:
    """``openssl req -x509`` with a config file (LibreSSL has no -addext); None in a dry run."""
    dns, ips = names(ctx)
    alt = ",".join([*(f"DNS:{n}" for n in dns), *(f"IP:{a}" for a in ips)])
    config = tls_dir(ctx.layout) / "web-cert.cnf"
    ctx.host.write(
        config,
        "# made by `macpacs install --https`: the request for tls/web.pem (openssl req -config)\n"
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n"
        f"[dn]\nCN = {dns[0]}\n"
        f"[ext]\nsubjectAltName = {alt}\nbasicConstraints = critical,CA:FALSE\n"
        "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n",
        mode=0o644,
        owner=ctx.owner(),
    )
    real = ctx.host.real
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(VALID_DAYS),
            "-config", str(real(config)),
            "-keyout", str(real(key_path(ctx.layout))), "-out", str(real(cert_path(ctx.layout)))]  # fmt: skip
    res = ctx.host.run(argv, changes=True)
    if res.skipped:
        return None
    key, cert = ctx.host.read_bytes(key_path(ctx.layout)), ctx.host.read_bytes(cert_path(ctx.layout))
    if not res.ok or not key or not cert:
        raise InstallError(
            f"openssl could not make the certificate ({res.output[-500:] or 'no output'}). Run `sudo macpacs install` "
            "again without --https to install without it, or put your own certificate in [web] tls_cert and tls_key"
        )
    return key, cert


def _with_cryptography(ctx: Context) -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dns, ips = names(ctx)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])])
    now = dt.datetime.now(dt.UTC)
    alt = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return pem_key, cert.public_bytes(serialization.Encoding.PEM)


def expiry(ctx: Context, path: Path | str) -> dt.datetime | None:
    """When the PEM certificate at ``path`` (a final path) stops being valid; None when it cannot be read."""
    if cryptography_available():
        from cryptography import x509

        data = ctx.host.read_bytes(Path(path))
        try:
            return x509.load_pem_x509_certificate(data or b"").not_valid_after_utc
        except ValueError:
            return None
    res = ctx.host.run(["openssl", "x509", "-noout", "-enddate", "-in", str(ctx.host.real(Path(path)))])
    text = res.stdout.strip()
    if not res.ok or not text.startswith("notAfter="):
        return None
    try:
        return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(text.removeprefix("notAfter=")), dt.UTC)
    except ValueError:
        return None


def findings(ctx: Context, certificates: dict[str, str]) -> list[Finding]:
    """One doctor line per configured certificate (``{setting: path}``): PASS, WARN under 30 days, FAIL expired."""
    out = []
    now = dt.datetime.now(dt.UTC)
    for setting, path in certificates.items():
        if not path:
            continue
        ours = Path(path) == cert_path(ctx.layout)
        renew = (
            f"`sudo macpacs install --user {ctx.options.user} --https` makes a new one"
            if ours
            else f"install a renewed certificate at {path} (and its key)"
        )
        ends = expiry(ctx, path)
        if ends is None:
            out.append(Finding("FAIL", f"{setting} {path} cannot be read as a PEM certificate", f"check {setting}"))
        elif ends <= now:
            out.append(Finding("FAIL", f"{setting} {path} expired on {ends:%Y-%m-%d}", f"{renew}, then restart"))
        elif ends - now < dt.timedelta(days=RENEW_DAYS):
            days = (ends - now).days
            out.append(Finding("WARN", f"{setting} {path} expires in {days} days ({ends:%Y-%m-%d})", f"{renew}"))
        else:
            out.append(Finding("PASS", f"{setting} {path} valid until {ends:%Y-%m-%d}"))
    return out
