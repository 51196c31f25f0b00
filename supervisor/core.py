"""The watchdog loop: probe, count failed rounds, stop a hung server, let it come back.

States, each change logged as exactly one line:

- ``starting``: the server is given ``--startup-grace`` to answer; failures are not counted.
- ``healthy``: the last round passed.
- ``failing``: rounds are failing and being counted towards ``--failures`` (or, with a heartbeat,
  the heartbeat is missing and ``--hung-after`` is running out).
- ``busy``: with a heartbeat only: probes time out while the heartbeat is fresh. Nothing is
  counted until that has lasted ``--busy-limit``.
- ``restarting``: we stopped the server (and, in spawn mode, start it again); failures are not
  counted until it answers or ``--startup-grace`` runs out.
- ``crash-loop``: more than ``--max-restarts`` restarts within ``--restart-window``: an alert went
  out, and nothing is killed or started until the window has room again.
- ``stopped``: the supervisor itself is exiting.

With ``--heartbeat-url`` the loop turns every ``--heartbeat-interval``: each turn asks for the
heartbeat (GET /heartbeat: the server's own parts' ages, answered on its event loop), and the
other probes run as a round in the background every ``--interval``. A server is hung when no good
heartbeat came for ``--hung-after`` seconds: it is stopped at once, without counting rounds. A
probe that times out while the heartbeat is fresh is a busy server, not counted; a wrong answer
(an HTTP 500, a refused association) is counted as before. Free space from the heartbeat feeds
the ``low-space`` alert (``--low-space-mb``), once per crossing.

In kill mode the server is stopped only once proven to be this installation's (``process.py``);
the proof is renewed every round, shown in the status file and logged when it changes, and a
server that fails but cannot be proven is left alone, with an error line and one alert.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import process
from .alerts import Alerter
from .notify import NOTIFY_VARIABLES, Notifier
from .probes import HeartbeatProbe, ProbeResult, ProbeRunner

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
LOW_SPACE_REARM = 1.1  # the low-space alert goes again once free space was back above threshold x this


@dataclass
class Settings:
    """Everything the supervisor knows about the server: only what its command line told it."""

    runner: ProbeRunner
    interval: float = 15.0
    failures: int = 3
    startup_grace: float = 60.0
    pid_file: Path | None = None
    data_dir: Path | None = None  # the server's data folder; None: the PID file's folder
    process_match: re.Pattern[str] = field(default_factory=lambda: re.compile(r"macpacs serve\b"))
    mode: str = "kill"
    command: list[str] = field(default_factory=list)
    status_file: Path | None = None
    max_restarts: int = 5
    restart_window: float = 600.0  # seconds
    kill_grace: float = 5.0
    backoff_max: float = 60.0
    # The heartbeat (None: the rounds alone decide, as before): a runner with one HeartbeatProbe.
    heartbeat: ProbeRunner | None = None
    heartbeat_interval: float = 1.0
    hung_after: float = 5.0
    busy_limit: float = 300.0
    low_space_mb: int = 0  # 0: no low-space alert


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def _summary(results: list[ProbeResult]) -> str:
    return "; ".join(f"{r.probe}: {'ok' if r.ok else r.detail}" for r in results)


def write_atomically(path: Path, data: str) -> None:
    """Readers (status page, ``macpacs doctor``) must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        alerter: Alerter,
        notifier: Notifier | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.s = settings
        self.alerter = alerter
        self.notifier = notifier or Notifier()
        self.stop_event = stop or threading.Event()
        self.state = "starting"
        self.state_since = time.time()
        self.consecutive_failures = 0
        self.restarts: deque[float] = deque()  # wall-clock times of restarts, last 24 h
        self.results: list[ProbeResult] = []
        self.last_check: float | None = None
        self.grace_until = time.monotonic() + settings.startup_grace
        self.fault_at: float | None = None  # monotonic time of the first failed round of this episode
        # spawn mode
        self.child: subprocess.Popen[bytes] | None = None
        self.respawn_at: float | None = None
        self.unhealthy_restarts = 0  # restarts since the server was last healthy: the backoff exponent
        self.crash_loop_alerted = False
        # kill mode: the last proof of the server's identity, and whether this episode alerted
        self.identity: process.Identity | None = None
        self.unproven_alerted = False
        # with a heartbeat
        self.last_good_beat = time.monotonic()
        self.full_results: list[ProbeResult] = []
        self.verdict: str | None = None  # of the last background round: "ok", "busy" or "failed"
        self.slow_since: float | None = None
        self._round: threading.Thread | None = None
        self._round_results: list[ProbeResult] = []
        self._stale_round = False
        self._next_round = 0.0
        self.free_mb: int | None = None
        self.low_space_alerted = False

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        log.info(
            "supervising (%s mode): %d probes every %g s, action after %d failed rounds",
            self.s.mode,
            len(self.s.runner.probes),
            self.s.interval,
            self.s.failures,
        )
        if self.s.mode == "spawn":
            self._spawn(initial=True)
        elif self.s.pid_file is None:
            log.warning(
                "kill mode without --pid-file: no process can be proven to be the server, so none will "
                "ever be stopped (failures are logged, alerted and reported to systemd's watchdog only)"
            )
        self.notifier.ready()
        if self.notifier.watchdog_seconds and self.notifier.watchdog_seconds < 2 * self.s.interval:
            log.warning(
                "WatchdogSec=%gs is shorter than twice --interval %g s: systemd will kill us between probes",
                self.notifier.watchdog_seconds,
                self.s.interval,
            )
        self._write_status()
        period = self.s.heartbeat_interval if self.s.heartbeat is not None else self.s.interval
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.tick()
            wake = started + period
            if self.respawn_at is not None:
                wake = min(wake, self.respawn_at)
            self.stop_event.wait(max(0.0, wake - time.monotonic()))
        self._shutdown()
        return 0

    def tick(self) -> None:
        """One round: notice a dead child, probe, count, maybe act; then write the status file."""
        if self.s.mode == "spawn" and not self._child_running():
            self._write_status()
            return
        if self.s.heartbeat is not None:
            self._tick_with_heartbeat()
            return
        results = self.s.runner.run_round()
        self.results, self.last_check = results, time.time()
        if self.s.mode == "kill":
            self._identify()
        if all(r.ok for r in results):
            self._healthy_round()
        elif time.monotonic() < self.grace_until and self.state in ("starting", "restarting"):
            pass  # still inside --startup-grace: not counted
        else:
            self._failed_round(results)
        self._write_status()

    # -- with a heartbeat ----------------------------------------------------------------------

    def _tick_with_heartbeat(self) -> None:
        """One turn: the heartbeat now; the other probes' round collected (or started) in the background."""
        assert self.s.heartbeat is not None
        before = (self.state, bool(self.results) and self.results[0].ok)
        beat = self.s.heartbeat.run_round()[0]
        now = time.monotonic()
        if beat.ok:
            self.last_good_beat = now
        full = self._background_round(now)
        if full is not None:
            self.full_results = full
            if self.s.mode == "kill":
                self._identify()
        self.results, self.last_check = [beat, *self.full_results], time.time()
        self._check_free_space()
        in_grace = now < self.grace_until and self.state in ("starting", "restarting")
        missing_for = now - self.last_good_beat
        if not beat.ok and missing_for >= self.s.hung_after and not in_grace:
            self._act(
                f"hung: no good heartbeat for {missing_for:.1f} s (--hung-after {self.s.hung_after:g}): {beat.detail}"
            )
            # Whatever came of it, the next decision is --hung-after from now (or after the grace),
            # and a round still asking the old server is not about the new one.
            self.last_good_beat = time.monotonic()
            self.verdict, self.full_results, self.slow_since = None, [], None
            self._stale_round = self._round is not None
        else:
            if full is not None:
                self.verdict = self._judge(full, now)
                if self.verdict == "failed" and not in_grace:
                    self._failed_round(full)
            if not beat.ok:
                if self.state in ("healthy", "busy"):
                    self.fault_at = self.fault_at or now
                    self._transition("failing", f"heartbeat: {beat.detail}")
            elif self.verdict == "ok":
                self._healthy_round()
            elif self.verdict == "busy":
                self._busy_round(full)
        if full is not None or (self.state, beat.ok) != before:
            self._write_status()

    def _background_round(self, now: float) -> list[ProbeResult] | None:
        """The other probes' results once their round has ended; starts the next one when due."""
        if self._round is not None:
            if self._round.is_alive():
                return None
            self._round = None
            if self._stale_round:
                self._stale_round = False
                return None
            return self._round_results
        if now >= self._next_round:
            self._next_round = now + self.s.interval
            self._round_results = results = []
            self._round = threading.Thread(
                target=lambda: results.extend(self.s.runner.run_round()), name="probe-round", daemon=True
            )
            self._round.start()
        return None

    def _judge(self, results: list[ProbeResult], now: float) -> str:
        """A round's verdict: ``ok``; ``busy`` (only time-outs, heartbeat fresh, within --busy-limit); ``failed``."""
        failed = [r for r in results if not r.ok]
        if not failed or any(not r.timed_out for r in failed):
            self.slow_since = None
            return "failed" if failed else "ok"
        if now - self.last_good_beat < self.s.hung_after:
            self.slow_since = self.slow_since or now
            if now - self.slow_since < self.s.busy_limit:
                return "busy"
            log.warning(
                "probes have been timing out for %.0f s (--busy-limit %g s) although the heartbeat is fresh: "
                "counting it as a failed round",
                now - self.slow_since,
                self.s.busy_limit,
            )
        return "failed"

    def _busy_round(self, results: list[ProbeResult] | None) -> None:
        self.notifier.watchdog()  # alive: the heartbeat says so
        self.consecutive_failures = 0
        if self.state != "busy" and results is not None:
            self._transition("busy", f"probes slow but the heartbeat is fresh, not counted: {_summary(results)}")

    def _check_free_space(self) -> None:
        """The low-space alert: once when free space falls under --low-space-mb, again only after it recovered."""
        assert self.s.heartbeat is not None
        probe = self.s.heartbeat.probes[0]
        free = probe.answer.get("free_mb") if isinstance(probe, HeartbeatProbe) else None
        if not isinstance(free, int) or isinstance(free, bool):
            return
        self.free_mb = free
        threshold = self.s.low_space_mb
        if not threshold:
            return
        if free < threshold and not self.low_space_alerted:
            self.low_space_alerted = True
            self.alerter.alert(
                self._alert_payload(
                    "low-space",
                    f"only {free} MB free where the server stores instances (--low-space-mb {threshold}). "
                    "The server refuses new images when space runs out: free space on that volume or add "
                    "storage now",
                )
            )
        elif free >= threshold * LOW_SPACE_REARM and self.low_space_alerted:
            self.low_space_alerted = False
            log.info(
                "free space is back to %d MB (--low-space-mb %d): the low-space alert is armed again", free, threshold
            )

    def _healthy_round(self) -> None:
        self.notifier.watchdog()
        self.consecutive_failures = 0
        self.unhealthy_restarts = 0
        self.crash_loop_alerted = False
        self.unproven_alerted = False
        if self.state != "healthy":
            detail = "all probes pass"
            if self.fault_at is not None:
                detail += f"; {time.monotonic() - self.fault_at:.1f} s after the first failed round"
            self._transition("healthy", detail)
            self.fault_at = None

    def _failed_round(self, results: list[ProbeResult]) -> None:
        self.consecutive_failures += 1
        if self.fault_at is None:
            self.fault_at = time.monotonic()
        if self.state == "crash-loop":
            if not self._restart_allowed():
                return
        elif self.state != "failing":
            self._transition("failing", _summary(results))
        else:
            log.warning("round failed (%d/%d): %s", self.consecutive_failures, self.s.failures, _summary(results))
        if self.consecutive_failures >= self.s.failures:
            self._act(f"{self.consecutive_failures} consecutive failed rounds: {_summary(results)}")

    # -- acting --------------------------------------------------------------------------------

    def _restart_allowed(self) -> bool:
        return self._restart_hold() is None

    def _restart_hold(self) -> float | None:
        """While the crash-loop limit is reached: the wall time a restart is allowed again (alerts once)."""
        window_start = time.time() - self.s.restart_window
        recent = [t for t in self.restarts if t >= window_start]
        if len(recent) < self.s.max_restarts:
            return None
        resume = recent[0] + self.s.restart_window
        if self.state != "crash-loop":
            self._transition(
                "crash-loop",
                f"{len(recent)} restarts within {self.s.restart_window / 60:g} min: no restart before {_iso(resume)}",
            )
        if not self.crash_loop_alerted:
            self.crash_loop_alerted = True
            self.alerter.alert(
                self._alert_payload(
                    "crash-loop",
                    f"crash loop: {len(recent)} restarts within {self.s.restart_window / 60:g} min "
                    f"(--max-restarts {self.s.max_restarts}); holding off until {_iso(resume)}",
                )
            )
        return resume

    def _act(self, reason: str) -> None:
        if not self._restart_allowed():
            return
        self.consecutive_failures = 0
        if self.s.mode == "spawn":
            target = process.own_process(self.child.pid) if self.child is not None else None
            if target is None:
                log.error("server is unhealthy (%s) but the server this supervisor started is gone", reason)
                return
        else:
            identity = self._identify()
            if identity.process is None:
                self._cannot_stop(reason, identity)
                return
            target = identity.process
        outcome = process.terminate(target, self.s.kill_grace, self.child)
        self.grace_until = time.monotonic() + self.s.startup_grace
        if self.s.mode == "spawn":
            self.child = None
            self._transition("restarting", f"stopped the server ({reason}): {outcome}")
            self._schedule_respawn()
        else:
            self._record_restart()
            self._transition("restarting", f"stopped the server ({reason}): {outcome}; the service manager restarts it")

    def _identify(self) -> process.Identity:
        """Prove the server's identity again (kill mode); log when the outcome changes."""
        identity = process.prove_server(self.s.pid_file, self.s.data_dir, self.s.process_match)
        if self.identity is None or identity.detail != self.identity.detail:
            level = logging.INFO if identity.proven else logging.WARNING
            log.log(level, "server identity: %s", identity.describe())
        self.identity = identity
        return identity

    def _cannot_stop(self, reason: str, identity: process.Identity) -> None:
        """A failing server that is not proven to be ours: leave it, say so, alert once per episode."""
        message = (
            f"server is unhealthy ({reason}) but {identity.describe()}: nothing stopped. Check that "
            "--pid-file and --data-dir name this installation's server, and restart it by hand if it hangs"
        )
        log.error("%s", message)
        if not self.unproven_alerted:
            self.unproven_alerted = True
            self.alerter.alert(self._alert_payload("cannot-stop", message))

    def _record_restart(self) -> None:
        now = time.time()
        self.restarts.append(now)
        while self.restarts and self.restarts[0] < now - DAY:
            self.restarts.popleft()

    # -- spawn mode ----------------------------------------------------------------------------

    def _child_running(self) -> bool:
        """In spawn mode: True when a child runs; otherwise handles its exit or a due respawn."""
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return True
            self.child = None
            self.results, self.last_check = [], time.time()
            if self.state == "restarting":  # died again before becoming healthy: not a new state
                log.warning("server exited with code %d before answering", code)
            else:
                self._transition("restarting", f"server exited with code {code}")
            self._schedule_respawn()
            return False
        if self.respawn_at is None or time.monotonic() < self.respawn_at:
            return False
        resume = self._restart_hold()
        if resume is not None:
            self.respawn_at = time.monotonic() + max(0.0, resume - time.time())
            return False
        self._spawn(initial=False)
        return self.child is not None

    def _schedule_respawn(self) -> None:
        # 0 s after a healthy spell, then 1, 2, 4 … s while the server never becomes healthy.
        delay = 0.0 if self.unhealthy_restarts == 0 else min(self.s.backoff_max, 2.0 ** (self.unhealthy_restarts - 1))
        self.respawn_at = time.monotonic() + delay
        if delay:
            log.info(
                "starting the server again in %g s (restart %d since it was last healthy)",
                delay,
                self.unhealthy_restarts + 1,
            )

    def _spawn(self, *, initial: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k not in NOTIFY_VARIABLES}
        try:
            # Its own session: a Ctrl-C meant for the supervisor does not reach the server behind its back.
            self.child = subprocess.Popen(self.s.command, env=env, start_new_session=True)
        except OSError as exc:
            log.error("cannot start %s: %s", self.s.command[0], exc)
            self.child = None
        self.respawn_at = None
        if not initial:
            self.unhealthy_restarts += 1
            self._record_restart()
            if self.state == "crash-loop":
                self._transition("restarting", "crash-loop hold-off is over: starting the server again")
        self.grace_until = time.monotonic() + self.s.startup_grace
        if self.child is not None:
            log.info("started the server: PID %d: %s", self.child.pid, " ".join(self.s.command))
        else:
            self._schedule_respawn()

    # -- state, status, shutdown ---------------------------------------------------------------

    def _transition(self, state: str, detail: str) -> None:
        level = logging.INFO if state in ("healthy", "stopped") else logging.WARNING
        log.log(level, "%s -> %s: %s", self.state, state, detail)
        self.state, self.state_since = state, time.time()

    def _alert_payload(self, event: str, reason: str) -> dict[str, Any]:
        return {
            "event": event,
            "reason": reason,
            "host": socket.gethostname(),
            "time": _iso(time.time()),
            "state": self.state,
            "restarts_24h": len(self.restarts),
            "last_results": [r.as_dict() for r in self.results],
        }

    def status(self) -> dict[str, Any]:
        cutoff = time.time() - DAY
        return {
            "state": self.state,
            "since": _iso(self.state_since),
            "mode": self.s.mode,
            "supervisor_pid": os.getpid(),
            "server_pid": self._server_pid(),
            "server_identity": self._identity_text(),
            "last_check": _iso(self.last_check),
            "results": [r.as_dict() for r in self.results],
            "healthy": bool(self.results) and all(r.ok for r in self.results),
            "consecutive_failures": self.consecutive_failures,
            "failures_before_action": self.s.failures,
            "restarts_24h": sum(1 for t in self.restarts if t >= cutoff),
            "last_restart": _iso(self.restarts[-1]) if self.restarts else None,
            **(
                {
                    "heartbeat_age_s": round(time.monotonic() - self.last_good_beat, 1),
                    "hung_after_s": self.s.hung_after,
                    "free_mb": self.free_mb,
                }
                if self.s.heartbeat is not None
                else {}
            ),
        }

    def _server_pid(self) -> int | None:
        if self.s.mode == "spawn":
            return self.child.pid if self.child is not None else None
        return self.identity.process.pid if self.identity and self.identity.process else None

    def _identity_text(self) -> str:
        if self.s.mode == "spawn":
            return f"started by this supervisor: PID {self.child.pid}" if self.child else "no server running"
        return self.identity.describe() if self.identity else "not checked yet"

    def _write_status(self) -> None:
        if self.s.status_file is None:
            return
        try:
            write_atomically(self.s.status_file, json.dumps(self.status(), indent=2) + "\n")
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.s.status_file, exc)

    def request_stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        self.notifier.stopping()
        if self.child is not None:
            # Spawn mode: we own this server, and nobody else would stop or supervise it.
            target = process.own_process(self.child.pid)
            outcome = process.terminate(target, self.s.kill_grace, self.child) if target else "already gone"
            self._transition("stopped", f"supervisor stopping; stopped the server it started: {outcome}")
            self.child = None
        else:
            self._transition("stopped", "supervisor stopping; the server is left running")
        self._write_status()
