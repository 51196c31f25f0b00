"""The DICOM TLS port's SSL context, checked at start so that a bad file stops ``serve`` with one line.

PS3.15 B.1 (the Basic TLS Secure Transport Connection Profile) and BCP 195: TLS 1.2 or later,
the server authenticated by its certificate (read by ``tls_files``, as on the HTTPS ports), the
client by its own when the site asks (``dicom.tls_ca``, ``dicom.tls_require_client_cert``); a
CA file without a certificate is a ConfigError too.
"""

from __future__ import annotations

import ssl

from .. import tls_files
from ..config import ConfigError, DicomSettings
from ..tls_files import PemFile


def server_context(d: DicomSettings) -> ssl.SSLContext | None:
    """The SSL context of the TLS port, or None when TLS is off (``tls_cert``/``tls_key`` unset)."""
    if not d.tls_enabled:
        return None
    context = tls_files.server_context(PemFile("dicom.tls_cert", d.tls_cert), PemFile("dicom.tls_key", d.tls_key))
    if d.tls_ca:
        ca = tls_files.readable(PemFile("dicom.tls_ca", d.tls_ca))
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"dicom.tls_ca {ca} holds no usable PEM certificate ({exc.reason or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED if d.tls_require_client_cert else ssl.CERT_OPTIONAL
    return context


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
