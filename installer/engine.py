"""Runs the steps: install (check, then apply what is not done) and uninstall (undo, in reverse)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from macpacs.pacs_server import config as pacs_config

from .certificate import Certificate, cert_path, key_path
from .host import Host
from .layout import Layout, Options
from .linux import Systemd
from .macos import AutoLogin, Launchd, Power
from .preflight import Preflight
from .steps import (
    Application,
    Config,
    Context,
    Effective,
    Folders,
    InstallError,
    Step,
    Wait,
    load_state,
    lookup_account,
)


def steps() -> list[Step]:
    """Every step, in install order (each says itself when it does not apply)."""
    return [
        Preflight(),
        Power(),
        AutoLogin(),
        Application(),
        Folders(),
        Certificate(),
        Config(),
        Launchd(),
        Systemd(),
        Wait(),
    ]


def make_context(options: Options, host: Host, *, preview: bool = False) -> Context:
    """Context for ``options``; an existing, valid config decides the archive's identity.

    A re-run must describe the archive that actually runs: if /…/macpacs.toml exists (it is never
    overwritten), its AE title, ports and data folder win over the options, and a note says so.
    """
    layout = Layout.for_options(options)
    effective = Effective(options.ae_title, options.dicom_port, options.web_port, options.xmlrpc_port)
    if options.https:
        effective.web_cert, effective.web_key = str(cert_path(layout)), str(key_path(layout))
        effective.xmlrpc_tls = True
    text = host.read_text(layout.config_file)
    if text is not None:
        try:
            settings = pacs_config.load(host.real(layout.config_file), environ={})
        except pacs_config.ConfigError:
            settings = None  # preflight reports it
        if settings is not None:
            found = Effective(settings.dicom.ae_title, settings.dicom.port, settings.web.port, settings.xmlrpc.port)
            found.web_cert, found.web_key = settings.web.tls_cert, settings.web.tls_key
            found.xmlrpc_tls = settings.xmlrpc.tls
            if found != effective or Path(settings.storage.data_dir) != layout.data_dir:
                host.say(
                    f"note: {layout.config_file} exists and is kept: AE {found.ae_title}, DICOM port "
                    f"{found.dicom_port}, web port {found.web_port}, XML-RPC port {found.xmlrpc_port}, data "
                    f"{settings.storage.data_dir} (edit it to change them)"
                )
            effective = found
            layout = Layout(options.target, Path(settings.storage.data_dir))
    ctx = Context(options, layout, host, effective, preview=preview)
    ctx.state = load_state(host, layout)
    return ctx


def install(ctx: Context, confirm: Callable[[Context], bool] | None = None) -> None:
    """Check each step, apply those not done. Raises InstallError with the fix.

    ``confirm`` is asked once, after preflight, before the first change.
    """
    opts = ctx.options
    todo = steps()
    mode = f", mode {opts.mode}" if opts.target == "macos" else ""
    header = f"macpacs install: target {opts.target}{mode}, user {opts.user}"
    if opts.root is not None:
        header += f", into --root {opts.root}"
    if opts.dry_run:
        header += " (DRY RUN: nothing is changed; `?` checks, `$` would run, `>` would write)"
    ctx.host.say(header)
    for number, step in enumerate(todo, 1):
        ctx.host.say(f"[{number}/{len(todo)}] {step.title}")
        reason = step.skip_reason(ctx)
        if reason:
            ctx.host.say(f"    skipped: {reason}")
            continue
        check = step.check(ctx)
        if check.done:
            ctx.host.say(f"    already done: {check.detail}" if step.key != "preflight" else f"    {check.detail}")
            continue
        if confirm is not None:
            if not confirm(ctx):
                raise InstallError("cancelled: nothing was changed")
            confirm = None
        step.apply(ctx)
        if not opts.dry_run:
            ctx.host.say("    done")
    if not opts.dry_run:
        ctx.save_state()
    summary(ctx)


def uninstall(ctx: Context, *, purge: bool) -> None:
    """Undo the steps in reverse order. Data and logs stay unless ``purge``."""
    if ctx.account is None:
        ctx.account = lookup_account(ctx)
        if ctx.account is None and ctx.options.target == "macos":
            raise InstallError(f"no account named {ctx.options.user!r}: cannot find its LaunchAgents")
    ctx.host.say(
        f"macpacs uninstall: target {ctx.options.target}, mode {ctx.options.mode}, user {ctx.options.user}"
        + (" (DRY RUN)" if ctx.options.dry_run else "")
    )
    todo = list(reversed(steps()))
    for number, step in enumerate(todo, 1):
        if step.key in ("preflight", "wait"):
            continue
        ctx.host.say(f"[{number}/{len(todo)}] undo {step.title}")
        if step.skip_reason(ctx) and step.key not in ("autologin",):
            ctx.host.say("    nothing to undo here")
            continue
        if isinstance(step, Folders):
            step.undo(ctx, purge=purge)
        elif isinstance(step, AutoLogin) and ctx.options.target != "macos":
            ctx.host.say("    nothing to undo here")
        else:
            step.undo(ctx)
    ctx.host.remove(ctx.layout.state_file)
    ctx.host.say("uninstalled" + ("" if purge else f"; the archive's data is kept in {ctx.layout.data_dir}"))


def summary(ctx: Context) -> None:
    """What to configure on the workstations and modalities."""
    eff, host = ctx.effective, ctx.host
    ip = host.primary_ip()
    lines = [
        "",
        "macpacs archive" + (" (after this plan is applied)" if ctx.options.dry_run else ""),
        f"  AE title      {eff.ae_title}",
        f"  address       {ip} ({host.hostname()})",
        f"  DICOM port    {eff.dicom_port}",
        f"  web           {eff.web_scheme}://{ip}:{eff.web_port}/   "
        f"(health: {eff.web_scheme}://{ip}:{eff.web_port}/testdbalive)",
        f"  XML-RPC       {eff.xmlrpc_scheme}://{ip}:{eff.xmlrpc_port}/",
        f"  data          {ctx.layout.data_dir}",
        f"  config        {ctx.layout.config_file}",
        f"  logs          {ctx.layout.log_dir}",
        "OsiriX/Horos: Settings > Locations > + (DICOM node):",
        f"  Description MACPACS | Address {ip} | AETitle {eff.ae_title} | Port {eff.dicom_port} | "
        "Q&R: C-MOVE (or C-GET) | Transfer syntax: Explicit Little Endian",
        "Modalities send (C-STORE) to the same AE title, address and port. `macpacs doctor` checks everything.",
    ]
    for line in lines:
        host.say(line)
