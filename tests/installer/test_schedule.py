"""The weekly verify: one description, a launchd calendar job and a systemd timer that agree, and
what doctor says of the last verify's summary.

launchd's keys and their types are those of launchd.plist(5): StartCalendarInterval is a
dictionary of integers (Weekday 0 and 7 are Sunday), ProcessType a string, LowPriorityIO a
boolean. The systemd units are checked by ``systemd-analyze`` itself (``verify`` on the files,
``calendar`` on the time).
"""

from __future__ import annotations

import datetime as dt
import json
import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from macpacs.installer import doctor, schedule
from macpacs.installer.layout import Layout
from macpacs.pacs_server import verify as pacs_verify

from .fakes import USER, options
from .test_service import ODD, assignment, exec_words, parse_unit, unspecify

AGENTS = f"Users/{USER}/Library/LaunchAgents"


@pytest.mark.parametrize("layout", [Layout("macos", Path("/Users/Shared/macpacs")), ODD], ids=["macos", "odd-paths"])
@pytest.mark.parametrize("agent", [True, False], ids=["agent", "daemon"])
def test_launchd_job_and_systemd_timer_get_the_same_values(layout: Layout, agent: bool) -> None:
    job = schedule.verify_job(layout, "pacs")
    plist = plistlib.loads(schedule.launchd_plist(job, agent=agent).encode())
    (service_name, service_text), (timer_name, timer_text) = schedule.systemd_units(job)
    assert (service_name, timer_name) == ("macpacs-verify.service", "macpacs-verify.timer")
    service, timer = parse_unit(service_text), parse_unit(timer_text)
    options = service["Service"]

    assert job.argv[1:3] == ("verify", "--config") and "--repair" not in job.argv  # it reports only
    assert plist["ProgramArguments"] == exec_words(options["ExecStart"][0]) == list(job.argv)
    assert plist["WorkingDirectory"] == unspecify(options["WorkingDirectory"][0]) == str(job.working_directory)
    assert plist["EnvironmentVariables"] == dict(assignment(line) for line in options["Environment"])
    assert plist["StandardOutPath"] == unspecify(options["StandardOutput"][0].removeprefix("append:"))
    assert plist["StandardErrorPath"] == unspecify(options["StandardError"][0].removeprefix("append:"))
    assert plist["StartCalendarInterval"] == {"Weekday": 0, "Hour": 3, "Minute": 30}
    assert timer["Timer"] == {"OnCalendar": ["Sun *-*-* 03:30:00"], "Persistent": ["true"], "Unit": [service_name]}
    assert timer["Install"] == {"WantedBy": ["timers.target"]}
    assert options["Type"] == ["oneshot"] and options["User"] == ["pacs"]
    assert (options["Nice"], options["IOSchedulingClass"]) == (["10"], ["idle"])
    assert "Install" not in service  # started by its timer, never enabled itself
    # launchd: a job that runs at its time and exits, at low priority.
    assert "KeepAlive" not in plist and "RunAtLoad" not in plist
    assert plist["ProcessType"] == "Background" and plist["LowPriorityIO"] is True
    shared = {"Label", "ProgramArguments", "WorkingDirectory", "EnvironmentVariables", "StandardOutPath"}
    only = {"StartCalendarInterval", "ProcessType", "LowPriorityIO", "StandardErrorPath"}
    assert set(plist) == shared | only | ({"LimitLoadToSessionType"} if agent else {"UserName"})


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd (.ci/run does this)")
    prefix = tmp_path / "usr/local/macpacs"
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "macpacs"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    job = schedule.verify_job(Layout("linux", tmp_path / "data dir %x", prefix=prefix), "root")
    for name, text in schedule.systemd_units(job):
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / job.unit), str(tmp_path / job.timer)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    when = subprocess.run(
        ["systemd-analyze", "calendar", job.when.on_calendar()], capture_output=True, text=True, timeout=60
    )
    assert when.returncode == 0 and "Next elapse: Sun " in when.stdout and "03:30:00" in when.stdout, when.stdout


def test_install_loads_the_verify_job_and_uninstall_removes_it(mac) -> None:
    mac.install()
    path = mac.root / AGENTS / "org.macpacs.verify.plist"
    assert plistlib.loads(path.read_bytes())["StartCalendarInterval"]["Weekday"] == 0
    assert ("launchctl", "bootstrap", "gui/501", str(path)) in mac.changes()
    mac.install()
    assert mac.changes() == []  # loaded: already done
    mac.uninstall()
    assert mac.changes()[0] == ("launchctl", "bootout", "gui/501/org.macpacs.verify")
    assert not path.exists()


def test_doctor_names_the_summary_file_pacs_server_writes() -> None:
    assert schedule.VERIFY_SUMMARY == pacs_verify.SUMMARY_FILE


def summary(mac, *, age_days: float = 1, remaining: int = 0, lost: int = 0) -> None:
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days)).isoformat(timespec="seconds")
    (mac.root / "Users/Shared/macpacs" / schedule.VERIFY_SUMMARY).write_text(
        json.dumps(
            {
                "format": 1,
                "finished": when,
                "instances": 1234,
                "remaining": remaining,
                "repaired": {"missing": lost, "not-indexed": 0, "no-hash": 0},
            }
        )
    )


def finding(mac):
    found = doctor.diagnose(mac.context(options(password=None)))
    (last,) = [f for f in found if "verify" in f.what and "org.macpacs" not in f.what]
    return last


def test_doctor_reports_the_last_verify(mac) -> None:
    mac.install()
    assert finding(mac).level == "WARN" and "no verify of the stored files has run yet" in finding(mac).what
    assert "macpacs verify --config /usr/local/etc/macpacs/macpacs.toml" in finding(mac).fix
    summary(mac)
    assert finding(mac).level == "PASS" and "1234 instances, no problems" in finding(mac).what
    summary(mac, remaining=3)
    assert finding(mac).level == "FAIL" and "3 problems remain" in finding(mac).what
    assert "--repair" in finding(mac).fix
    summary(mac, age_days=9)
    assert finding(mac).level == "WARN" and "the weekly verify has not run since" in finding(mac).what
    summary(mac, lost=2)
    assert finding(mac).level == "WARN" and "2 images were lost" in finding(mac).what
    (mac.root / "Users/Shared/macpacs" / schedule.VERIFY_SUMMARY).write_text("{not json")
    assert finding(mac).level == "WARN" and "cannot read" in finding(mac).what
