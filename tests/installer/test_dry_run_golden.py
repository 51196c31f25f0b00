"""Golden file of `--dry-run --target macos` on a scripted Mac: every check, command and file, in order."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from macpacs.installer.steps import default_source

from .fakes import PASSWORD

GOLDEN = Path(__file__).with_name("golden") / "dry-run-macos.txt"
BASE_PYTHON = str(getattr(sys, "_base_executable", None) or sys.executable)


def normalize(text: str, root: Path) -> str:
    return text.replace(str(root), "<ROOT>").replace(BASE_PYTHON, "<python>").replace(str(default_source()), "<SRC>")


def test_dry_run_output_matches_golden(mac):
    ctx = mac.install(dry_run=True)
    ran = [argv for argv, _stdin in mac.fake.calls]
    assert not any(a[0] in ("sysadminctl", "launchctl") or a[:2] == ("pmset", "-a") or "venv" in a for a in ran)
    assert mac.fake.pmset["autorestart"] == "0" and mac.fake.loaded == {}
    assert mac.files() == []
    text = normalize(mac.text(), mac.root) + "\n"
    assert PASSWORD not in text
    assert ctx.options.dry_run
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "dry-run output changed; if on purpose: UPDATE_GOLDEN=1 pytest ..."
