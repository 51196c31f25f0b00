"""HTTPS on the XML-RPC port (``xmlrpc.tls``): its SSL context, and what a failed handshake means.

The port uses the web port's certificate and key (``web.tls_cert``, ``web.tls_key``), so that one
certificate, made by ``macpacs install --https`` or given by the hospital's CA, covers both HTTP
ports and clients trust it once. The web listener reads the same files first and stops the start
when they are unusable; the errors here name the XML-RPC setting too, for a config that has
``xmlrpc.tls`` on while the web port is configured otherwise. TLS 1.2 or later (BCP 195).
"""

from __future__ import annotations

import ssl

from ..config import ConfigError, Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The XML-RPC port's SSL context, or None when ``xmlrpc.tls`` is off."""
    if not settings.xmlrpc.tls:
        return None
    cert, key = settings.web.tls_cert, settings.web.tls_key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Passphrase:
        raise ConfigError(
            f"xmlrpc.tls: web.tls_key {key} is protected by a passphrase, which nobody can type at start: "
            f"write it without one (openssl pkey -in {key} -out KEY.nopass) and keep that file private (chmod 600)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"xmlrpc.tls: web.tls_cert {cert} / web.tls_key {key} cannot be used "
            f"({getattr(exc, 'reason', None) or exc}): both must be readable PEM files, the key the certificate's"
        ) from None
    return context


class _Passphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Passphrase


def handshake_failure(exc: BaseException) -> str:
    """What a failed server-side handshake means, for an administrator reading the log."""
    text = str(exc)
    if "HTTP_REQUEST" in text or "WRONG_VERSION_NUMBER" in text or "UNKNOWN_PROTOCOL" in text:
        return "it does not speak TLS"
    if "UNSUPPORTED_PROTOCOL" in text or "VERSION_TOO_LOW" in text:
        return f"it offers only TLS versions below 1.2, which are no longer safe ({text})"
    if "ALERT" in text:
        return (
            "the client ended the handshake, most likely because it does not trust our certificate: "
            f"give it web.tls_cert to trust, or a certificate from a CA it trusts ({text})"
        )
    return f"TLS handshake failed: {text or type(exc).__name__}"
