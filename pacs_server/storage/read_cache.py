"""A bounded read cache on local disk for a remote blob store, shared by the processes of one host.

An object store is a network round trip (and a download) away, and the readers of a blob want
a local, seekable file: pydicom seeks to a frame, C-MOVE reads the dataset after its file meta.
So a remote blob is read into ``<data_dir>/cache/<key>`` once and opened from there. A
blob just uploaded is kept there too (the staged file is moved in, no copy), since a workstation
often retrieves a study minutes after it arrived.

Every process of the host (the server, each DICOM worker, a CLI command) shares the folder:

- An entry appears by ``os.replace`` of a complete file, so no reader sees half of one; two
  processes filling the same key at once both write a whole copy and the last rename wins.
- A reader gets an open file: when another process evicts that entry meanwhile, the open file
  still reads (POSIX keeps an unlinked file until its last descriptor closes).
- The bytes in the folder are counted in ``usage`` under an ``flock`` of ``lock``; when an
  addition takes them past the bound, the adder sweeps: it lists the entries and removes the
  least recently used (each hit sets its entry's modification time) until the folder is
  down to nine tenths of the bound, and writes down the real total. The count is a hint made
  exact at each sweep, so a crash between a rename and its count costs nothing lasting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_KEY = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.dcm")
SWEEP_TO = 0.9  # a sweep leaves the folder at this fraction of the bound


class ReadCache:
    """Blobs read from (or written to) a remote store, kept on local disk up to ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int, incoming: Path) -> None:
        """``incoming``: where downloads are written before they are renamed in (the store's
        staging folder, on the same volume, whose cleaning removes what a crash left)."""
        self.folder = folder
        self.max_bytes = max_bytes
        self._incoming = incoming
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_path = folder / "lock"
        self._usage_path = folder / "usage"

    def _entry(self, key: str) -> Path:
        if not _KEY.fullmatch(key):  # keys come from blob_key: never a path of the caller's choosing
            raise ValueError(f"not a blob key: {key!r}")
        return self.folder / key

    def fits(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes is worth keeping: a quarter of the bound at most, so
        that one huge object does not empty the cache of everything else."""
        return 0 < size <= self.max_bytes // 4

    def open(self, key: str) -> BinaryIO | None:
        """The cached copy of ``key``, opened, or None; a hit makes it the most recently used."""
        path = self._entry(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the open file still reads
            os.utime(fh.fileno())
        return fh

    def size(self, key: str) -> int | None:
        """The cached copy's size, or None when ``key`` is not cached."""
        try:
            return os.stat(self._entry(key)).st_size
        except FileNotFoundError:
            return None

    def fill(self, key: str, write: Callable[[BinaryIO], None]) -> BinaryIO:
        """Cache ``key`` with the bytes ``write`` puts into the file it is given; returns the
        new entry, opened for reading at its start. Nothing is cached when ``write`` raises."""
        fd, name = tempfile.mkstemp(dir=self._incoming, prefix=f"in-{os.getpid()}-")
        fh = os.fdopen(fd, "w+b")
        try:
            write(fh)
            fh.flush()
            self._place(key, name)
        except BaseException:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        fh.seek(0)
        return fh

    def adopt(self, key: str, path: str | Path) -> None:
        """Move the local file ``path`` (a blob just uploaded, on the same volume) in as ``key``'s entry."""
        self._place(key, path)

    def _place(self, key: str, path: str | Path) -> None:
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        size = os.stat(path).st_size
        os.replace(path, entry)
        with self._locked():
            usage = self._read_usage() + size
            if usage > self.max_bytes:
                usage = self._sweep()
            self._usage_path.write_text(str(usage))

    def discard(self, key: str) -> None:
        """Forget ``key`` (its blob was deleted or replaced elsewhere)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._entry(key))

    def _sweep(self) -> int:
        """Remove the least recently used entries down to ``SWEEP_TO`` of the bound; the bytes left."""
        entries = []
        for path in self.folder.glob("??/??/*.dcm"):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _mtime, size, _path in entries)
        target = int(self.max_bytes * SWEEP_TO)
        for _mtime, size, path in sorted(entries):
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
        return total

    def _read_usage(self) -> int:
        try:
            return int(self._usage_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return self.max_bytes + 1  # unknown: the next addition sweeps and counts

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
