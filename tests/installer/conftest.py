"""Fixtures: a scripted Mac behind the run() seam, and a helper that installs onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from macpacs.installer import engine
from macpacs.installer.layout import Options
from macpacs.installer.steps import Context

from .fakes import PASSWORD, FakeHost, FakeMac, RecordingSystem, options


@dataclass
class Mac:
    """One scripted Mac; each ``install()`` is a fresh ``macpacs install`` process on it."""

    root: Path
    fake: FakeMac
    out: list[str] = field(default_factory=list)
    taken_ports: set[int] = field(default_factory=set)
    read_only: bool = False
    is_root: bool = True
    system: RecordingSystem | None = None

    def context(self, opts: Options, dry_run: bool = False) -> Context:
        self.out.clear()
        self.system = RecordingSystem(self.fake, dry_run=dry_run, out=self.out.append)
        self.system.add_secret(opts.password)
        host = FakeHost(self.system, self.fake, root=self.root, is_root=self.is_root)
        host.taken_ports = self.taken_ports
        host.read_only = self.read_only
        return engine.make_context(opts, host)

    def install(self, **overrides: object) -> Context:
        opts = options(**overrides)
        ctx = self.context(opts, dry_run=opts.dry_run)
        engine.install(ctx)
        return ctx

    def uninstall(self, purge: bool = False, **overrides: object) -> Context:
        overrides.setdefault("password", None)
        ctx = self.context(options(**overrides))
        engine.uninstall(ctx, purge=purge)
        return ctx

    def changes(self) -> list[tuple[str, ...]]:
        assert self.system is not None
        return self.system.changes()

    def text(self) -> str:
        return "\n".join(self.out)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def assert_password_hidden(self) -> None:
        assert self.system is not None
        assert PASSWORD not in self.text()
        for argv, _stdin, _changes in self.system.log:
            assert not any(PASSWORD in arg for arg in argv), argv


@pytest.fixture
def mac(tmp_path: Path) -> Mac:
    root = tmp_path / "root"
    root.mkdir()
    return Mac(root, FakeMac(root))
