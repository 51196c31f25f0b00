"""Linux: the server and the supervisor as systemd system units.

Reference, "systemd (Linux port)": Restart=always (restarts after SIGKILL too), WatchdogSec with
the supervisor's sd_notify pings (NotifyAccess=all), StartLimit* in [Unit]. With --root the units
are written and enabled offline (`systemctl --root=DIR enable`), never started.
"""

from __future__ import annotations

from pathlib import Path

from . import render, schedule
from .layout import SERVER_UNIT, SUPERVISOR_UNIT, SYSTEMD_DIR
from .schedule import VERIFY_TIMER
from .steps import Check, Context, InstallError, Step

# Enabled and (re)started: the weekly verify's service is started by its timer, never enabled.
UNITS = (SERVER_UNIT, SUPERVISOR_UNIT, VERIFY_TIMER)


def unit_files(ctx: Context) -> list[tuple[str, Path, str]]:
    """(unit name, path, content) of the server, the supervisor and the weekly verify (service and timer)."""
    services = [(service.unit, render.systemd_unit(service)) for service in ctx.services()]
    verify = schedule.systemd_units(schedule.verify_job(ctx.layout, ctx.options.user))
    return [(name, SYSTEMD_DIR / name, text) for name, text in (*services, *verify)]


class Systemd(Step):
    key = "systemd"
    title = "systemd: server and supervisor units, weekly verify timer"

    def skip_reason(self, ctx: Context) -> str | None:
        return None if ctx.options.target == "linux" else "not Linux"

    def systemctl(self, ctx: Context, *args: str) -> list[str]:
        root = [f"--root={ctx.host.root}"] if ctx.options.root is not None else []
        return ["systemctl", *root, *args]

    def check(self, ctx: Context) -> Check:
        if not all(ctx.host.read_text(path) == text for _u, path, text in unit_files(ctx)):
            return Check(False, "unit files missing or different")
        enabled = ctx.host.run(self.systemctl(ctx, "is-enabled", *UNITS))
        if not enabled.ok:
            return Check(False, "not enabled")
        if ctx.options.root is not None:
            ctx.not_started = "--root: enabled offline, not started"
            return Check(True, f"{', '.join(UNITS)} enabled (offline, --root)")
        active = ctx.host.run(self.systemctl(ctx, "is-active", *UNITS))
        if not active.ok:
            return Check(False, "not running")
        return Check(True, f"{', '.join(UNITS)} enabled and running")

    def apply(self, ctx: Context) -> None:
        for _unit, path, text in unit_files(ctx):
            ctx.host.write(path, text, mode=0o644, owner=(0, 0))
        if ctx.options.root is not None:
            self._run(ctx, "enable", *UNITS)
            ctx.not_started = "--root: enabled offline, not started"
            return
        self._run(ctx, "daemon-reload")
        self._run(ctx, "enable", *UNITS)
        # restart, not start: a changed unit file must take effect now
        self._run(ctx, "restart", *UNITS)

    def _run(self, ctx: Context, *args: str) -> None:
        res = ctx.host.run(self.systemctl(ctx, *args), changes=True)
        if not res.ok and not res.skipped:
            raise InstallError(
                f"`{' '.join(self.systemctl(ctx, *args))}` failed: {res.output}\n"
                f"`systemctl status {SERVER_UNIT}` shows why, {ctx.services()[0].stderr_path} what the server said; "
                "then run `macpacs install` again."
            )

    def undo(self, ctx: Context) -> None:
        if ctx.options.root is not None:
            ctx.host.run(self.systemctl(ctx, "disable", *UNITS), changes=True)
        else:
            ctx.host.run(self.systemctl(ctx, "disable", "--now", *UNITS), changes=True)
        for _unit, path, _text in unit_files(ctx):
            ctx.host.remove(path)
        if ctx.options.root is None:
            ctx.host.run(self.systemctl(ctx, "daemon-reload"), changes=True)
