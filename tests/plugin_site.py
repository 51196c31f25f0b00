"""A site plugin "installed" into a folder the way pip installs one, for tests that write their own.

The folder holds the plugin's module and the ``dist-info`` naming its entry point in the
``macpacs.plugins`` group, so that entry point discovery finds it once the folder is on the
path (``PYTHONPATH`` for a server process, ``sys.path`` for this one).
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def install_plugin(folder: Path, module: str, entry_point: str, source: str) -> Path:
    """Write ``source`` as ``<module>.py`` into ``folder`` with its dist-info (distribution
    ``module`` with dashes, version 1.0) declaring ``entry_point``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[macpacs.plugins]\n{entry_point} = {module}\n")
    return folder
