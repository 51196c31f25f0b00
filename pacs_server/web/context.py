"""What the web app needs from the running archive: one small object handed to ``create_app``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..index import Index
from ..ingest import Ingestor
from ..storage import FileStore


def _nothing() -> None:
    return None


@dataclass
class WebContext:
    """The archive's shared parts, as the web app sees them.

    ``request_stop`` asks the whole process to stop cleanly (XML-RPC ``KillOsiriX`` and the
    admin pages use it); ``stop_web_listener`` stops only the web listener (debug fault switch).
    """

    settings: Settings
    index: Index
    store: FileStore
    ingestor: Ingestor
    started_at: float = field(default_factory=time.time)
    request_stop: Callable[[], None] = _nothing
    stop_web_listener: Callable[[], None] = _nothing
    # The DICOM listener's open associations and worker processes (``/health``).
    dicom_status: Callable[[], dict[str, Any]] | None = None
