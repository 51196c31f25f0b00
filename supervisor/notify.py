"""systemd's notify protocol without libsystemd: one AF_UNIX datagram per message.

The supervisor is the part that knows whether the server is healthy, so it is the one that feeds
systemd's watchdog: ``WATCHDOG=1`` is sent only after a round in which every probe passed, and
systemd restarts the unit when the pings stop. ``WATCHDOG_PID`` is deliberately not checked: with
``NotifyAccess=all`` the supervisor pings on behalf of the unit's main process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Variables a spawned server must not inherit: systemd would take its messages for ours.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends to ``$NOTIFY_SOCKET``; does nothing when systemd did not set it."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a Linux abstract socket, which is addressed with a leading NUL.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self) -> None:
        self._send("READY=1")

    def watchdog(self) -> None:
        if self.watchdog_seconds is not None:
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                sock.sendto(message.encode(), self.address)
            self._failed = False
        except OSError as exc:
            if not self._failed:  # one line per outage, not one per round
                log.warning("cannot notify systemd at %r (%s)", self.address, exc)
            self._failed = True
