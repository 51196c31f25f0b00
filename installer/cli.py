"""``macpacs install``, ``uninstall`` and ``doctor`` (dispatched lazily by ``installer.entry``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from . import doctor as doctor_mod
from . import engine
from .host import Host
from .layout import DATA_DIR, Layout, Options, detect_target
from .steps import Context, InstallError, load_state
from .system import System, preview_executor, subprocess_executor


def _target(target: str | None, dry_run: bool) -> tuple[str, bool]:
    """(target, preview): previewing is a dry run for another OS, where no check can run."""
    here = detect_target()
    target = target or here
    if target != here and not dry_run:
        raise click.UsageError(f"--target {target} on a {here} host works only with --dry-run (a preview)")
    return target, target != here


def _host(options: Options, preview: bool) -> Host:
    executor = preview_executor(detect_target(), options.target) if preview else subprocess_executor
    system = System(executor, dry_run=options.dry_run, out=click.echo)
    system.add_secret(options.password)
    return Host(system, root=options.root, is_root=os.geteuid() == 0)


def _read_password(password_stdin: bool) -> str | None:
    if not password_stdin:
        return None
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    if not password:
        raise click.UsageError("--password-stdin: stdin was empty; pipe the password in (one line)")
    return password


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--user", required=True, help="Account that logs in automatically and runs the server.")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read that account's password from stdin (one line). Needed for auto-login (--mode agent).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Archive data folder, e.g. a RAID volume. Default {DATA_DIR['macos']} (Linux {DATA_DIR['linux']}).",
)
@click.option("--ae-title", default="MACPACS", show_default=True, help="AE title of the archive.")
@click.option("--dicom-port", type=click.IntRange(1, 65535), default=11112, show_default=True)
@click.option("--web-port", type=click.IntRange(1, 65535), default=3333, show_default=True)
@click.option("--xmlrpc-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["agent", "daemon"]),
    default="agent",
    show_default=True,
    help="agent: LaunchAgents in the auto-logged-in user's session; daemon: LaunchDaemons at boot, "
    "no auto-login. Linux always uses system units.",
)
@click.option("--target", type=click.Choice(["macos", "linux"]), help="Default: this machine's OS.")
@click.option("--dry-run", is_flag=True, help="Print every check, command (password masked) and file; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install under this folder instead of / (packaging, tests); services are not started.",
)
@click.option(
    "--source",
    type=click.Path(exists=True, path_type=Path),
    help="macpacs wheel or source folder to install. Default: the source tree this runs from.",
)
@click.option(
    "--pip-option",
    "pip_options",
    multiple=True,
    help="Extra pip install option, repeatable (e.g. --pip-option=--no-index --pip-option=--find-links=DIR).",
)
@click.option(
    "--wait-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for /testdbalive after starting the services.",
)
@click.option(
    "--https",
    is_flag=True,
    help="Make a self-signed certificate and serve the web and XML-RPC ports over HTTPS (installer/certificate.py).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every check command to stderr.")
def install(
    user: str,
    password_stdin: bool,
    data_dir: Path | None,
    ae_title: str,
    dicom_port: int,
    web_port: int,
    xmlrpc_port: int,
    mode: str,
    target: str | None,
    dry_run: bool,
    yes: bool,
    root: Path | None,
    source: Path | None,
    pip_options: tuple[str, ...],
    wait_timeout: float,
    https: bool,
    verbose: bool,
) -> None:
    """Turn this host into an unattended macpacs server (run with sudo).

    \b
    printf '%s\\n' "$PASSWORD" | sudo macpacs install --user pacs --password-stdin \\
        --data-dir /Volumes/RAID/macpacs --ae-title MACPACS --yes
    macpacs install --user pacs --target macos --dry-run    # the plan, from any machine
    """
    _logging(verbose)
    target, preview = _target(target, dry_run)
    if not yes and not dry_run and not sys.stdin.isatty():
        raise click.UsageError("stdin is not a terminal, so nobody can confirm: add --yes")
    options = Options(
        user=user,
        target=target,
        mode=mode,
        data_dir=data_dir.absolute() if data_dir else None,
        ae_title=ae_title,
        dicom_port=dicom_port,
        web_port=web_port,
        xmlrpc_port=xmlrpc_port,
        dry_run=dry_run,
        yes=yes,
        root=root.absolute() if root else None,
        source=source.absolute() if source else None,
        pip_options=pip_options,
        wait_timeout=wait_timeout,
        https=https,
        password=_read_password(password_stdin),
    )
    if options.auto_login and options.password is None and not dry_run and sys.stdin.isatty():
        options.password = click.prompt(f"Password of {user} (for automatic login)", hide_input=True)
    host = _host(options, preview)
    ctx = engine.make_context(options, host, preview=preview)
    confirm = None if (yes or dry_run) else _confirm_install
    try:
        engine.install(ctx, confirm=confirm)
    except InstallError as exc:
        raise click.ClickException(str(exc)) from None


def _confirm_install(ctx: Context) -> bool:
    return click.confirm(
        "Preflight passed. Apply the steps above (power, auto-login, application, services)?", default=True
    )


def _installed(
    target: str | None,
    user: str | None,
    mode: str | None,
    root: Path | None,
    dry_run: bool,
    data_dir: Path | None = None,
) -> tuple[Options, bool]:
    """Options of the existing installation, from its state file (flags fill in what is missing)."""
    target, preview = _target(target, dry_run)
    probe = Host(System(subprocess_executor, dry_run=True, out=lambda _s: None), root=root)
    state = load_state(probe, Layout(target, data_dir or DATA_DIR[target]))
    recorded = state.get("options", {})
    name = user or recorded.get("user")
    if not name:
        raise click.UsageError("no install state found: give --user (and --mode) of the installation")
    recorded_dir = recorded.get("data_dir")
    options = Options(
        user=name,
        target=target,
        mode=mode or recorded.get("mode", "agent"),
        dry_run=dry_run,
        root=root.absolute() if root else None,
        data_dir=data_dir or (Path(recorded_dir) if recorded_dir else None),
    )
    return options, preview


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--purge-data", is_flag=True, help="Also delete the data folder (images, index) and the logs.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Print what would be undone; change nothing.")
@click.option("--user", help="Account of the installation (default: from the install state).")
@click.option("--mode", type=click.Choice(["agent", "daemon"]), help="Default: from the install state.")
@click.option("--target", type=click.Choice(["macos", "linux"]), help="Default: this machine's OS.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="The --root given to install.")
@click.option("-v", "--verbose", is_flag=True)
def uninstall(
    purge_data: bool,
    yes: bool,
    dry_run: bool,
    user: str | None,
    mode: str | None,
    target: str | None,
    root: Path | None,
    verbose: bool,
) -> None:
    """Undo `macpacs install` in reverse order; the archive's data is kept unless --purge-data."""
    _logging(verbose)
    options, preview = _installed(target, user, mode, root, dry_run)
    host = _host(options, preview)
    ctx = engine.make_context(options, host, preview=preview)
    if not yes and not dry_run:
        if not sys.stdin.isatty():
            raise click.UsageError("stdin is not a terminal, so nobody can confirm: add --yes")
        data = ctx.layout.data_dir
        what = f"and DELETE ALL DATA in {data}" if purge_data else f"(data in {data} is kept)"
        if not click.confirm(f"Uninstall macpacs {what}?", default=False):
            raise click.ClickException("cancelled: nothing was changed")
    try:
        engine.uninstall(ctx, purge=purge_data)
    except InstallError as exc:
        raise click.ClickException(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--user", help="Account of the installation (default: from the install state).")
@click.option("--mode", type=click.Choice(["agent", "daemon"]), help="Default: from the install state.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="The --root given to install.")
@click.option("-v", "--verbose", is_flag=True)
def doctor(user: str | None, mode: str | None, root: Path | None, verbose: bool) -> None:
    """Check every part of an installation: PASS/WARN/FAIL with a fix each; exit 1 on any FAIL."""
    _logging(verbose)
    options, _preview = _installed(None, user, mode, root, dry_run=False)
    host = _host(options, False)
    ctx = engine.make_context(options, host)
    found = doctor_mod.diagnose(ctx)
    for finding in found:
        click.echo(finding.line())
    failed = sum(f.level == "FAIL" for f in found)
    warned = sum(f.level == "WARN" for f in found)
    click.echo(f"{failed} FAIL, {warned} WARN, {len(found) - failed - warned} PASS")
    if failed:
        sys.exit(1)
