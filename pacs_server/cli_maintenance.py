"""Maintenance commands: ``verify``, ``backup``, ``restore`` (the work is in ``verify.py`` and ``backup.py``).

Each may run while the server runs, except ``restore``, which refuses to. Their own log lines
(a dropped row, a backup written, an index restored) also go to the archive's log file, so that
the status page's recent problems and a later reader of the log see them.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli import command_archive, config_options, keep_private, load_settings
from .config import Settings


def _log_to_archive(settings: Settings, *modules: str) -> None:
    """Append these modules' records to the server's log file (never rotated from here: the server does)."""
    from .logs import FORMAT

    settings.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.log_dir / "macpacs.log")
    handler.setFormatter(logging.Formatter(FORMAT))
    loggers = [logging.getLogger(name) for name in modules]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def detach() -> None:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()

    click.get_current_context().call_on_close(detach)


@click.command()
@config_options
@click.option(
    "--repair",
    is_flag=True,
    help="Index stored files the index lacks, drop rows whose file is gone, record missing hashes. "
    "Files whose content differs are only reported.",
)
def verify(config_path: str | None, data_dir: str | None, repair: bool) -> None:
    """Check every stored file against the index: missing, not indexed, size or content changed.

    Safe while the server runs. Prints the counts, then each problem with its SOP Instance UID and
    file; exits 1 when problems remain. The summary is saved in the data folder and shown on the
    status page and in /health.
    """
    from .verify import KINDS, REPAIRS, save_summary
    from .verify import verify as run_verify

    archive = command_archive(config_path, data_dir)
    _log_to_archive(archive.settings, "macpacs.pacs_server.verify")
    total = archive.index.counts()["instances"]
    # Every problem is printed after the counts; a disaster can have millions: they wait in a file.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as lines:

        def problem(found: Any) -> None:
            lines.write(found.line() + "\n")
            if found.kind == "missing" and found.repaired:
                click.echo(f"DATA LOSS: {found.sop_instance_uid}: no file, index row dropped", err=True)

        label = f"Verifying {total} instances" + (" (repairing)" if repair else "")
        with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
            report = run_verify(archive, repair=repair, on_problem=problem, progress=bar.update)
        summary = save_summary(archive.settings.data_dir, report)
        seconds = report.finished - report.started
        click.echo(
            f"Verify finished in {seconds:.0f} s: {report.instances} instances in the index, {report.files} files, "
            f"{report.bytes_hashed / 1e6:.0f} MB read."
        )
        for kind, words in KINDS.items():
            fixed = f"  ({REPAIRS[kind]}: {report.repaired[kind]})" if report.repaired[kind] else ""
            click.echo(f"  {words:<30} {report.found[kind]:>8}{fixed}")
        if sum(report.found.values()):
            click.echo("Problems (kind, SOP Instance UID, file):")
            lines.seek(0)
            for line in lines:
                click.echo("  " + line.rstrip("\n"))
    if report.repaired["missing"]:
        click.echo(
            f"{report.repaired['missing']} images were lost (their files are gone) and their index rows dropped: "
            "their details are above and in the log; have them sent again if their senders still have them.",
            err=True,
        )
    click.echo(f"Summary saved in {summary} (shown on the status page and in /health).")
    if report.remaining:
        hint = "" if repair else "; `macpacs verify --repair` fixes what can be fixed"
        click.echo(f"{report.remaining} problems remain{hint}.", err=True)
        raise SystemExit(1)


class _PageBar:
    """A progress bar over the pages of an SQLite copy, opened once their number is known."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _settings(config_path: str | None, data_dir: str | None) -> Settings:
    keep_private()
    return load_settings(config_path, storage={"data_dir": data_dir})


def _run(action: Callable[[], Any]) -> Any:
    from .backup import BackupError

    try:
        return action()
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@config_options
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def backup(config_path: str | None, data_dir: str | None, dest: Path) -> None:
    """Copy the index into the new folder DEST, consistent, while the server runs and stores.

    DEST gets index.sqlite and manifest.json (time, version, schema revision, counts, SHA-256).
    The stored files are not copied: back up the data folder's files/ with the site's own tool.
    SQLite only; a PostgreSQL index is backed up with pg_dump.
    """
    from .backup import backup as run_backup

    settings = _settings(config_path, data_dir)
    _log_to_archive(settings, "macpacs.pacs_server.backup")
    bar = _PageBar(f"Copying the index to {dest}")
    try:
        manifest = _run(lambda: run_backup(settings, dest, bar))
    finally:
        bar.close()
    counts = manifest["counts"]
    click.echo(
        f"Backup written to {dest}: {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances (schema {', '.join(manifest['revisions'])}, "
        f"{manifest['bytes'] / 1e6:.1f} MB, checked). `macpacs restore {dest}` puts it back."
    )


@click.command()
@config_options
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
def restore(config_path: str | None, data_dir: str | None, src: Path) -> None:
    """Put the index backed up in SRC back in place (the server must be stopped).

    The backup is checked first (SHA-256, PRAGMA integrity_check, schema revision); the index in
    use is kept beside it, renamed. Afterwards run `macpacs verify --repair`: it indexes files
    stored after the backup and drops rows of files deleted since.
    """
    from .backup import restore as run_restore

    settings = _settings(config_path, data_dir)
    _log_to_archive(settings, "macpacs.pacs_server.backup")
    restored = _run(lambda: run_restore(settings, src))
    manifest, counts = restored.manifest, restored.manifest["counts"]
    click.echo(
        f"Restored the index from {src} (made {manifest['created']}: {counts['studies']} studies, "
        f"{counts['instances']} instances)."
    )
    if restored.previous is not None:
        click.echo(f"The index in use before is kept as {restored.previous} (with its -wal file, if any).")
    click.echo(
        "Next: start the server, then run `macpacs verify --repair`: images stored after the backup are on "
        "disk but not in this index until it indexes them, and rows of images deleted since are dropped."
    )
