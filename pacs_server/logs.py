"""Logging: one line per event, to a rotated file in the logs folder and to stderr.

Every logger is named for its module (``logging.getLogger(__name__)``), so each line says where it
came from (``macpacs.pacs_server.dimse.scp``, ``macpacs.supervisor.core``...) and one prefix,
``macpacs``, selects all of ours.

Log lines name patients' studies and the addresses of callers, so the files are 0640 (the
account and its admin group, nobody else) whatever the process's umask, and the folder the
server creates for them 0750.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from io import TextIOWrapper
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_MODE = 0o640
LOG_DIR_MODE = 0o750


class LogFile(logging.handlers.RotatingFileHandler):
    """``macpacs.log`` (10 MB × 10 files), each file 0640 from the moment it is opened.

    The mode is set on the open file itself: the umask of ``macpacs serve`` (0077) would make it
    0600, and another process's umask (a shell's 0022) 0644. Rotated files keep it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=10 * 1024 * 1024, backupCount=10)

    def _open(self) -> TextIOWrapper:
        stream = super()._open()
        with contextlib.suppress(OSError):  # a file owned by another account keeps its mode
            os.fchmod(stream.fileno(), LOG_FILE_MODE)
        return stream


def setup(log_dir: Path, level: str = "INFO") -> Path:
    """Log to ``<log_dir>/macpacs.log`` and stderr; returns the log file path.

    ``macpacs serve`` calls it once, first, so that the file modes it fixes are in the log too.
    """
    path = log_dir / "macpacs.log"
    make_log_dir(log_dir)
    file_handler = LogFile(path)
    stream_handler = logging.StreamHandler()
    for handler in (file_handler, stream_handler):
        handler.setFormatter(logging.Formatter(FORMAT))
    setup_handler(file_handler, level)
    logging.getLogger().addHandler(stream_handler)
    return path


def make_log_dir(log_dir: Path) -> None:
    """Create the logs folder (0750, whatever the umask) if it does not exist yet; whichever
    process writes first (the server, or a command's audit record) makes it the same way."""
    if not log_dir.exists():
        log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            log_dir.chmod(LOG_DIR_MODE)


def setup_handler(handler: logging.Handler, level: str = "INFO") -> None:
    """Make ``handler`` the root logger's only one, at ``level``, with our library levels.

    ``setup`` uses it for the log file; a DICOM worker process for the handler that forwards its
    records to the main process, which alone writes the file.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; our own lines already say what happened.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom complains about every odd value it meets; ingest logs what matters in its own words.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
