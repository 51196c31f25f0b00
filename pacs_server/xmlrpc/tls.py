"""HTTPS on the XML-RPC port (``xmlrpc.tls``): its SSL context, and what a failed handshake means.

The port uses the web port's certificate and key (``web.tls_cert``, ``web.tls_key``), so that one
certificate, made by ``macpacs install --https`` or given by the hospital's CA, covers both HTTP
ports and clients trust it once. The files are read by ``tls_files``, as for the other TLS ports.
"""

from __future__ import annotations

import ssl

from .. import tls_files
from ..config import Settings
from ..tls_files import PemFile


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The XML-RPC port's SSL context, or None when ``xmlrpc.tls`` is off."""
    if not settings.xmlrpc.tls:
        return None
    web = settings.web
    return tls_files.server_context(PemFile("web.tls_cert", web.tls_cert), PemFile("web.tls_key", web.tls_key))


def handshake_failure(exc: BaseException) -> str:
    """What a failed handshake on the XML-RPC port means, for an administrator reading the log."""
    return tls_files.handshake_failure(
        exc,
        not_tls="call it with an https:// URL: xmlrpc.tls is on",
        untrusted="give it web.tls_cert to trust, or a certificate from a CA it trusts",
    )
