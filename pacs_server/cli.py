"""Commands of the archive: ``serve``, ``import``, ``reindex`` (dispatched by ``installer.entry``).

Every command that writes the archive (``serve``, and all that open it through
``command_archive``) first makes what it creates private to its account (``keep_private``) and
closes up an archive left more open by an older version or another umask (``fix_modes``): the
index holds every patient's data and the users' password hashes, and on macOS an account's
group (``staff``) is every local user.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import ConfigError, Settings, load

if TYPE_CHECKING:
    from .archive import Archive

_archive: Archive | None = None  # the archive of an import worker process
log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077  # what this process creates: its account only (logs.py makes logs 0640)
DATA_DIR_MODE = 0o700
INDEX_FILE_MODE = 0o600
# The SQLite index and the files SQLite and the writer lock keep beside it.
INDEX_SUFFIXES = ("", "-wal", "-shm", "-journal", ".writer-lock")


def keep_private() -> None:
    """Files and folders this process creates from now on are readable by its account alone.

    A umask, not a mode per file, so that nothing escapes it: SQLite's files, the blob store's
    folders, the PID file. Child processes (DICOM workers, import jobs) inherit it.
    """
    os.umask(PRIVATE_UMASK)


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` index URL; None for another database or an in-memory one."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def fix_modes(settings: Settings) -> None:
    """Take group and other rights off the data folder and the index files where they have any.

    Only rights are removed, never added; each change is one log line. The stored files were
    always 0600 (the blob store stages them with ``mkstemp``), and the folders under the data
    folder are out of reach once it is 0700, so they are not walked.
    """
    targets = [(settings.data_dir, DATA_DIR_MODE)]
    database = _sqlite_path(settings.index_url)
    if database is not None:
        targets += [(database.with_name(database.name + suffix), INDEX_FILE_MODE) for suffix in INDEX_SUFFIXES]
    for path, allowed in targets:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if not mode & ~allowed:
            continue
        try:
            path.chmod(mode & allowed)
        except OSError as exc:
            log.error(
                "%s is mode %04o, readable by other accounts, and cannot be changed (%s): run chmod %o %s",
                path,
                mode,
                exc.strerror,
                mode & allowed,
                path,
            )
            continue
        log.warning("%s was mode %04o, readable by other accounts: now %04o", path, mode, mode & allowed)


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --data-dir, shared by every command that opens the archive."""
    func = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Data folder (files, index, logs). Default ./macpacs-data.",
    )(func)
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar="MACPACS_CONFIG",
        help="TOML settings file (env MACPACS_CONFIG).",
    )(func)
    return func


def load_settings(config_path: str | None, **sections: dict[str, Any]) -> Settings:
    try:
        return load(config_path, overrides=sections)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def command_archive(config_path: str | None, data_dir: str | None, *, repair: bool = False) -> Archive:
    """The archive a command works on (``--config``/``--data-dir``), migrated; closed when the command ends.

    ``repair``: a corrupt index is moved aside and a fresh one created (``reindex`` fills it).
    A second call in the same command returns the same archive: one Archive per process.
    """
    ctx = click.get_current_context()
    archive = ctx.meta.get(_ARCHIVE_KEY)
    if archive is None:
        archive = ctx.meta[_ARCHIVE_KEY] = ctx.with_resource(_opened_archive(config_path, data_dir, repair))
    return archive


_ARCHIVE_KEY = "macpacs.archive"  # where command_archive keeps the command's archive (click's ctx.meta)


@contextmanager
def _opened_archive(config_path: str | None, data_dir: str | None, repair: bool) -> Iterator[Archive]:
    from .archive import open_archive
    from .index import IndexUnavailable, IndexUnreadable

    keep_private()
    settings = load_settings(config_path, storage={"data_dir": data_dir})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fix_modes(settings)
    try:
        archive = open_archive(settings, repair=repair)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    except IndexUnreadable as exc:
        raise click.ClickException(
            f"the index of {settings.data_dir} is unreadable ({exc}); `macpacs reindex` moves it aside and "
            "rebuilds it from the stored files"
        ) from None
    except IndexUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield archive
    finally:
        archive.close()


@click.command()
@config_options
@click.option("--ae-title", help="AE title of this archive. Default MACPACS.")
@click.option("--dicom-port", type=int, help="DICOM listener port. Default 11112.")
@click.option("--web-port", type=int, help="Web server port (WADO, DICOMweb, pages). Default 3333.")
@click.option("--xmlrpc-port", type=int, help="OsiriX XML-RPC port. Default 8080.")
def serve(
    config_path: str | None,
    data_dir: str | None,
    ae_title: str | None,
    dicom_port: int | None,
    web_port: int | None,
    xmlrpc_port: int | None,
) -> None:
    """Run the archive in the foreground until SIGTERM or Ctrl-C."""
    from . import logs
    from .index import IndexUnavailable
    from .server import AlreadyRunning, run

    keep_private()
    settings = load_settings(
        config_path,
        storage={"data_dir": data_dir},
        dicom={"ae_title": ae_title, "port": dicom_port},
        web={"port": web_port},
        xmlrpc={"port": xmlrpc_port},
    )
    try:
        logs.setup(settings.log_dir, settings.server.log_level)  # first: fix_modes' lines go to the log
        fix_modes(settings)
        run(settings)
    except AlreadyRunning as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigError as exc:  # found at start, e.g. an unreadable TLS certificate
        raise click.ClickException(f"configuration error: {exc}") from None
    except IndexUnavailable as exc:  # the database server is down or refuses us: launchd/systemd retry
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"a port is already in use ({exc}). Ports: DICOM {settings.dicom.port}, web {settings.web.port}, "
                f"XML-RPC {settings.xmlrpc.port}. Stop the other program (lsof -i :PORT shows it) or choose "
                "other ports with --dicom-port/--web-port/--xmlrpc-port."
            ) from None
        if exc.errno in (errno.EACCES, errno.EROFS):
            raise click.ClickException(f"cannot write to {exc.filename or settings.data_dir}: {exc.strerror}") from None
        raise
    _exit_after_clean_stop()


def _exit_after_clean_stop() -> None:
    """End the process at once after a clean stop, skipping the interpreter's teardown of every
    imported module (about 0.5 s here, which a restart by launchd or the supervisor waits for).

    Everything is closed by then: listeners, worker processes (joined), the index, the audit
    trail; the log is flushed here. A thread that is not a daemon would still be working: then
    the ordinary exit, which waits for it.
    """
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _walk(paths: tuple[str, ...]) -> Iterator[Path]:
    for root in paths:
        top = Path(root)
        if top.is_file():
            yield top
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                yield Path(dirpath) / name


def _init_worker(settings: Settings) -> None:
    from .archive import open_archive

    global _archive
    _archive = open_archive(settings, migrate=False)  # the parent migrated already


def _import_one(path: Path) -> tuple[str, str, str]:
    assert _archive is not None
    result = _archive.ingestor.ingest_file(path)
    return str(path), result.outcome.value, result.message


@click.command("import")
@config_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Parallel worker processes.",
)
def import_(config_path: str | None, data_dir: str | None, paths: tuple[str, ...], jobs: int) -> None:
    """Import DICOM files from folders (recursively) through the same path as C-STORE.

    Files that are not DICOM are skipped and listed at the end. Re-importing the same files
    stores nothing twice.
    """
    global _archive
    archive = command_archive(config_path, data_dir)
    _archive = archive
    files = list(_walk(paths))
    outcomes: Counter[str] = Counter()
    problems: list[tuple[str, str, str]] = []
    with click.progressbar(length=len(files), label=f"Importing {len(files)} files", file=sys.stderr) as bar:
        if jobs == 1:
            results: Iterator[tuple[str, str, str]] = map(_import_one, files)
            executor = None
        else:
            executor = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(archive.settings,))
            results = executor.map(_import_one, files, chunksize=16)
        try:
            for path, outcome, message in results:
                outcomes[outcome] += 1
                if outcome in ("invalid", "unreadable", "refused", "out-of-resources", "kept-existing"):
                    problems.append((path, outcome, message))
                bar.update(1)
        finally:
            if executor is not None:
                executor.shutdown()
    if outcomes["stored"]:
        archive.index.analyze()  # the query planner's statistics, for what the import added
    for path, outcome, message in problems:
        label = "skipped (not DICOM)" if outcome == "unreadable" else outcome
        click.echo(f"{label}: {path}: {message}", err=True)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "no files"
    click.echo(f"Import finished: {summary}.")
    if outcomes["out-of-resources"]:
        raise SystemExit(1)


@click.command()
@config_options
def reindex(config_path: str | None, data_dir: str | None) -> None:
    """Rebuild the index from the stored files alone (after a restore, or to repair the index)."""
    from .reindex import reindex as run_reindex

    archive = command_archive(config_path, data_dir, repair=True)
    if archive.replaced_index is not None:
        click.echo(f"The index was unreadable: moved it aside as {archive.replaced_index}.", err=True)
    total = sum(1 for _ in archive.blobs.iter_keys())
    with click.progressbar(length=total, label=f"Reindexing {total} files", file=sys.stderr) as bar:
        report = run_reindex(archive.blobs, archive.index, progress=bar.update)
    for path, reason in report.failed:
        click.echo(f"skipped: {path}: {reason}", err=True)
    click.echo(f"Reindex finished: {report.indexed} instances indexed, {len(report.failed)} files skipped.")
