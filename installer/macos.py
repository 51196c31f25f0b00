"""macOS steps: power, automatic login, launchd jobs.

Every command and its semantics come from shared/reference/osirix-and-macos.md ("macOS: exact
commands"); the section is cited next to each use.
"""

from __future__ import annotations

from pathlib import Path

from . import kcpassword, render, schedule
from .layout import KCPASSWORD, LAUNCH_DAEMONS, LOGINWINDOW, SERVER_LABEL, SUPERVISOR_LABEL
from .schedule import VERIFY_LABEL
from .steps import Check, Context, InstallError, Step

# -- power ----------------------------------------------------------------------------------------
# Reference, "Power and sleep": `pmset -a autorestart 1`, `pmset -a sleep 0 disksleep 0`,
# verified by parsing `pmset -g`.
POWER = {"autorestart": "1", "sleep": "0", "disksleep": "0"}


def pmset_values(text: str) -> dict[str, str]:
    """Settings from ``pmset -g``: lines `` name   value [(comment)]`` under a header."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            continue  # "System-wide power settings:", "Currently in use:"
        parts = line.split()
        if len(parts) >= 2:
            values[parts[0]] = parts[1]
    return values


def power_differences(ctx: Context) -> dict[str, str | None] | None:
    """{setting: current value} of the settings not yet as wanted; None when not checkable."""
    res = ctx.host.run(["pmset", "-g"])
    if res.skipped:
        return None
    current = pmset_values(res.stdout)
    return {k: current.get(k) for k, v in POWER.items() if current.get(k) != v}


class Power(Step):
    key = "power"
    title = "power: restart after a power cut, never sleep"

    def skip_reason(self, ctx: Context) -> str | None:
        if ctx.options.target != "macos":
            return 'Linux: power-on after a power cut is a BIOS/UEFI setting ("AC power recovery"); set it there'
        return None

    def check(self, ctx: Context) -> Check:
        diff = power_differences(ctx)
        if diff is not None and not diff:
            return Check(True, "autorestart 1, sleep 0, disksleep 0")
        return Check(False, "to set: " + ", ".join(diff) if diff else "not checked")

    def apply(self, ctx: Context) -> None:
        diff = power_differences(ctx)
        todo = diff if diff is not None else dict.fromkeys(POWER)
        ctx.state.setdefault("power_previous", {k: v for k, v in todo.items() if v is not None})
        ctx.save_state()
        argv = ["pmset", "-a"]
        for name in todo:
            argv += [name, POWER[name]]
        res = ctx.host.run(argv, changes=True)
        if res.skipped:
            return
        left = power_differences(ctx)
        if not res.ok or left:
            raise InstallError(
                f"pmset did not take the settings {', '.join(left or todo)} ({res.output or 'no output'}).\n"
                'Set them in System Settings > Energy ("Start up automatically after a power failure", '
                '"Prevent automatic sleeping"); `pmset -g cap` lists what this Mac supports.'
            )

    def undo(self, ctx: Context) -> None:
        previous = ctx.state.get("power_previous") or {}
        if not previous:
            ctx.host.say("    power settings were already as wanted before install: left as they are")
            return
        argv = ["pmset", "-a"]
        for name in POWER:  # a fixed order (the state file sorts its keys)
            if name in previous:
                argv += [name, str(previous[name])]
        ctx.host.run(argv, changes=True)


# -- auto-login -------------------------------------------------------------------------------------
# Reference, "Automatic login": sysadminctl first, always verified; the manual route is
# /etc/kcpassword (root:wheel 600) plus `defaults write ... autoLoginUser -string U`.
def autologin_user(ctx: Context) -> str | None:
    res = ctx.host.run(["defaults", "read", LOGINWINDOW, "autoLoginUser"])
    return res.stdout.strip() if res.ok else None


def autologin_done(ctx: Context) -> bool:
    """The login window names our user and /etc/kcpassword encodes the password."""
    if autologin_user(ctx) != ctx.options.user:
        return False
    content = ctx.host.read_bytes(KCPASSWORD)
    if content is None:
        return False
    return ctx.options.password is None or kcpassword.matches(content, ctx.options.password)


class AutoLogin(Step):
    key = "autologin"
    title = "auto-login: the user logs in by itself after a restart"

    def skip_reason(self, ctx: Context) -> str | None:
        if ctx.options.target != "macos":
            return "Linux: system units start at boot without a login"
        if ctx.options.mode == "daemon":
            return "--mode daemon: LaunchDaemons start at boot without a login"
        return None

    def check(self, ctx: Context) -> Check:
        if autologin_done(ctx):
            return Check(True, f"automatic login as {ctx.options.user}")
        return Check(False)

    def apply(self, ctx: Context) -> None:
        user, password = ctx.options.user, ctx.options.password or ""
        if "autologin_previous" not in ctx.state:
            ctx.state["autologin_previous"] = autologin_user(ctx)
        ctx.state["autologin_set"] = True
        ctx.save_state()
        # `-password -` makes sysadminctl prompt; without a terminal (our seam starts it in a new
        # session) the prompt reads stdin, so the password never appears in argv.
        res = ctx.host.run(
            ["sysadminctl", "-autologin", "set", "-userName", user, "-password", "-"],
            password + "\n",
            changes=True,
            secret_input=True,
        )
        if ctx.host.dry_run:
            ctx.host.say("    (then verify; if sysadminctl had no effect, as over SSH on Apple silicon:)")
        elif autologin_done(ctx):
            return
        else:
            ctx.host.say(
                f"    sysadminctl did not take effect (exit {res.returncode}: {res.output or 'no output'}); "
                "writing /etc/kcpassword directly"
            )
        ctx.host.write(KCPASSWORD, kcpassword.encode(password), mode=0o600, owner=(0, 0), secret=True)
        ctx.host.run(["defaults", "write", LOGINWINDOW, "autoLoginUser", "-string", user], changes=True)
        if not ctx.host.dry_run and not autologin_done(ctx):
            raise InstallError(
                "automatic login could not be set. Set it by hand: System Settings > Users & Groups > "
                f'"Automatically log in as" {user}, then run `macpacs install` again.'
            )

    def undo(self, ctx: Context) -> None:
        if not ctx.state.get("autologin_set"):
            ctx.host.say("    automatic login was not set by macpacs: left as it is")
            return
        # Reference, manual route step 4.
        ctx.host.remove(KCPASSWORD)
        ctx.host.run(["defaults", "delete", LOGINWINDOW, "autoLoginUser"], changes=True)


# -- launchd ------------------------------------------------------------------------------------------
NOT_LOADED = 113  # `launchctl print` exit status for "not loaded" (reference, launchd)
IO_ERROR = 5  # `bootstrap` right after `bootout`: teardown still running
RETRIES = 10
POLL_S = 0.5


class Launchd(Step):
    """Server, supervisor and weekly verify: LaunchAgents in the user's GUI session, or LaunchDaemons."""

    key = "launchd"
    title = "launchd: server, supervisor and weekly verify jobs"

    def skip_reason(self, ctx: Context) -> str | None:
        return None if ctx.options.target == "macos" else "not macOS"

    # where and who
    def domain(self, ctx: Context) -> str:
        assert ctx.account is not None
        return "system" if ctx.options.mode == "daemon" else f"gui/{ctx.account.uid}"

    def folder(self, ctx: Context) -> Path:
        if ctx.options.mode == "daemon":
            return LAUNCH_DAEMONS
        assert ctx.account is not None and ctx.account.home is not None
        return ctx.account.home / "Library" / "LaunchAgents"

    def file_owner(self, ctx: Context) -> tuple[int, int]:
        # Daemons: root:wheel 644 or launchd refuses them. Agents: the user's own.
        return (0, 0) if ctx.options.mode == "daemon" else (ctx.account.uid, ctx.account.gid)  # type: ignore[union-attr]

    def jobs(self, ctx: Context) -> list[tuple[str, Path, str]]:
        """(label, plist path, content) for the server, the supervisor and the weekly verify."""
        agent = ctx.options.mode == "agent"
        folder = self.folder(ctx)
        verify = schedule.verify_job(ctx.layout, ctx.options.user)
        return [
            *(
                (service.label, folder / f"{service.label}.plist", render.launchd_plist(service, agent=agent))
                for service in ctx.services()
            ),
            (verify.label, folder / f"{verify.label}.plist", schedule.launchd_plist(verify, agent=agent)),
        ]

    def domain_ready(self, ctx: Context) -> bool:
        """gui/UID exists only while the user is logged in at the console (reference, launchd)."""
        if ctx.options.root is not None:
            return False
        if ctx.options.mode == "daemon":
            return True
        return ctx.host.run(["launchctl", "print", self.domain(ctx)]).ok

    def loaded(self, ctx: Context, label: str) -> bool:
        return ctx.host.run(["launchctl", "print", f"{self.domain(ctx)}/{label}"]).ok

    def check(self, ctx: Context) -> Check:
        files_ok = all(ctx.host.read_text(path) == text for _l, path, text in self.jobs(ctx))
        if not files_ok:
            return Check(False, "plists missing or different")
        if not self.domain_ready(ctx):
            ctx.not_started = self._why_not_started(ctx)
            return Check(True, f"plists in {self.folder(ctx)}; {ctx.not_started}")
        if all(self.loaded(ctx, label) for label, _p, _t in self.jobs(ctx)):
            return Check(True, f"{SERVER_LABEL}, {SUPERVISOR_LABEL} and {VERIFY_LABEL} loaded in {self.domain(ctx)}")
        return Check(False, "not loaded")

    def _why_not_started(self, ctx: Context) -> str:
        if ctx.options.root is not None:
            return "--root: not loaded"
        return (
            f"{ctx.options.user} is not logged in at the console, so {self.domain(ctx)} does not exist yet: "
            "the jobs load at the next login (automatic after a restart: `sudo shutdown -r now`)"
        )

    def apply(self, ctx: Context) -> None:
        if ctx.options.mode == "agent":
            ctx.host.mkdir(self.folder(ctx), mode=0o755, owner=self.file_owner(ctx))
        for _label, path, text in self.jobs(ctx):
            ctx.host.write(path, text, mode=0o644, owner=self.file_owner(ctx))
        if not ctx.host.dry_run and not self.domain_ready(ctx):
            ctx.not_started = self._why_not_started(ctx)
            ctx.host.say(f"    {ctx.not_started}")
            return
        for label, path, _text in self.jobs(ctx):
            self._load(ctx, label, ctx.host.real(path))

    def _load(self, ctx: Context, label: str, plist: Path) -> None:
        """bootout if loaded (a changed plist), enable, bootstrap; retry while teardown runs."""
        target = f"{self.domain(ctx)}/{label}"
        if not ctx.host.dry_run and self.loaded(ctx, label):
            self._bootout(ctx, label)
        ctx.host.run(["launchctl", "enable", target], changes=True)
        for _attempt in range(RETRIES):
            res = ctx.host.run(["launchctl", "bootstrap", self.domain(ctx), str(plist)], changes=True)
            if res.ok or res.skipped:
                return
            if res.returncode != IO_ERROR:
                break
            self._bootout(ctx, label)  # reference: poll `print` until 113, then retry
        raise InstallError(
            f"launchctl bootstrap {self.domain(ctx)} {plist} failed: {res.output}.\n"
            f"Check the plist with `plutil -lint {plist}`, then run `macpacs install` again."
        )

    def _bootout(self, ctx: Context, label: str) -> None:
        """bootout is asynchronous: poll `launchctl print` until it says 113 (not loaded)."""
        target = f"{self.domain(ctx)}/{label}"
        ctx.host.run(["launchctl", "bootout", target], changes=True)
        if ctx.host.dry_run:
            return
        for _ in range(RETRIES):
            res = ctx.host.run(["launchctl", "print", target])
            if res.returncode == NOT_LOADED or (res.returncode != 0 and not res.skipped):
                return
            ctx.host.sleep(POLL_S)

    def undo(self, ctx: Context) -> None:
        for label, path, _text in reversed(self.jobs(ctx)):
            if ctx.options.root is None and (ctx.host.dry_run or self.loaded(ctx, label)):
                self._bootout(ctx, label)
            ctx.host.remove(path)
