"""The weekly ``macpacs verify``: one description, rendered to a launchd calendar job and a systemd timer.

A scheduled job is not a service: nothing keeps it alive or restarts it, it runs at a time and
exits (with 1 when problems remain, which systemd shows as a failed unit). So it has a
description of its own (``Job``), spelled for each manager by its own templates
(``launchd/calendar.plist.j2``, ``systemd/job.service.j2`` and ``systemd/job.timer.j2``), with
the same rule as ``service.py``: a value both managers know is given once, here.

The verify reads every stored file, so it runs at low priority on both (launchd: ProcessType
Background and LowPriorityIO; systemd: Nice and the idle I/O class) and once a week, at night.
A Mac asleep at that time runs it when it wakes (launchd coalesces missed calendar intervals);
systemd does the same with ``Persistent=true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import render
from .layout import Layout
from .service import environment

VERIFY_LABEL = "org.macpacs.verify"
VERIFY_UNIT = "macpacs-verify.service"
VERIFY_TIMER = "macpacs-verify.timer"
# systemd's day names, indexed as launchd's Weekday (0 and 7 are Sunday: launchd.plist(5)).
DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
# What `macpacs verify` leaves in the data folder (pacs_server/verify.py SUMMARY_FILE), for doctor.
VERIFY_SUMMARY = "verify-summary.json"
NICE = 10  # systemd: below the server's priority; launchd's Background ProcessType does the same


@dataclass(frozen=True)
class Weekly:
    """Once a week at ``hour:minute`` local time on ``weekday`` (0 = Sunday, as launchd counts)."""

    weekday: int
    hour: int
    minute: int

    def on_calendar(self) -> str:
        """systemd's OnCalendar= for this time."""
        return f"{DAYS[self.weekday]} *-*-* {self.hour:02d}:{self.minute:02d}:00"


VERIFY_WHEN = Weekly(weekday=0, hour=3, minute=30)  # Sunday night, when no modality sends


@dataclass(frozen=True)
class Job:
    """Everything a service manager needs to run one macpacs command on a schedule, said once."""

    label: str  # launchd Label
    unit: str  # systemd service unit the timer starts
    timer: str  # systemd timer unit
    description: str
    argv: tuple[str, ...]
    working_directory: Path
    environment: Mapping[str, str]
    user: str
    stdout_path: Path
    stderr_path: Path
    when: Weekly


def verify_job(layout: Layout, user: str) -> Job:
    """``macpacs verify`` with the installed config, weekly: it reports, it repairs nothing.

    Dropping the rows of lost files or indexing strays is left to an admin who read the report
    (``macpacs verify --repair``); the summary reaches the status page, ``/health`` and ``doctor``.
    """
    return Job(
        label=VERIFY_LABEL,
        unit=VERIFY_UNIT,
        timer=VERIFY_TIMER,
        description="macpacs weekly verify (stored files against the index)",
        argv=(str(layout.macpacs), "verify", "--config", str(layout.config_file)),
        working_directory=layout.data_dir,
        environment=environment(layout),
        user=user,
        stdout_path=layout.log_dir / "verify.out.log",
        stderr_path=layout.log_dir / "verify.err.log",
        when=VERIFY_WHEN,
    )


def launchd_plist(job: Job, *, agent: bool) -> str:
    """The job as a launchd calendar job: a LaunchAgent (``agent``) or a LaunchDaemon."""
    return render.render("launchd/calendar.plist.j2", job=job, agent=agent)


def systemd_units(job: Job) -> list[tuple[str, str]]:
    """(unit name, text) of the job's service and of the timer that starts it."""
    return [
        (job.unit, render.render("systemd/job.service.j2", job=job, nice=NICE)),
        (job.timer, render.render("systemd/job.timer.j2", job=job)),
    ]
