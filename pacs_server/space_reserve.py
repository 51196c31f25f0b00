"""``space.reserve``: a few megabytes the server keeps in its data folder, so that it can start on a full disk.

SQLite cannot open a database in WAL mode without room on its volume: the first connection
allocates the shared-memory file (32 KB, one byte written into each of its pages) and start-up
writes a little (the PID file's text, the WAL of its first statements). With not a byte free,
and no staged file of ours to remove, ``macpacs serve`` could not open its index, so a disk
filled by another program kept the archive down until a person freed space, although nothing
in it was wrong.

So the server holds ``RESERVE_BYTES`` in a file of its own in the data folder (where the index
is by default) and, at start, when less than that is free once the staging folder is cleaned,
deletes it: the index then has the room it needs to open, and the server answers C-ECHO,
C-FIND, retrievals and the health checks, while stores stay refused by the free-space floor
(``storage.min_free_mb``, 500 MB by default: far above this reserve, so that stores never take
the space it gave back). The file is written again, in the background of the server's main
loop, once there is room for it above that floor.

The reserve helps only the volume of the data folder: an index elsewhere (``storage.index_url``)
has none. Nothing else may use the file's name; it holds zeros and may be deleted at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "space.reserve"
RESERVE_BYTES = 8 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024


class SpaceReserve:
    """The reserve file of one data folder: ``release_if_full`` at start, ``refill`` while running."""

    def __init__(self, data_dir: Path, floor_bytes: int) -> None:
        self.path = data_dir / NAME
        self.floor_bytes = floor_bytes
        self._present = self.path.is_file() and self.path.stat().st_size >= RESERVE_BYTES

    def release_if_full(self) -> bool:
        """Delete the reserve when less than its size is free; True when it was deleted."""
        if not self._present or _free(self.path.parent) >= RESERVE_BYTES:
            return False
        self.path.unlink(missing_ok=True)
        self._present = False
        log.warning(
            "the data volume of %s is full: released the %d MB kept in %s so that the index can open. "
            "The server answers queries and retrievals; stores are refused until space is freed, and the "
            "reserve is set aside again then",
            self.path.parent,
            RESERVE_BYTES // (1024 * 1024),
            self.path,
        )
        return True

    def refill(self) -> None:
        """Write the reserve if it is missing and there is room for it above the free-space floor.

        Called every second by the server's main loop: a no-op (no system call) while it exists.
        """
        if self._present:
            return
        try:
            if _free(self.path.parent) < self.floor_bytes + 2 * RESERVE_BYTES:
                return
            partial = self.path.with_name(NAME + ".part")
            chunk = bytes(_CHUNK_BYTES)  # not kept: a constant would hold 1 MB of the server's memory
            with open(partial, "wb") as fh:
                for _ in range(RESERVE_BYTES // _CHUNK_BYTES):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(partial, self.path)
        except OSError as exc:  # a disk filling meanwhile: the next turn tries again
            with contextlib.suppress(OSError):
                self.path.with_name(NAME + ".part").unlink()
            log.debug("cannot write the space reserve %s yet: %s", self.path, exc)
            return
        self._present = True
        log.info("set aside %d MB in %s for a start on a full disk", RESERVE_BYTES // (1024 * 1024), self.path)


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free
