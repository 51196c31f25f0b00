"""The install steps shared by every target, and what a step is.

A step has ``check`` (is it done already? only read-only commands), ``apply`` (do it) and
``undo`` (take it back, for ``macpacs uninstall``). The engine runs ``apply`` only when ``check``
says the step is not done, which makes every step idempotent: a second ``macpacs install``
prints "already done" for each and runs no command that changes anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macpacs.pacs_server import config as pacs_config

from . import render
from .host import Host
from .layout import Layout, Options
from .service import Service, server_service, supervisor_service

HEALTH_BODY = "Test DB Alive succeeded"
MIN_FREE_GB = 1  # below this, nothing can be stored: FAIL
WARN_FREE_GB = 20  # a PACS fills disks: WARN


class InstallError(Exception):
    """A step cannot go on. The message says what happened and what to do about it."""


@dataclass(frozen=True)
class Finding:
    """One line of preflight or doctor: PASS/WARN/FAIL, what was found, and the fix."""

    level: str
    what: str
    fix: str = ""

    def line(self) -> str:
        text = f"  {self.level:<4} {self.what}"
        return text + (f"\n         fix: {self.fix}" if self.fix and self.level != "PASS" else "")


@dataclass(frozen=True)
class Check:
    done: bool
    detail: str = ""


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: Path | None = None


@dataclass
class Effective:
    """The archive's identity as the services will run it (options, or an existing config)."""

    ae_title: str
    dicom_port: int
    web_port: int
    xmlrpc_port: int
    # [web] tls_cert and tls_key (final paths): HTTPS on the web port when set.
    web_cert: str = ""
    web_key: str = ""
    # [xmlrpc] tls: HTTPS on the XML-RPC port too, with the web port's certificate.
    xmlrpc_tls: bool = False

    @property
    def web_scheme(self) -> str:
        return "https" if self.web_cert else "http"

    @property
    def xmlrpc_scheme(self) -> str:
        return "https" if self.xmlrpc_tls else "http"


@dataclass
class Context:
    options: Options
    layout: Layout
    host: Host
    effective: Effective
    state: dict[str, Any] = field(default_factory=dict)
    account: Account | None = None
    # Previewing another OS (--dry-run --target macos on Linux): checks cannot run.
    preview: bool = False
    # Set by the service step when the jobs cannot start now (no GUI session yet, --root).
    not_started: str | None = None

    def services(self) -> tuple[Service, Service]:
        """The server and the supervisor, as every service manager and ``doctor`` see them."""
        eff = self.effective
        return (
            server_service(self.layout, self.options.user),
            supervisor_service(
                self.layout,
                self.options.user,
                ae_title=eff.ae_title,
                dicom_port=eff.dicom_port,
                web_port=eff.web_port,
                xmlrpc_port=eff.xmlrpc_port,
                web_cert=eff.web_cert,
                xmlrpc_tls=eff.xmlrpc_tls,
            ),
        )

    def owner(self) -> tuple[int, int] | None:
        return (self.account.uid, self.account.gid) if self.account else None

    def save_state(self) -> None:
        """Record what was changed (previous power settings, ...) for uninstall; root only, 600."""
        if self.host.dry_run:
            return
        self.state["options"] = {
            "user": self.options.user,
            "target": self.options.target,
            "mode": self.options.mode,
            "data_dir": str(self.layout.data_dir),
        }
        self.host.write(
            self.layout.state_file,
            json.dumps(self.state, indent=2, sort_keys=True) + "\n",
            mode=0o600,
            owner=(0, 0),
            quiet=True,
        )


def load_state(host: Host, layout: Layout) -> dict[str, Any]:
    text = host.read_text(layout.state_file)
    if not text:
        return {}
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}


class Step:
    key = ""
    title = ""

    def skip_reason(self, ctx: Context) -> str | None:
        """Why this step does not apply to this target/mode (printed as a note), or None."""
        return None

    def check(self, ctx: Context) -> Check:
        raise NotImplementedError

    def apply(self, ctx: Context) -> None:
        raise NotImplementedError

    def undo(self, ctx: Context) -> None:
        raise NotImplementedError


# -- account -----------------------------------------------------------------------------------
def lookup_account(ctx: Context) -> Account | None:
    """UID, GID (and home on macOS) of ``--user`` through ``id`` and ``dscl``; None if unknown."""
    user = ctx.options.user
    uid = ctx.host.run(["id", "-u", user])
    if uid.skipped:
        return Account(user, 501, 20, Path("/Users") / user)  # preview: a Mac's first account
    if not uid.ok:
        return None
    gid = ctx.host.run(["id", "-g", user])
    home: Path | None = None
    if ctx.options.target == "macos":
        res = ctx.host.run(["dscl", ".", "-read", f"/Users/{user}", "NFSHomeDirectory"])
        for line in res.stdout.splitlines():
            if line.startswith("NFSHomeDirectory:"):
                home = Path(line.split(":", 1)[1].strip())
    return Account(user, int(uid.stdout.strip()), int(gid.stdout.strip() or 0), home)


# -- application ----------------------------------------------------------------------------
def package_version() -> str:
    return importlib.metadata.version("macpacs")


def default_source() -> Path | None:
    """The source tree this installer runs from, when it is a checkout (has pyproject.toml)."""
    tree = Path(__file__).resolve().parent.parent
    return tree if (tree / "pyproject.toml").is_file() else None


SOURCE_PARTS = ("pyproject.toml", "README.md", "pacs_server", "installer", "supervisor", "templates")


class Application(Step):
    """A virtual environment at /usr/local/macpacs with this package installed from wheel or source."""

    key = "application"
    title = "application: virtual environment in /usr/local/macpacs"

    def _installed_version(self, ctx: Context) -> str | None:
        python = ctx.host.real(ctx.layout.python)
        if not python.exists():
            return None
        code = "import importlib.metadata as m; print(m.version('macpacs'))"
        res = ctx.host.run([str(python), "-c", code])
        return res.stdout.strip() if res.ok else None

    def check(self, ctx: Context) -> Check:
        version = self._installed_version(ctx)
        wanted = package_version()
        if version == wanted and ctx.host.exists(ctx.layout.macpacs):
            return Check(True, f"macpacs {version} in {ctx.layout.prefix}")
        return Check(False, f"installed: {version or 'nothing'}; wanted {wanted}")

    def apply(self, ctx: Context) -> None:
        source = ctx.options.source or default_source()
        if source is None:
            raise InstallError("no source to install from: give --source PATH (a macpacs wheel or source folder)")
        prefix = ctx.host.real(ctx.layout.prefix)
        res = ctx.host.run([_base_python(), "-m", "venv", str(prefix)], changes=True)
        if not res.ok and not res.skipped:
            raise InstallError(f"could not create the virtual environment {prefix}: {res.output}")
        with tempfile.TemporaryDirectory(prefix="macpacs-src-") as staging:
            target = _stage(source, Path(staging)) if not ctx.host.dry_run else source
            pip = [
                str(prefix / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--upgrade",
                "--disable-pip-version-check",
                *ctx.options.pip_options,
                str(target),
            ]
            if source.is_dir() and ctx.host.dry_run:
                ctx.host.say(f"    (pip builds from a temporary copy of {source}, so the tree stays clean)")
            res = ctx.host.run(pip, changes=True, timeout=1800)
        if not res.ok and not res.skipped:
            raise InstallError(
                f"pip could not install {source} into {prefix}:\n{res.output[-2000:]}\n"
                "Check the network (or give --pip-option --no-index --pip-option --find-links=DIR "
                "for an offline install), then run `macpacs install` again."
            )

    def undo(self, ctx: Context) -> None:
        ctx.host.remove_tree(ctx.layout.prefix)


def _base_python() -> str:
    """The interpreter to build the venv from: the base one, not a venv we may be running in."""
    import sys

    return str(getattr(sys, "_base_executable", None) or sys.executable)


def _stage(source: Path, staging: Path) -> Path:
    """A wheel is used as is; a source folder is copied (pip builds in place and would litter it)."""
    if source.is_file():
        return source
    if not (source / "pyproject.toml").is_file():
        raise InstallError(f"{source} is neither a wheel nor a source folder with pyproject.toml")
    tree = staging / "macpacs"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for part in SOURCE_PARTS:
        item = source / part
        if item.is_dir():
            shutil.copytree(item, tree / part, ignore=ignore)
        elif item.is_file():
            shutil.copy2(item, tree / part)
    return tree


# -- folders ------------------------------------------------------------------------------------
class Folders(Step):
    """The data folder (files, index) and logs folder, owned by the account that runs the server."""

    key = "folders"
    title = "folders: data and logs"

    def _folders(self, ctx: Context) -> list[tuple[Path, int]]:
        return [(ctx.layout.data_dir, 0o750), (ctx.layout.log_dir, 0o755)]

    def check(self, ctx: Context) -> Check:
        owner = ctx.owner()
        for path, _mode in self._folders(ctx):
            found = ctx.host.owner_mode(path)
            if found is None or (owner and ctx.host.is_root and found[0] != owner[0]):
                return Check(False, f"{path} missing or not owned by {ctx.options.user}")
        return Check(True, ", ".join(str(p) for p, _ in self._folders(ctx)))

    def apply(self, ctx: Context) -> None:
        for path, mode in self._folders(ctx):
            ctx.host.mkdir(path, mode=mode, owner=ctx.owner())

    def undo(self, ctx: Context, purge: bool = False) -> None:
        for path, _mode in self._folders(ctx):
            if purge:
                ctx.host.remove_tree(path)
            else:
                ctx.host.say(f"    kept {path} (give --purge-data to delete it)")


# -- config ------------------------------------------------------------------------------------
def rendered_config(ctx: Context) -> str:
    eff = ctx.effective
    return render.config(
        ctx.layout,
        eff.ae_title,
        eff.dicom_port,
        eff.web_port,
        eff.xmlrpc_port,
        web_tls=(eff.web_cert, eff.web_key),
        xmlrpc_tls=eff.xmlrpc_tls,
    )


def validate_config_text(text: str, origin: str) -> None:
    """Raise InstallError unless pacs_server would accept this TOML (its own loader decides)."""
    try:
        data = tomllib.loads(text)
        settings = pacs_config.Settings()
        pacs_config.apply(settings, data, origin)
        settings.validate()
    except (tomllib.TOMLDecodeError, pacs_config.ConfigError) as exc:
        raise InstallError(f"{origin}: {exc}") from None


def config_diff(existing: str, new: str) -> list[str]:
    """Keys the new config has and the existing one lacks or sets differently (nothing is changed)."""
    old, fresh = tomllib.loads(existing), tomllib.loads(new)
    lines: list[str] = []
    for section, items in fresh.items():
        for key, value in items.items():
            have = old.get(section, {})
            if key not in have:
                lines.append(f"+ [{section}] {key} = {render.toml_string(value) if isinstance(value, str) else value}")
            elif have[key] != value:
                lines.append(f"~ [{section}] {key}: kept {have[key]!r} (install would write {value!r})")
    return lines


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Config(Step):
    """macpacs.toml from templates/macpacs.toml.j2, server mode on; an existing file is never overwritten."""

    key = "config"
    title = "config: macpacs.toml"

    def check(self, ctx: Context) -> Check:
        existing = ctx.host.read_text(ctx.layout.config_file)
        if existing is None:
            return Check(False, f"{ctx.layout.config_file} does not exist")
        validate_config_text(existing, str(ctx.layout.config_file))
        diff = config_diff(existing, rendered_config(ctx))
        if diff:
            ctx.host.say(f"    {ctx.layout.config_file} exists and is kept; keys that differ from a fresh install:")
            for line in diff:
                ctx.host.say(f"      {line}")
        return Check(True, f"{ctx.layout.config_file} (kept as it is)")

    def apply(self, ctx: Context) -> None:
        text = rendered_config(ctx)
        validate_config_text(text, "rendered config")
        ctx.host.write(ctx.layout.config_file, text, mode=0o644, owner=(0, 0))
        ctx.state["config_sha256"] = sha256(text)
        ctx.save_state()

    def undo(self, ctx: Context) -> None:
        existing = ctx.host.read_text(ctx.layout.config_file)
        if existing is None:
            return
        if sha256(existing) == ctx.state.get("config_sha256"):
            ctx.host.remove(ctx.layout.config_file)
        else:
            ctx.host.say(f"    kept {ctx.layout.config_file}: it was edited after install (delete it by hand)")


# -- wait ----------------------------------------------------------------------------------------
def health_url(ctx: Context) -> str:
    return f"{ctx.effective.web_scheme}://127.0.0.1:{ctx.effective.web_port}/testdbalive"


def server_answers(ctx: Context, timeout: float = 5.0) -> bool:
    reply = ctx.host.http_get(health_url(ctx), timeout=timeout)
    return reply is not None and reply[0] == 200 and reply[1].strip() == HEALTH_BODY


class Wait(Step):
    """Wait until /testdbalive answers, so that the summary describes a server that runs."""

    key = "wait"
    title = "start: wait for /testdbalive"

    def skip_reason(self, ctx: Context) -> str | None:
        if ctx.host.dry_run:
            return f"dry run: would wait up to {ctx.options.wait_timeout:g} s for {health_url(ctx)}"
        if ctx.options.root is not None:
            return "--root: services are installed, not started"
        return ctx.not_started

    def check(self, ctx: Context) -> Check:
        if server_answers(ctx):
            return Check(True, f"{health_url(ctx)} answers")
        return Check(False)

    def apply(self, ctx: Context) -> None:
        deadline = ctx.options.wait_timeout
        waited = 0.0
        while waited <= deadline:
            if server_answers(ctx, timeout=2.0):
                ctx.host.say(f"    {health_url(ctx)} answers after {waited:.0f} s")
                return
            ctx.host.sleep(1.0)
            waited += 1.0
        raise InstallError(
            f"the server does not answer {health_url(ctx)} after {deadline:g} s.\n"
            f"Look at {ctx.services()[0].stderr_path}, then run `macpacs doctor`. "
            "Everything else is installed; `macpacs install` again re-checks."
        )

    def undo(self, ctx: Context) -> None:
        return None
