"""Logging: one line per event, to a rotated file in the logs folder and to stderr.

Every logger is named for its module (``logging.getLogger(__name__)``), so each line says where it
came from (``macpacs.pacs_server.dimse.scp``, ``macpacs.supervisor.core``...) and one prefix,
``macpacs``, selects all of ours.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(log_dir: Path, level: str = "INFO") -> Path:
    """Log to ``<log_dir>/macpacs.log`` (10 MB × 10 files) and stderr; returns the log file path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "macpacs.log"
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 1024 * 1024, backupCount=10)
    stream_handler = logging.StreamHandler()
    for handler in (file_handler, stream_handler):
        handler.setFormatter(logging.Formatter(FORMAT))
    setup_handler(file_handler, level)
    logging.getLogger().addHandler(stream_handler)
    return path


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
