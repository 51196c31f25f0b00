"""The certificate and key of every TLS port, read at start, and what a failed handshake means.

One loader for the three ports that speak TLS (DICOM's TLS port, HTTPS on the web port, HTTPS on
the XML-RPC port), so that a bad file gives the same one-line ConfigError naming the setting, the
file and the fix wherever it is configured: a missing or unreadable file, a file that is not a
PEM certificate or key, a key that is not the certificate's, a key protected by a passphrase
(nobody is there to type it: server mode), a certificate expired or not valid yet. TLS 1.2 or
later (BCP 195; PS3.15 B.1 for DICOM).
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import NamedTuple

from .config import ConfigError


class PemFile(NamedTuple):
    """A PEM file and the setting it came from (``dicom.tls_cert``...), for the error messages."""

    setting: str
    path: str


def server_context(cert: PemFile, key: PemFile) -> ssl.SSLContext:
    """A server-side SSL context with ``cert`` and ``key`` loaded, or a ConfigError saying what is wrong."""
    return _load(cert, key)[0]


def server_files(cert: PemFile, key: PemFile) -> tuple[str, str]:
    """The certificate's and key's paths (``~`` expanded) once they pass every check of
    ``server_context``: for a server that reads the files itself (uvicorn)."""
    _context, cert_path, key_path = _load(cert, key)
    return cert_path, key_path


def _load(cert: PemFile, key: PemFile) -> tuple[ssl.SSLContext, str, str]:
    cert_path, key_path = readable(cert), readable(key)
    _check_validity(cert.setting, cert_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except _Passphrase:
        raise ConfigError(
            f"{key.setting} {key_path} is protected by a passphrase, which nobody can type at start: write it "
            f"without one (openssl pkey -in {key_path} -out KEY.nopass) and keep that file private (chmod 600)"
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"{key.setting} {key_path} is not the key of the certificate {cert.setting} {cert_path}: "
                "use the key file the certificate was made for"
            ) from None
        raise ConfigError(
            f"{cert.setting} {cert_path} / {key.setting} {key_path} cannot be used ({exc.reason or exc}): "
            "both must be PEM files, the certificate first in its file"
        ) from None
    return context, cert_path, key_path


def readable(pem: PemFile) -> str:
    """``pem``'s path, once it is known to be a file this account can read."""
    path = Path(pem.path).expanduser()
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{pem.setting} {path} does not exist: give the path of the PEM file") from None
    except IsADirectoryError:
        raise ConfigError(f"{pem.setting} {path} is a folder: give the path of the PEM file") from None
    except PermissionError:
        raise ConfigError(
            f"{pem.setting} {path} cannot be read by the account running macpacs: make it readable by that "
            "account only (chown and chmod 600)"
        ) from None
    return str(path)


class _Passphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Passphrase


def _check_validity(setting: str, cert: str) -> None:
    """Refuse a certificate that has expired or is not valid yet: every client would refuse it."""
    try:
        # The standard library's own PEM decoder (what getpeercert returns, from a file); no
        # public function reads a certificate file's dates without a third-party package.
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except ssl.SSLError:
        raise ConfigError(f"{setting} {cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    now = dt.datetime.now(dt.UTC)
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), dt.UTC)
    not_before = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notBefore"]), dt.UTC)
    if not_after <= now:
        raise ConfigError(
            f"{setting} {cert} expired on {not_after:%Y-%m-%d %H:%M} UTC: clients refuse it; "
            "install a renewed certificate (and its key), then start again"
        )
    if not_before > now:
        raise ConfigError(
            f"{setting} {cert} is valid only from {not_before:%Y-%m-%d %H:%M} UTC: check this Mac's clock "
            "(System Settings > General > Date & Time) or use a certificate valid now"
        )


def handshake_failure(exc: BaseException, *, not_tls: str, untrusted: str, otherwise: str = "") -> str:
    """What a failed server-side handshake means, for an administrator reading the log.

    ``not_tls`` ends the line for a client that spoke plain text to a TLS port, ``untrusted`` for
    a client that gave up on our certificate, ``otherwise`` (if given) the catch-all.
    """
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text or "UNKNOWN_PROTOCOL" in text:
        return f"it does not speak TLS ({not_tls})"
    if "UNSUPPORTED_PROTOCOL" in text or "VERSION_TOO_LOW" in text:
        return f"it offers only TLS versions below 1.2, which are no longer safe (BCP 195) ({text})"
    if "ALERT" in text:
        return (
            "the client ended the handshake, most likely because it does not trust our certificate: "
            f"{untrusted} ({text})"
        )
    return f"TLS handshake failed: {text or type(exc).__name__}" + (f" ({otherwise})" if otherwise else "")
