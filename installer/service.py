"""One description of each service, rendered both to a launchd plist and to a systemd unit.

As Homebrew's ``service.rb``: a ``Service`` says once what a service runs and how it is kept
alive; ``render.launchd_plist`` and ``render.systemd_unit`` only spell it for their manager. A
value that both managers know (arguments, environment, working directory, stop timeout, restart
policy and delay, open files, log paths, user) therefore cannot differ between macOS and Linux.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .layout import SERVER_LABEL, SERVER_UNIT, SUPERVISOR_LABEL, SUPERVISOR_UNIT, Layout

# s between SIGTERM and SIGKILL when the manager stops a service: the server closes its
# associations and the index; the supervisor ends its current round (at most --timeout, 10 s).
SERVER_STOP_TIMEOUT_S = 30
SUPERVISOR_STOP_TIMEOUT_S = 20
THROTTLE_S = 10  # s before a restart (launchd's default ThrottleInterval, written out)
OPEN_FILES = 8192  # 100 associations, index, logs, uvicorn sockets
# The supervisor as installed (docs/supervisor.md): the heartbeat every second, hung after 5 s
# without a good one (then SIGTERM, SIGKILL after 3 s); the other probes every 5 s, time-outs not
# counted while the heartbeat is fresh, 2 wrong answers in a row act. A frozen server is back in
# about 5 + 1 + its start-up s on launchd, whose ThrottleInterval counts from the last start. (On
# systemd RestartSec, the same THROTTLE_S, waits after the exit: up to 10 s more.)
SUPERVISOR_ARGS = (
    "--heartbeat-interval", "1",
    "--hung-after", "5",
    "--interval", "5",
    "--timeout", "5",
    "--failures", "2",
    "--kill-grace", "3",
)  # fmt: skip
# Alert once when free space where instances are stored falls under this (about 20 CT studies).
LOW_SPACE_MB = 10240
# It pings systemd after every healthy (or busy) turn, so the watchdog must outlast the longest
# spell without one that ends well: 2 failed rounds (2 x 5 s + 5 s), the kill (3 s) and the
# start-up grace (60 s): 78 s.
SUPERVISOR_WATCHDOG_S = 180


class Restart(enum.Enum):
    """When the manager starts a service again after it exits."""

    # After any exit, including the watchdog's SIGKILL: launchd `KeepAlive` true (not
    # {Crashed: true}, for which SIGKILL is no crash), systemd `Restart=always`.
    ALWAYS = "always"


@dataclass(frozen=True)
class StartLimit:
    """More than ``burst`` starts within ``interval_s`` is a crash loop: systemd stops trying."""

    interval_s: int
    burst: int


CRASH_LOOP = StartLimit(interval_s=300, burst=20)


@dataclass(frozen=True)
class Notify:
    """The service speaks systemd's notify protocol: READY=1 once it serves, then (with
    ``watchdog_s``) WATCHDOG=1 pings; systemd restarts it when no ping came for ``watchdog_s``.
    """

    watchdog_s: int | None = None
    # `all`: the messages may come from any process of the unit; `main`: only its main process.
    access: str = "all"


@dataclass(frozen=True)
class Service:
    """Everything a service manager needs to run one macpacs process, said once."""

    label: str  # launchd Label
    unit: str  # systemd unit file name
    description: str
    argv: tuple[str, ...]
    working_directory: Path
    environment: Mapping[str, str]
    user: str
    stdout_path: Path
    stderr_path: Path
    stop_timeout_s: int
    restart: Restart = Restart.ALWAYS
    throttle_s: int = THROTTLE_S
    start_limit: StartLimit = CRASH_LOOP
    open_files: int = OPEN_FILES
    # Units started before this one and pulled in with it (systemd After= and Wants=).
    after: tuple[str, ...] = ()
    notify: Notify | None = None


def environment(layout: Layout) -> dict[str, str]:
    """Variables of every service, spelled out: launchd does no shell expansion."""
    return {
        "PATH": f"{layout.prefix / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "en_US.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "MACPACS_CONFIG": str(layout.config_file),
    }


def server_service(layout: Layout, user: str) -> Service:
    """The archive: ``macpacs serve`` with the installed config."""
    return Service(
        label=SERVER_LABEL,
        unit=SERVER_UNIT,
        description="macpacs DICOM archive",
        argv=(str(layout.macpacs), "serve", "--config", str(layout.config_file)),
        working_directory=layout.data_dir,
        environment=environment(layout),
        user=user,
        stop_timeout_s=SERVER_STOP_TIMEOUT_S,
        stdout_path=layout.log_dir / "server.out.log",
        stderr_path=layout.log_dir / "server.err.log",
        after=("network-online.target",),
        # READY=1 once every listener accepts (pacs_server/server.py), so that the supervisor and
        # units after this one start against a server that answers; its health is the supervisor's.
        notify=Notify(access="main"),
    )


def supervisor_service(
    layout: Layout,
    user: str,
    *,
    ae_title: str,
    dicom_port: int,
    web_port: int,
    xmlrpc_port: int,
    web_cert: str = "",
    xmlrpc_tls: bool = False,
) -> Service:
    """The watchdog in kill mode (options of supervisor/cli.py): the manager restarts what it kills.

    ``web_cert``: the web port serves HTTPS with this certificate, which the probes then trust;
    ``xmlrpc_tls``: so does the XML-RPC port (``[xmlrpc] tls``), probed over https as well.
    """
    web = f"{'https' if web_cert else 'http'}://127.0.0.1:{web_port}"
    argv = (
        str(layout.macpacs),
        "supervise",
        "--web-url", f"{web}/testdbalive",
        "--heartbeat-url", f"{web}/heartbeat",
        *(("--ca-file", web_cert) if web_cert else ()),
        "--xmlrpc-url", f"{'https' if xmlrpc_tls else 'http'}://127.0.0.1:{xmlrpc_port}/",
        "--dicom", f"127.0.0.1:{dicom_port}:{ae_title}",
        "--pid-file", str(layout.pid_file),
        "--status-file", str(layout.status_file),
        "--mode", "kill",
        *SUPERVISOR_ARGS,
        "--low-space-mb", str(LOW_SPACE_MB),
    )  # fmt: skip
    return Service(
        label=SUPERVISOR_LABEL,
        unit=SUPERVISOR_UNIT,
        description="macpacs watchdog (probes the archive, stops it when it hangs)",
        argv=argv,
        working_directory=layout.data_dir,
        environment=environment(layout),
        user=user,
        stdout_path=layout.log_dir / "supervisor.out.log",
        stderr_path=layout.log_dir / "supervisor.err.log",
        stop_timeout_s=SUPERVISOR_STOP_TIMEOUT_S,
        after=(SERVER_UNIT,),
        # It sends READY=1, then WATCHDOG=1 after each healthy round (docs/supervisor.md): systemd
        # restarts it if it stops pinging, for instance if it hangs itself.
        notify=Notify(watchdog_s=SUPERVISOR_WATCHDOG_S),
    )
