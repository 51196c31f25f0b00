"""Renders the files of an installation from the Jinja2 templates in ``templates/``.

The values (argv lists, paths, limits) are computed here in Python; the templates only lay them
out, with the escaping of their format: XML for plists, TOML strings, systemd quoting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from macpacs import templates

from .layout import SERVER_LABEL, SERVER_UNIT, Layout

TEMPLATE_DIR = Path(templates.__file__).resolve().parent

# launchd/systemd limits, shared by both service managers.
THROTTLE_INTERVAL = 10  # s between two starts of a job (launchd's default, written out)
SERVER_EXIT_TIMEOUT = 30  # s between SIGTERM and SIGKILL: the server closes associations and the index
NUMBER_OF_FILES = 8192  # open files: 100 associations, index, logs, uvicorn sockets
START_LIMIT_INTERVAL = 300
START_LIMIT_BURST = 20
RESTART_SEC = 2
# The supervisor's defaults (supervisor/cli.py): --interval 15, --timeout 10, --failures 3,
# --startup-grace 60. It pings systemd only after healthy rounds, so the watchdog must outlast
# failures*interval + timeout (a kill) + startup grace + 2 intervals: 45 + 10 + 60 + 30 = 145 s.
WATCHDOG_SEC = 180


def toml_string(value: object) -> str:
    """A TOML basic string; JSON's escapes are a subset of TOML's."""
    return json.dumps(str(value), ensure_ascii=False)


def systemd_quote(word: str) -> str:
    """One word of a systemd command line or Environment= assignment, quoted when needed."""
    word = word.replace("%", "%%")
    if word and not any(c in word for c in " \t\"'\\;$"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def systemd_path(path: str) -> str:
    """A path setting (WorkingDirectory=): no quoting, but ``%`` starts a specifier."""
    return path.replace("%", "%%")


def systemd_argv(argv: list[str]) -> str:
    return " ".join(systemd_quote(a) for a in argv)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=lambda name: bool(name and name.endswith(".plist.j2")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["toml"] = toml_string
    env.filters["systemd_quote"] = systemd_quote
    env.filters["systemd_argv"] = systemd_argv
    env.filters["systemd_path"] = systemd_path
    return env


def render(name: str, **values: Any) -> str:
    return _environment().get_template(name).render(**values)


def server_argv(layout: Layout) -> list[str]:
    return [str(layout.macpacs), "serve", "--config", str(layout.config_file)]


def supervisor_argv(layout: Layout, ae_title: str, dicom_port: int, web_port: int, xmlrpc_port: int) -> list[str]:
    """The supervisor's explicit command line (options of supervisor/cli.py, kill mode)."""
    return [
        str(layout.macpacs),
        "supervise",
        "--web-url", f"http://127.0.0.1:{web_port}/testdbalive",
        "--xmlrpc-url", f"http://127.0.0.1:{xmlrpc_port}/",
        "--dicom", f"127.0.0.1:{dicom_port}:{ae_title}",
        "--pid-file", str(layout.pid_file),
        "--status-file", str(layout.status_file),
        "--mode", "kill",
    ]  # fmt: skip


def environment(layout: Layout) -> dict[str, str]:
    """Variables of both jobs (launchd does no shell expansion: everything is spelled out)."""
    return {
        "PATH": f"{layout.prefix / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "en_US.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "MACPACS_CONFIG": str(layout.config_file),
    }


def config(layout: Layout, ae_title: str, dicom_port: int, web_port: int, xmlrpc_port: int) -> str:
    restart = (
        f"sudo launchctl kickstart -k gui/UID/{SERVER_LABEL}, or system/{SERVER_LABEL} for a daemon"
        if layout.target == "macos"
        else f"sudo systemctl restart {SERVER_UNIT}"
    )
    return render(
        "macpacs.toml.j2",
        ae_title=ae_title,
        dicom_port=dicom_port,
        web_port=web_port,
        xmlrpc_port=xmlrpc_port,
        data_dir=str(layout.data_dir),
        log_dir=str(layout.log_dir),
        status_file=str(layout.status_file),
        restart_hint=restart,
    )


def launchd_plist(
    layout: Layout, label: str, argv: list[str], *, log_name: str, user_name: str | None, exit_timeout: int
) -> str:
    """A launchd job. ``user_name`` is set for daemons only (agents run as the logged-in user)."""
    return render(
        "launchd/job.plist.j2",
        label=label,
        program_arguments=argv,
        user_name=user_name,
        # Agents: only in the GUI (Aqua) session of the auto-login, never in an SSH session.
        session_type=None if user_name else "Aqua",
        throttle_interval=THROTTLE_INTERVAL,
        exit_timeout=exit_timeout,
        working_directory=str(layout.data_dir),
        stdout_path=str(layout.log_dir / f"{log_name}.out.log"),
        stderr_path=str(layout.log_dir / f"{log_name}.err.log"),
        number_of_files=NUMBER_OF_FILES,
        environment=environment(layout),
    )


def systemd_unit(name: str, layout: Layout, user: str, argv: list[str]) -> str:
    return render(
        f"systemd/{name}.j2",
        user=user,
        data_dir=str(layout.data_dir),
        environment=environment(layout),
        server_argv=argv,
        supervisor_argv=argv,
        server_unit=SERVER_UNIT,
        start_limit_interval=START_LIMIT_INTERVAL,
        start_limit_burst=START_LIMIT_BURST,
        restart_sec=RESTART_SEC,
        exit_timeout=SERVER_EXIT_TIMEOUT,
        number_of_files=NUMBER_OF_FILES,
        watchdog_sec=WATCHDOG_SEC,
    )
