"""``macpacs supervise``: the watchdog's command line (dispatched lazily by ``installer.entry``).

Imports nothing of ``pacs_server``: the watchdog must keep working when the server's code does not.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from .alerts import Alerter
from .core import Settings, Supervisor
from .probes import HeartbeatProbe, ProbeRunner, build_probes, parse_dicom

log = logging.getLogger(__name__)

# The heartbeat is answered from memory: 1.5 s without an answer is a missed beat, not a slow one.
HEARTBEAT_TIMEOUT_S = 1.5


def _dicom(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_dicom(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _regex(_ctx: click.Context, _param: click.Parameter, value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise click.BadParameter(f"not a regular expression: {exc}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--web-url", help="Full URL of the web server's /testdbalive, e.g. http://127.0.0.1:3333/testdbalive.")
@click.option(
    "--xmlrpc-url",
    help="URL of the OsiriX XML-RPC server, e.g. http://127.0.0.1:8080/ (https:// when its xmlrpc.tls is on).",
)
@click.option("--dicom", callback=_dicom, metavar="HOST:PORT:AET", help="Also probe the DICOM listener with C-ECHO.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Certificate(s) to trust for https:// --web-url, --heartbeat-url and --xmlrpc-url, e.g. the server's "
    "self-signed one.",
)
@click.option(
    "--heartbeat-url",
    help="The server's heartbeat, e.g. http://127.0.0.1:3333/heartbeat: asked every --heartbeat-interval; "
    "the server is hung (stopped at once) without a good answer for --hung-after, and only busy when other "
    "probes time out while it answers.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between two heartbeat requests.",
)
@click.option(
    "--hung-after",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds without a good heartbeat after which the server is hung and stopped.",
)
@click.option(
    "--busy-limit",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds that probes may time out while the heartbeat is fresh before such rounds count as failed.",
)
@click.option(
    "--low-space-mb",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Alert once when the heartbeat reports less free space (MB) where instances are stored; 0: never.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds between the starts of two probe rounds.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Hard limit, in seconds, for each probe round.",
)
@click.option(
    "--failures",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Consecutive failed rounds before the server is stopped.",
)
@click.option(
    "--startup-grace",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds a (re)started server may take to answer before failures count.",
)
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The server's PID file (<data dir>/macpacs.pid). Kill mode stops only the process it proves to be "
    "the server; without it, none.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The server's data folder, which the PID file must name.  [default: the PID file's folder]",
)
@click.option(
    "--process-match",
    default=r"macpacs serve\b",
    show_default=True,
    callback=_regex,
    help="Regular expression the server's command line must match (searched in the space-joined argv), "
    "one of the checks before a kill.",
)
@click.option(
    "--mode",
    type=click.Choice(["kill", "spawn"]),
    default="kill",
    show_default=True,
    help="kill: stop the server and let launchd/systemd restart it. spawn: run the server ourselves "
    "(the command follows --).",
)
@click.option(
    "--status-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON status, rewritten atomically after every round.",
)
@click.option("--alert-command", help="Shell command run on an alert; JSON on stdin and in $MACPACS_ALERT.")
@click.option("--alert-webhook", help="URL that receives each alert as a JSON POST.")
@click.option(
    "--max-restarts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Restarts allowed within --restart-window; one more is a crash loop: alert and hold off.",
)
@click.option(
    "--restart-window",
    type=click.FloatRange(min=0.01),
    default=10.0,
    show_default=True,
    help="Crash-loop window, in minutes.",
)
@click.option(
    "--kill-grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO", show_default=True
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def supervise(
    web_url: str | None,
    xmlrpc_url: str | None,
    dicom: str | None,
    ca_file: str | None,
    heartbeat_url: str | None,
    heartbeat_interval: float,
    hung_after: float,
    busy_limit: float,
    low_space_mb: int,
    interval: float,
    timeout: float,
    failures: int,
    startup_grace: float,
    pid_file: Path | None,
    data_dir: Path | None,
    process_match: re.Pattern[str],
    mode: str,
    status_file: Path | None,
    alert_command: str | None,
    alert_webhook: str | None,
    max_restarts: int,
    restart_window: float,
    kill_grace: float,
    log_level: str,
    command: tuple[str, ...],
) -> None:
    """Watchdog: probe the server, and stop it when it hangs so that it comes back.

    \b
    kill mode (launchd/systemd restarts the server):
      macpacs supervise --web-url http://127.0.0.1:3333/testdbalive \\
          --heartbeat-url http://127.0.0.1:3333/heartbeat \\
          --xmlrpc-url http://127.0.0.1:8080/ --pid-file DATA/macpacs.pid
    spawn mode (no service manager):
      macpacs supervise --mode spawn --web-url ... -- macpacs serve --data-dir DATA
    """
    logging.basicConfig(level=log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if mode == "spawn" and not command:
        raise click.UsageError("--mode spawn needs the server's command after --, e.g. -- macpacs serve")
    if mode == "kill" and command:
        raise click.UsageError("a command after -- is only for --mode spawn")
    probes = build_probes(web_url, xmlrpc_url, dicom, ca_file=ca_file)
    if not probes:
        raise click.UsageError("give at least one of --web-url, --xmlrpc-url, --dicom")
    if low_space_mb and not heartbeat_url:
        raise click.UsageError("--low-space-mb reads free space from the heartbeat: give --heartbeat-url too")
    if heartbeat_url and hung_after <= HEARTBEAT_TIMEOUT_S:
        raise click.UsageError(f"--hung-after must be longer than one heartbeat's timeout ({HEARTBEAT_TIMEOUT_S:g} s)")
    if interval < timeout:
        log.info("--interval %g s is shorter than --timeout %g s: a hung round delays the next one", interval, timeout)
    settings = Settings(
        runner=ProbeRunner(probes, timeout),
        interval=interval,
        failures=failures,
        startup_grace=startup_grace,
        pid_file=pid_file,
        data_dir=data_dir,
        process_match=process_match,
        mode=mode,
        command=list(command),
        status_file=status_file,
        max_restarts=max_restarts,
        restart_window=restart_window * 60,
        kill_grace=kill_grace,
        heartbeat=ProbeRunner([HeartbeatProbe(heartbeat_url, ca_file)], HEARTBEAT_TIMEOUT_S) if heartbeat_url else None,
        heartbeat_interval=heartbeat_interval,
        hung_after=hung_after,
        busy_limit=busy_limit,
        low_space_mb=low_space_mb,
    )
    supervisor = Supervisor(settings, Alerter(alert_command, alert_webhook, timeout=max(timeout, 5.0)))

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        supervisor.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sys.exit(supervisor.run())
