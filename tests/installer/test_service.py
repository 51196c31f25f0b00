"""One service description, two managers: what launchd and systemd both know must be equal.

Each service is rendered to a plist (parsed with plistlib) and a unit (parsed below), and every
value both managers have is read back from both files and compared with the description. A key
that only one manager gets must be listed here with its reason, so drift fails a test.
"""

from __future__ import annotations

import plistlib
import shlex
from pathlib import Path

import pytest

from macpacs.installer import render
from macpacs.installer.layout import Layout
from macpacs.installer.service import (
    SERVER_STOP_TIMEOUT_S,
    SUPERVISOR_STOP_TIMEOUT_S,
    Restart,
    Service,
    server_service,
    supervisor_service,
)

# plist key -> systemd [Service] option, for the values both managers have.
SHARED = {
    "ProgramArguments": "ExecStart",
    "WorkingDirectory": "WorkingDirectory",
    "EnvironmentVariables": "Environment",
    "ExitTimeOut": "TimeoutStopSec",
    "KeepAlive": "Restart",
    "ThrottleInterval": "RestartSec",
    "SoftResourceLimits": "LimitNOFILE",
    "StandardOutPath": "StandardOutput",
    "StandardErrorPath": "StandardError",
}
# launchd only: Label (systemd names a unit by its file), RunAtLoad (systemd: WantedBy= and
# `enable`), ProcessType (systemd does not throttle background jobs).
PLIST_ONLY = {"Label", "RunAtLoad", "ProcessType"}
# systemd only: Type (and the notify settings: launchd has no readiness or watchdog), User
# (launchd: UserName for daemons only, an agent runs as the logged-in user).
SYSTEMD_ONLY = {"Type", "User"}
# [Unit]: ordering and the crash-loop limit have no launchd counterpart.
UNIT_SECTION = {"Description", "StartLimitIntervalSec", "StartLimitBurst"}

# A space, `%` (systemd specifier), `$` (ExecStart expansion), quotes and a backslash in the paths.
ODD = Layout("linux", Path('/Volumes/RAID 1/100% "pacs" $HOME'), prefix=Path("/opt/mac pacs\\x"))


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values, in order]}}; comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def unspecify(text: str) -> str:
    """Undo the ``%%`` escaping of systemd specifiers."""
    return text.replace("%%", "%")


def exec_words(line: str) -> list[str]:
    """The words of an ExecStart= line: systemd's quoting is POSIX-like, plus ``$$`` and ``%%``."""
    return [unspecify(word.replace("$$", "$")) for word in shlex.split(line)]


def assignment(line: str) -> tuple[str, str]:
    """One Environment= assignment: quoted as one word, no ``$`` expansion."""
    (word,) = shlex.split(line)
    name, _, value = unspecify(word).partition("=")
    return name, value


def services(layout: Layout) -> list[Service]:
    return [
        server_service(layout, "pacs"),
        supervisor_service(layout, "pacs", ae_title="CT $1", dicom_port=11112, web_port=3333, xmlrpc_port=8080),
    ]


def both(service: Service, *, agent: bool) -> tuple[dict, dict[str, str | list[str]], dict]:
    """(plist, [Service] with single values unwrapped, whole unit) of one service."""
    plist = plistlib.loads(render.launchd_plist(service, agent=agent).encode())
    unit = parse_unit(render.systemd_unit(service))
    options = {k: v if k == "Environment" else v[0] for k, v in unit["Service"].items()}
    assert all(len(v) == 1 for k, v in unit["Service"].items() if k != "Environment")
    return plist, options, unit


@pytest.mark.parametrize("layout", [Layout("macos", Path("/Users/Shared/macpacs")), ODD], ids=["macos", "odd-paths"])
@pytest.mark.parametrize("agent", [True, False], ids=["agent", "daemon"])
@pytest.mark.parametrize("index", [0, 1], ids=["server", "supervisor"])
def test_launchd_and_systemd_get_the_same_values(layout: Layout, agent: bool, index: int):
    service = services(layout)[index]
    plist, unit, _whole = both(service, agent=agent)

    assert plist["ProgramArguments"] == exec_words(unit["ExecStart"]) == list(service.argv)
    assert plist["WorkingDirectory"] == unspecify(unit["WorkingDirectory"]) == str(service.working_directory)
    environment = dict(assignment(line) for line in unit["Environment"])
    assert plist["EnvironmentVariables"] == environment == dict(service.environment)
    assert plist["ExitTimeOut"] == int(unit["TimeoutStopSec"]) == service.stop_timeout_s
    assert plist["ThrottleInterval"] == int(unit["RestartSec"]) == service.throttle_s
    assert plist["SoftResourceLimits"] == {"NumberOfFiles": service.open_files}
    assert int(unit["LimitNOFILE"]) == service.open_files
    assert plist["StandardOutPath"] == unspecify(unit["StandardOutput"].removeprefix("append:"))
    assert plist["StandardErrorPath"] == unspecify(unit["StandardError"].removeprefix("append:"))
    assert plist["StandardErrorPath"] == str(service.stderr_path) != plist["StandardOutPath"]
    # Restarted after any exit, SIGKILL included (KeepAlive {Crashed: true} would not be).
    assert service.restart is Restart.ALWAYS and plist["KeepAlive"] is True and unit["Restart"] == "always"
    assert unit["User"] == service.user
    if agent:
        assert plist["LimitLoadToSessionType"] == "Aqua" and "UserName" not in plist
    else:
        assert plist["UserName"] == service.user and "LimitLoadToSessionType" not in plist


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "daemon"])
def test_every_key_is_shared_or_has_a_reason(agent: bool):
    for service in services(ODD):
        plist, unit, whole = both(service, agent=agent)
        launchd_only = PLIST_ONLY | ({"LimitLoadToSessionType"} if agent else {"UserName"})
        assert set(plist) == set(SHARED) | launchd_only
        notify = (
            {"NotifyAccess"} | ({"WatchdogSec"} if service.notify.watchdog_s else set()) if service.notify else set()
        )
        assert set(unit) == set(SHARED.values()) | SYSTEMD_ONLY | notify
        assert set(whole) == {"Unit", "Service", "Install"}
        ordering = {"After", "Wants"} if service.after else set()
        assert set(whole["Unit"]) == UNIT_SECTION | ordering
        assert whole["Install"] == {"WantedBy": ["multi-user.target"]}


def test_each_service_is_stopped_alike_and_limited_alike():
    server, supervisor = services(ODD)
    assert server.stop_timeout_s == SERVER_STOP_TIMEOUT_S == 30  # closes associations and the index
    assert supervisor.stop_timeout_s == SUPERVISOR_STOP_TIMEOUT_S == 20  # ends its round (--timeout 10)
    assert server.open_files == supervisor.open_files == 8192
    # The server sends READY=1 once every listener accepts; only the supervisor pings a watchdog.
    assert server.notify is not None and (server.notify.access, server.notify.watchdog_s) == ("main", None)
    _plist, unit, _whole = both(server, agent=False)
    assert (unit["Type"], unit["NotifyAccess"], "WatchdogSec" in unit) == ("notify", "main", False)
    assert supervisor.notify is not None and supervisor.notify.access == "all"
    _plist, unit, whole = both(supervisor, agent=False)
    assert (unit["Type"], unit["WatchdogSec"], unit["NotifyAccess"]) == ("notify", "180", "all")
    assert whole["Unit"]["After"] == whole["Unit"]["Wants"] == [server.unit]
    assert whole["Unit"]["StartLimitBurst"] == ["20"] and whole["Unit"]["StartLimitIntervalSec"] == ["300"]


def test_every_restart_policy_has_both_spellings():
    assert set(render.LAUNCHD_KEEP_ALIVE) == set(Restart) == set(render.SYSTEMD_RESTART)
