"""Telling the service manager that the archive serves: systemd's ``READY=1`` (``Type=notify``).

One datagram to ``$NOTIFY_SOCKET`` when it is set (systemd sets it for ``Type=notify`` units);
nothing elsewhere (launchd has no readiness protocol). The supervisor speaks the same protocol
for its own unit in ``supervisor/notify.py``; the two cannot share code, because the supervisor
never imports the server (ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_ready() -> None:
    """Send ``READY=1`` if systemd asked for it; a failure is logged, never fatal."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # '@': a Linux abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(b"READY=1", address)
    except OSError as exc:
        log.warning("cannot tell systemd the server is ready (NOTIFY_SOCKET %r): %s", path, exc)
