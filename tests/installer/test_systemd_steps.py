"""The systemd step on a live (non --root) Linux host, against a scripted systemctl."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from macpacs.installer.host import Host
from macpacs.installer.layout import Layout
from macpacs.installer.linux import UNITS, Systemd
from macpacs.installer.steps import Context, Effective
from macpacs.installer.system import Result

from .fakes import RecordingSystem, options


class FakeSystemctl:
    def __init__(self) -> None:
        self.enabled = False
        self.active = False

    def __call__(self, argv: Sequence[str], _input: str | None, _timeout: float) -> Result:
        verb = argv[1]
        if verb == "is-enabled":
            return Result(tuple(argv), 0 if self.enabled else 1, "enabled\n" if self.enabled else "disabled\n")
        if verb == "is-active":
            return Result(tuple(argv), 0 if self.active else 3, "active\n" if self.active else "inactive\n")
        if verb == "enable":
            self.enabled = True
        if verb == "restart":
            self.active = True
        if verb == "disable":
            self.enabled = self.active = False
        return Result(tuple(argv), 0)


def test_systemd_step_argv_idempotence_and_undo(tmp_path: Path):
    fake = FakeSystemctl()
    system = RecordingSystem(fake, out=lambda _s: None)
    ctx = Context(
        options(target="linux", user="root", password=None),
        Layout("linux", Path("/var/lib/macpacs")),
        Host(system, root=tmp_path),
        Effective("MACPACS", 11112, 3333, 8080),
    )
    step = Systemd()
    assert not step.check(ctx).done
    step.apply(ctx)
    assert system.changes() == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", *UNITS),
        ("systemctl", "restart", *UNITS),
    ]
    assert (tmp_path / "etc/systemd/system/macpacs.service").read_text().startswith("# Written by `macpacs install`")
    system.log.clear()
    assert step.check(ctx).done and system.changes() == []
    step.undo(ctx)
    assert system.changes() == [("systemctl", "disable", "--now", *UNITS), ("systemctl", "daemon-reload")]
    assert not (tmp_path / "etc/systemd/system/macpacs.service").exists()
