"""Preflight: every reason the install would fail, found before anything is changed.

Each finding says what to do about it. One FAIL stops the install with the machine untouched.
"""

from __future__ import annotations

from .steps import (
    MIN_FREE_GB,
    WARN_FREE_GB,
    Check,
    Context,
    Finding,
    InstallError,
    Step,
    default_source,
    lookup_account,
    server_answers,
    validate_config_text,
)

MIN_MACOS = 11  # Big Sur: sysadminctl -autologin, launchctl bootstrap/bootout, Python 3.11


def dscl_escape(word: str) -> str:
    """One word of a dscl interactive command: spaces, quotes and backslashes escaped."""
    return "".join("\\" + c if c in " \t\"'\\" else c for c in word)


def password_ok(ctx: Context) -> bool | None:
    """Check the password with ``dscl /Search -authonly`` before anything changes.

    The reference's form ``dscl /Search -authonly U P`` puts the password in argv, where ``ps``
    shows it. dscl without a command reads commands from stdin (its interactive mode, see
    ``man dscl``), so the same ``-authonly U P`` command is sent on stdin instead. It prints
    nothing on success and an ``eDSAuthFailed`` error otherwise (its exit status stays 0 in
    interactive mode, so the output decides). None: not checked (preview).
    """
    user, password = ctx.options.user, ctx.options.password or ""
    command = f"-authonly {dscl_escape(user)} {dscl_escape(password)}\n"
    res = ctx.host.run(["dscl", "/Search"], command, secret_input=True)
    if res.skipped:
        return None
    text = res.output.lower()
    return res.returncode == 0 and "error" not in text and "fail" not in text


def findings(ctx: Context) -> list[Finding]:
    """All preflight findings, in the order they are printed."""
    opts, host, out = ctx.options, ctx.host, []
    if host.is_root or opts.root is not None:
        out.append(Finding("PASS", "running as root" if host.is_root else f"installing into --root {opts.root}"))
    else:
        level = "WARN" if opts.dry_run else "FAIL"
        out.append(Finding(level, "not running as root", "run it with sudo: sudo macpacs install ..."))

    if opts.target == "macos":
        out.append(_macos_version(ctx))
    elif opts.root is None:
        res = host.run(["systemctl", "--version"])
        if res.ok:
            out.append(Finding("PASS", f"systemd {res.stdout.split()[1] if res.stdout.split() else ''}".strip()))
        else:
            out.append(
                Finding(
                    "FAIL",
                    "systemd not found (systemctl --version failed)",
                    "this installer needs systemd on Linux; on other hosts run `macpacs supervise --mode "
                    "spawn -- macpacs serve` from your service manager",
                )
            )

    ctx.account = lookup_account(ctx)
    if ctx.account is None:
        list_cmd = "dscl . -list /Users" if opts.target == "macos" else "getent passwd"
        out.append(
            Finding(
                "FAIL",
                f"no account named {opts.user!r}",
                f"create it first (System Settings > Users & Groups), or give --user of an existing "
                f"account (`{list_cmd}` lists them)",
            )
        )
    elif ctx.account.uid == 0 and opts.auto_login:
        out.append(
            Finding(
                "FAIL",
                "--user root: auto-login as root is not possible",
                "create a standard account for the server and give it as --user",
            )
        )
    elif ctx.account.uid == 0:
        out.append(
            Finding(
                "WARN",
                "the server will run as root",
                "a dedicated account is safer: useradd --system macpacs, then --user macpacs",
            )
        )
    else:
        preview = " (preview: assumed)" if ctx.preview else ""
        out.append(Finding("PASS", f"account {opts.user} (UID {ctx.account.uid}){preview}"))

    if opts.target == "macos":
        out.append(_filevault(ctx))
    if opts.auto_login:
        out.append(_password(ctx))

    out.extend(_ports(ctx))
    out.extend(_disk(ctx))
    out.append(_existing_config(ctx))
    source = opts.source or default_source()
    if source is None or not source.exists():
        out.append(
            Finding(
                "FAIL",
                f"nothing to install from ({source or 'no source folder'})",
                "give --source PATH: a macpacs wheel (.whl) or a source folder with pyproject.toml",
            )
        )
    else:
        out.append(Finding("PASS", f"installing from {source}"))
    return [f for f in out if f is not None]


def _macos_version(ctx: Context) -> Finding:
    res = ctx.host.run(["sw_vers", "-productVersion"])
    if res.skipped:
        return Finding("WARN", "macOS version not checked (preview)")
    version = res.stdout.strip()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return Finding(
            "FAIL",
            f"this is not macOS (sw_vers: {res.output or 'not found'})",
            "use --target linux, or run on the Mac itself",
        )
    if major < MIN_MACOS:
        return Finding("FAIL", f"macOS {version} is too old", f"upgrade to macOS {MIN_MACOS} or later")
    return Finding("PASS", f"macOS {version}")


def _filevault(ctx: Context) -> Finding:
    res = ctx.host.run(["fdesetup", "status"])
    if res.skipped:
        return Finding("WARN", "FileVault not checked (preview)")
    if "FileVault is Off" in res.stdout:
        return Finding("PASS", "FileVault is off")
    fix = (
        "turn FileVault off (System Settings > Privacy & Security > FileVault; decryption takes hours), then "
        "run the install again. With FileVault on, a Mac waits at the unlock screen after every power cut"
    )
    if ctx.options.auto_login:
        return Finding("FAIL", f"FileVault is on ({res.output}): automatic login is impossible", fix)
    return Finding("WARN", f"FileVault is on ({res.output}): after a power cut the Mac waits for a password", fix)


def _password(ctx: Context) -> Finding:
    if not ctx.options.password:
        return Finding(
            "WARN" if ctx.options.dry_run else "FAIL",
            f"no password for {ctx.options.user} (needed for automatic login)",
            f"pipe it in: printf '%s\\n' \"$PW\" | sudo macpacs install --user {ctx.options.user} "
            "--password-stdin ...; or --mode daemon (no login needed)",
        )
    if ctx.account is None:
        return Finding("WARN", "password not checked (unknown account)")
    ok = password_ok(ctx)
    if ok is None:
        return Finding("WARN", "password not checked (preview)")
    if not ok:
        return Finding(
            "FAIL",
            f"wrong password for {ctx.options.user} (dscl /Search -authonly refused it)",
            "give the account's login password; an account that signs in with its Apple ID (iCloud) "
            "password cannot log in automatically: give it a local password first",
        )
    return Finding("PASS", f"password of {ctx.options.user} accepted by dscl")


def _ports(ctx: Context) -> list[Finding]:
    eff, out = ctx.effective, []
    ours = None  # computed once: is the thing on our web port an already running macpacs?
    for name, port, flag in (
        ("DICOM", eff.dicom_port, "--dicom-port"),
        ("web", eff.web_port, "--web-port"),
        ("XML-RPC", eff.xmlrpc_port, "--xmlrpc-port"),
    ):
        if ctx.preview or ctx.host.port_free(port):
            out.append(Finding("PASS", f"port {port} ({name}) is free"))
            continue
        if ours is None:
            ours = server_answers(ctx)
        if ours:
            out.append(Finding("PASS", f"port {port} ({name}) is used by the macpacs already running"))
        else:
            out.append(
                Finding(
                    "FAIL",
                    f"port {port} ({name}) is in use by another program",
                    f"`sudo lsof -nP -iTCP:{port} -sTCP:LISTEN` shows which; stop it, or choose another "
                    f"port with {flag}",
                )
            )
    return out


def _disk(ctx: Context) -> list[Finding]:
    data = ctx.layout.data_dir
    if ctx.preview:
        return [Finding("WARN", f"free space and write access of {data} not checked (preview)")]
    out = []
    problem = ctx.host.writable(data)
    if problem:
        out.append(
            Finding(
                "FAIL",
                f"data folder {data}: {problem}",
                "choose a writable volume with --data-dir (a read-only or full volume cannot hold the "
                "archive); `diskutil info <volume>` shows whether it is mounted read-only",
            )
        )
    else:
        out.append(Finding("PASS", f"data folder {data} is writable"))
    free_gb = ctx.host.disk_free(data) / 1e9
    if free_gb < MIN_FREE_GB:
        out.append(
            Finding(
                "FAIL",
                f"only {free_gb:.1f} GB free for {data}",
                "free space or give --data-dir on a larger volume (RAID: docs/install-macos.md)",
            )
        )
    elif free_gb < WARN_FREE_GB:
        out.append(
            Finding(
                "WARN", f"only {free_gb:.0f} GB free for {data}", "an archive grows every day: plan a larger volume"
            )
        )
    else:
        out.append(Finding("PASS", f"{free_gb:.0f} GB free for {data}"))
    return out


def _existing_config(ctx: Context) -> Finding:
    path = ctx.layout.config_file
    text = ctx.host.read_text(path)
    if text is None:
        return Finding("PASS", f"no config yet at {path}: it will be written")
    try:
        validate_config_text(text, str(path))
    except InstallError as exc:
        return Finding("FAIL", f"the existing config is not valid: {exc}", f"fix or move away {path}")
    return Finding("PASS", f"existing config {path} is valid and will be kept")


class Preflight(Step):
    key = "preflight"
    title = "preflight: nothing changes until every check passes"

    def check(self, ctx: Context) -> Check:
        found = findings(ctx)
        for finding in found:
            ctx.host.say(finding.line())
        failed = [f for f in found if f.level == "FAIL"]
        if failed:
            raise InstallError(
                f"preflight found {len(failed)} problem(s), listed above with their fix. Nothing was changed."
            )
        return Check(True, "all checks passed")

    def apply(self, ctx: Context) -> None:
        raise AssertionError("preflight only checks")

    def undo(self, ctx: Context) -> None:
        return None
