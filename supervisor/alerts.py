"""Alerts: a log line always, plus an optional command and an optional webhook.

Alerts run in a background thread with hard time limits so that a slow mail relay or a dead
webhook never delays the watchdog loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from typing import Any

import requests

log = logging.getLogger(__name__)


class Alerter:
    """Delivers one JSON payload to ``--alert-command`` (stdin + env) and ``--alert-webhook``."""

    def __init__(self, command: str | None, webhook: str | None, timeout: float) -> None:
        self.command = command
        self.webhook = webhook
        self.timeout = timeout

    def alert(self, payload: dict[str, Any]) -> threading.Thread:
        log.error("ALERT %s: %s", payload.get("event"), payload.get("reason"))
        thread = threading.Thread(target=self._deliver, args=(payload,), name="alert", daemon=True)
        thread.start()
        return thread

    def _deliver(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload)
        if self.command:
            self._run_command(data, payload)
        if self.webhook:
            try:
                session = requests.Session()
                session.trust_env = False
                response = session.post(
                    self.webhook, data=data, timeout=self.timeout, headers={"Content-Type": "application/json"}
                )
                if response.status_code >= 300:
                    log.warning("alert webhook %s answered HTTP %d", self.webhook, response.status_code)
            except requests.RequestException as exc:
                log.warning("alert webhook %s failed: %s", self.webhook, exc)

    def _run_command(self, data: str, payload: dict[str, Any]) -> None:
        assert self.command is not None
        env = {
            **os.environ,
            "MACPACS_ALERT": data,
            "MACPACS_ALERT_EVENT": str(payload.get("event", "")),
            "MACPACS_ALERT_REASON": str(payload.get("reason", "")),
        }
        # Its own session, so a timeout kills the shell and everything it started.
        proc = subprocess.Popen(
            self.command,
            shell=True,
            env=env,
            start_new_session=True,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.warning("alert command timed out after %g s and was killed: %s", self.timeout, self.command)
            return
        if proc.returncode != 0:
            log.warning("alert command exited %d: %s", proc.returncode, output.strip()[:300])
