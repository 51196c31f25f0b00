"""The DICOM TLS port's SSL context, checked at start so that a bad file stops ``serve`` with one line.

PS3.15 B.1 (the Basic TLS Secure Transport Connection Profile) and BCP 195: TLS 1.2 or later,
the server authenticated by its certificate, the client by its own when the site asks
(``dicom.tls_ca``, ``dicom.tls_require_client_cert``). Every problem an administrator can cause
is a ConfigError naming the setting, the file and the fix: a missing or unreadable file, a file
that is not a PEM certificate or key, a key that is not the certificate's, a key protected by a
passphrase (nobody is there to type it), a certificate expired or not yet valid, a CA file
without a certificate.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from ..config import ConfigError, DicomSettings


def server_context(d: DicomSettings) -> ssl.SSLContext | None:
    """The SSL context of the TLS port, or None when TLS is off (``tls_cert``/``tls_key`` unset)."""
    if not d.tls_enabled:
        return None
    cert, key = _readable("dicom.tls_cert", d.tls_cert), _readable("dicom.tls_key", d.tls_key)
    _check_validity(cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Passphrase:
        raise ConfigError(
            f"dicom.tls_key {key} is protected by a passphrase, which nobody can type at start: "
            f"write it without one (openssl pkey -in {key} -out KEY.nopass) and keep that file private (chmod 600)"
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"dicom.tls_key {key} is not the key of the certificate dicom.tls_cert {cert}: "
                "use the key file the certificate was made for"
            ) from None
        raise ConfigError(
            f"dicom.tls_cert {cert} / dicom.tls_key {key} cannot be used ({exc.reason or exc}): "
            "both must be PEM files, the certificate first in its file"
        ) from None
    if d.tls_ca:
        ca = _readable("dicom.tls_ca", d.tls_ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"dicom.tls_ca {ca} holds no usable PEM certificate ({exc.reason or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED if d.tls_require_client_cert else ssl.CERT_OPTIONAL
    return context


class _Passphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Passphrase


def _readable(setting: str, name: str) -> str:
    path = Path(name).expanduser()
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{setting} {path} does not exist: give the path of the PEM file") from None
    except IsADirectoryError:
        raise ConfigError(f"{setting} {path} is a folder: give the path of the PEM file") from None
    except PermissionError:
        raise ConfigError(
            f"{setting} {path} cannot be read by the account running macpacs: make it readable by that "
            "account only (chown and chmod 600)"
        ) from None
    return str(path)


def _check_validity(cert: str) -> None:
    """Refuse a certificate that has expired or is not valid yet: every client would refuse it."""
    try:
        # The standard library's own PEM decoder (what getpeercert returns, from a file); no
        # public function reads a certificate file's dates without a third-party package.
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except ssl.SSLError:
        raise ConfigError(f"dicom.tls_cert {cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    now = dt.datetime.now(dt.UTC)
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), dt.UTC)
    not_before = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notBefore"]), dt.UTC)
    if not_after <= now:
        raise ConfigError(
            f"dicom.tls_cert {cert} expired on {not_after:%Y-%m-%d %H:%M} UTC: clients refuse it; "
            "install a renewed certificate (and its key), then start again"
        )
    if not_before > now:
        raise ConfigError(
            f"dicom.tls_cert {cert} is valid only from {not_before:%Y-%m-%d %H:%M} UTC: check this Mac's clock "
            "(System Settings > General > Date & Time) or use a certificate valid now"
        )


def listening_line(d: DicomSettings) -> str:
    """The TLS port's part of the listener's start-up log line."""
    if not d.tls_enabled:
        return ""
    clients = "required" if d.tls_require_client_cert else "verified when presented" if d.tls_ca else "not asked for"
    return f"; DICOM TLS on port {d.tls_port} (client certificates {clients})"


def peer_description(sock: object) -> str:
    """' over TLS (client certificate CN=...)' for the association log line; '' on the plain port."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    cert = sock.getpeercert()
    if not cert:
        return f" over {sock.version()}, no client certificate"
    subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    return f" over {sock.version()}, client certificate {subject or '(no subject)'}"
