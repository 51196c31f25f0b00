"""``macpacs doctor``: every item an unattended server depends on, as PASS/WARN/FAIL with a fix.

Read-only: it runs only checking commands and never changes anything (Software Update settings
are reported, not changed: reference, "Software Update").
"""

from __future__ import annotations

import datetime as dt
import json

from macpacs.pacs_server import config as pacs_config

from . import certificate, schedule
from .layout import KCPASSWORD, SOFTWARE_UPDATE
from .macos import POWER, Launchd, autologin_user, power_differences
from .steps import MIN_FREE_GB, WARN_FREE_GB, Context, Finding, health_url, lookup_account, server_answers

STALE_STATUS_S = 300  # the supervisor rewrites its status every round (15 s by default)
STALE_VERIFY_DAYS = 8  # the verify runs weekly


def diagnose(ctx: Context) -> list[Finding]:
    opts, host, layout = ctx.options, ctx.host, ctx.layout
    out: list[Finding] = []
    xmlrpc_enabled = True
    certificates: dict[str, str] = {}  # setting -> certificate file, for its expiry
    if not host.exists(layout.config_file):
        out.append(
            Finding(
                "FAIL",
                f"no config at {layout.config_file}: macpacs is not installed",
                "sudo macpacs install --user USER ... (docs/install-macos.md)",
            )
        )
    else:
        try:
            settings = pacs_config.load(host.real(layout.config_file), environ={})
            out.append(Finding("PASS", f"config {layout.config_file} is valid"))
            xmlrpc_enabled = settings.xmlrpc.enabled
            certificates = {"web.tls_cert": settings.web.tls_cert, "dicom.tls_cert": settings.dicom.tls_cert}
        except pacs_config.ConfigError as exc:
            out.append(Finding("FAIL", f"config: {exc}", f"fix {layout.config_file}, then restart the server"))
    ctx.account = ctx.account or lookup_account(ctx)

    if opts.target == "macos":
        out.extend(_macos(ctx))
    else:
        out.extend(_systemd(ctx))

    if server_answers(ctx):
        out.append(Finding("PASS", f"{health_url(ctx)} answers"))
    else:
        out.append(
            Finding(
                "FAIL",
                f"{health_url(ctx)} does not answer",
                f"look at {ctx.services()[0].stderr_path}",
            )
        )
    if xmlrpc_enabled:
        eff = ctx.effective
        url = f"{eff.xmlrpc_scheme}://127.0.0.1:{eff.xmlrpc_port}/"
        # Over https, trusting the certificate the supervisor trusts: a PASS means its probe passes.
        problem = host.xmlrpc_probe(url, ca_file=eff.web_cert if eff.xmlrpc_tls else None)
        out.append(
            Finding("PASS", f"XML-RPC {url} answers DBWindowFind")
            if problem is None
            else Finding("FAIL", f"XML-RPC {url}: {problem}", "see the server log; is [xmlrpc] enabled?")
        )
    out.append(_supervisor_status(ctx))
    out.extend(certificate.findings(ctx, certificates))
    out.append(_last_verify(ctx))
    out.append(_disk(ctx))
    return out


def _macos(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    diff = power_differences(ctx)
    if diff is None:
        out.append(Finding("WARN", "power settings not checked"))
    elif diff:
        wanted = " ".join(f"{k} {POWER[k]}" for k in diff)
        out.append(
            Finding("FAIL", f"power: {', '.join(f'{k} is {v}' for k, v in diff.items())}", f"sudo pmset -a {wanted}")
        )
    else:
        out.append(Finding("PASS", "power: autorestart 1, sleep 0, disksleep 0"))

    vault = ctx.host.run(["fdesetup", "status"])
    vault_on = "FileVault is Off" not in vault.stdout
    if ctx.options.mode == "agent":
        user = autologin_user(ctx)
        if user == ctx.options.user and ctx.host.exists(KCPASSWORD):
            out.append(Finding("PASS", f"automatic login as {user}"))
        else:
            out.append(
                Finding(
                    "FAIL",
                    f"automatic login is not set for {ctx.options.user} (login window: {user})",
                    'run `sudo macpacs install` again, or System Settings > Users & Groups > "Automatically log in as"',
                )
            )
    out.append(
        Finding(
            "FAIL" if vault_on and ctx.options.mode == "agent" else "WARN" if vault_on else "PASS",
            f"FileVault: {vault.output or 'unknown'}",
            "turn FileVault off: with it on, the Mac waits for a password after a power cut",
        )
    )
    out.extend(_launchd(ctx))
    out.extend(_software_update(ctx))
    return out


def _launchd(ctx: Context) -> list[Finding]:
    if ctx.account is None:
        return [Finding("FAIL", f"no account {ctx.options.user!r}", "give --user of the installed account")]
    step = Launchd()
    domain = step.domain(ctx)
    if ctx.options.mode == "agent" and not ctx.host.run(["launchctl", "print", domain]).ok:
        return [
            Finding(
                "FAIL",
                f"{ctx.options.user} is not logged in at the console ({domain} does not exist)",
                "restart the Mac (automatic login then starts the agents): sudo shutdown -r now",
            )
        ]
    out = []
    for label, path, _text in step.jobs(ctx):
        if step.loaded(ctx, label):
            out.append(Finding("PASS", f"{label} loaded in {domain}"))
        else:
            out.append(
                Finding(
                    "FAIL",
                    f"{label} is not loaded in {domain}",
                    f"sudo launchctl bootstrap {domain} {path}  (or run `sudo macpacs install` again)",
                )
            )
    return out


def _software_update(ctx: Context) -> list[Finding]:
    values = {}
    for key in ("AutomaticallyInstallMacOSUpdates", "AutomaticDownload", "CriticalUpdateInstall"):
        res = ctx.host.run(["defaults", "read", SOFTWARE_UPDATE, key])
        values[key] = res.stdout.strip() if res.ok else "not set"
    shown = ", ".join(f"{k} = {v}" for k, v in values.items())
    if values["AutomaticallyInstallMacOSUpdates"] == "0":
        return [Finding("PASS", f"Software Update: {shown}")]
    return [
        Finding(
            "WARN",
            f"Software Update may restart the Mac by itself ({shown})",
            "choose when: System Settings > General > Software Update > Automatic Updates > turn off "
            '"Install macOS updates" and update during maintenance (security responses may stay on)',
        )
    ]


def _systemd(ctx: Context) -> list[Finding]:
    out = []
    verify = schedule.verify_job(ctx.layout, ctx.options.user)
    for unit, stderr_path in (*((s.unit, s.stderr_path) for s in ctx.services()), (verify.timer, verify.stderr_path)):
        res = ctx.host.run(["systemctl", "is-active", unit])
        if res.ok:
            out.append(Finding("PASS", f"{unit} is active"))
        else:
            out.append(
                Finding(
                    "FAIL",
                    f"{unit} is {res.stdout.strip() or 'not active'}",
                    f"sudo systemctl restart {unit}; `systemctl status {unit}` shows how it stopped, "
                    f"{stderr_path} what it said",
                )
            )
    return out


def _supervisor_status(ctx: Context) -> Finding:
    server, supervisor = ctx.services()
    path = ctx.layout.status_file
    text = ctx.host.read_text(path)
    if text is None:
        return Finding(
            "FAIL",
            f"the supervisor has written no status ({path})",
            f"is it running? {supervisor.unit} / {supervisor.label}; its log is {supervisor.stderr_path}",
        )
    try:
        status = json.loads(text)
        checked = dt.datetime.fromisoformat(status["last_check"])
        age = (dt.datetime.now(dt.UTC) - checked).total_seconds()
        state = status["state"]
    except (ValueError, KeyError, TypeError):
        return Finding("WARN", f"cannot read the supervisor status {path}")
    restarts = status.get("restarts_24h", 0)
    if age > STALE_STATUS_S:
        return Finding(
            "FAIL",
            f"the supervisor's last check was {age:.0f} s ago (state {state})",
            "the supervisor is not running: see its log, restart its job/unit",
        )
    if state != "healthy":
        return Finding(
            "FAIL",
            f"supervisor: {state} ({restarts} restarts in 24 h)",
            f"see {supervisor.stderr_path} and {server.stderr_path}",
        )
    level = "WARN" if restarts else "PASS"
    return Finding(
        level,
        f"supervisor: healthy, {restarts} restarts in 24 h",
        "the server was restarted: look at the supervisor log for why",
    )


def _last_verify(ctx: Context) -> Finding:
    """The summary the last ``macpacs verify`` left in the data folder (pacs_server/verify.py)."""
    job = schedule.verify_job(ctx.layout, ctx.options.user)
    path = ctx.layout.data_dir / schedule.VERIFY_SUMMARY
    run_now = f"{' '.join(job.argv)} (it is safe while the server runs)"
    text = ctx.host.read_text(path)
    if text is None:
        return Finding("WARN", "no verify of the stored files has run yet", f"run it now: {run_now}")
    try:
        summary = json.loads(text)
        finished = dt.datetime.fromisoformat(summary["finished"])
        remaining, lost = int(summary["remaining"]), int(summary["repaired"]["missing"])
    except (ValueError, KeyError, TypeError):
        return Finding("WARN", f"cannot read the last verify's summary {path}", f"run it again: {run_now}")
    age_days = (dt.datetime.now(dt.UTC) - finished).total_seconds() / 86400
    when = f"last verify {summary['finished']}"
    if remaining:
        return Finding(
            "FAIL",
            f"{when}: {remaining} problems remain (missing, unindexed or changed files)",
            f"`macpacs verify --config {ctx.layout.config_file}` lists them; add --repair to fix what can be fixed",
        )
    if age_days > STALE_VERIFY_DAYS:
        return Finding(
            "WARN",
            f"{when}, {age_days:.0f} days ago: the weekly verify has not run since",
            f"is {job.label} / {job.timer} loaded? its errors go to {job.stderr_path}",
        )
    if lost:
        return Finding("WARN", f"{when}: {lost} images were lost (files gone, their rows dropped)", "see the log")
    return Finding("PASS", f"{when}: {summary['instances']} instances, no problems")


def _disk(ctx: Context) -> Finding:
    data = ctx.layout.data_dir
    free_gb = ctx.host.disk_free(data) / 1e9
    if free_gb < MIN_FREE_GB:
        return Finding("FAIL", f"{free_gb:.1f} GB free for {data}", "free space or move the archive to a larger volume")
    if free_gb < WARN_FREE_GB:
        return Finding("WARN", f"{free_gb:.0f} GB free for {data}", "plan a larger volume")
    return Finding("PASS", f"{free_gb:.0f} GB free for {data}")
