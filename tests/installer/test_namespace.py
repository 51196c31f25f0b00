"""macpacs installs one import name of its own, beside PyPI's ``installer`` and ``supervisor``.

The repository keeps its top-level folders (``pacs_server/``, ``installer/``, ``supervisor/``,
``templates/``); pyproject.toml maps them under ``macpacs``. A wheel built from this checkout
must hold nothing else at its top level, and a venv with PyPI's ``installer`` (pypa) and
``supervisor`` (Supervisor) installed too must import both theirs and ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)], cwd=out)
    (built,) = out.glob("macpacs-*.whl")
    return built


def test_the_wheel_holds_only_the_macpacs_import_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"macpacs", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    # Every module of the four folders is in it (pyproject.toml lists the packages one by one).
    for folder in ("pacs_server", "installer", "supervisor", "templates"):
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in source.parts:
                assert f"macpacs/{source.relative_to(ROOT).as_posix()}" in names, f"{source} is not in the wheel"
    # Templates, migrations and web assets travel with the code.
    assert "macpacs/templates/launchd/job.plist.j2" in names
    assert "macpacs/pacs_server/index/migrations/script.py.mako" in names
    assert any(name.startswith("macpacs/pacs_server/web/static/js/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "macpacs = macpacs.installer.entry:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installs_beside_pypi_installer_and_supervisor(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "installer", "supervisor"], cwd=tmp_path)
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    # Our dependencies come from the test environment's site-packages (no second download).
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    Path(purelib, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import installer, supervisor, installer.sources, supervisor.supervisord\n"
        "import macpacs.installer.entry, macpacs.supervisor.cli, macpacs.pacs_server.server\n"
        "import macpacs.pacs_server.web.app, macpacs.installer.render\n"
        "print(installer.__file__); print(supervisor.__file__); print(macpacs.installer.entry.__file__)\n"
    )
    theirs_installer, theirs_supervisor, ours = _run([str(python), "-c", probe], tmp_path).splitlines()
    for path in (theirs_installer, theirs_supervisor, ours):
        assert path.startswith(purelib), path
    assert "/macpacs/" not in theirs_installer and "/macpacs/" not in theirs_supervisor
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(
        [str(venv / "bin" / "macpacs"), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "supervise" in done.stdout and "serve" in done.stdout
