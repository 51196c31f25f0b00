"""``macpacs migrate --index postgresql://... --storage s3://...``: the archive of the current
settings copied onto a new index and store, checked (``pacs_server/migrate.py``, docs/scale-out.md).

The archive itself is only read. The command prints what to change in the settings once a run is
verified, and changes nothing in them: switching is the administrator's step, after the copy
was checked and the server stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import config_options, load_settings
from .index import IndexUnavailable
from .index.table_sync import CHUNK
from .migrate import Migration, MigrationRefused, Report
from .storage import StorageError


@click.command()
@config_options
@click.option(
    "--index",
    "index_url",
    required=True,
    envvar="MACPACS_MIGRATE_INDEX",
    help="The new index: postgresql://user:password@host:5432/macpacs (env MACPACS_MIGRATE_INDEX keeps "
    "the password off the command line).",
)
@click.option(
    "--storage",
    "storage_url",
    required=True,
    help="The new store: s3://bucket/prefix (endpoint and credentials from [s3] or AWS_* variables).",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the migration keeps its state and stages files. Default: migration/ in the data folder.",
)
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True, help="Files copied at once.")
@click.option(
    "--chunk",
    type=click.IntRange(1, 10_000),
    default=CHUNK,
    show_default=True,
    help="Rows compared and written per transaction (an interrupted run loses at most one chunk's copies).",
)
def migrate(
    config_path: str | None,
    data_dir: str | None,
    index_url: str,
    storage_url: str,
    work_dir: Path | None,
    jobs: int,
    chunk: int,
) -> None:
    """Copy this archive's index and files onto a new index and store; run it again to resume
    or to catch up what arrived meanwhile."""
    settings = load_settings(config_path, storage={"data_dir": data_dir})

    def bar(label: str, total: int) -> click.progressbar:  # type: ignore[type-arg]
        return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)

    migration = Migration(settings, index_url, storage_url, work_dir=work_dir, jobs=jobs, chunk=chunk, progress=bar)
    try:
        report = migration.run()
    except MigrationRefused as exc:
        raise click.ClickException(f"migration refused: {exc}") from None
    except (IndexUnavailable, StorageError) as exc:
        why = exc.strerror if isinstance(exc, StorageError) and exc.strerror else str(exc)
        raise click.ClickException(
            f"migration stopped: {why}. The archive is untouched; run the same command again once this is "
            "fixed, and it goes on where it stopped."
        ) from None
    _print(report, migration)
    if not report.verified:
        sys.exit(1)


def _print(report: Report, migration: Migration) -> None:
    written = {name: c for name, c in report.tables.items() if c.any}
    for name, changes in written.items():
        click.echo(f"{name}: {changes.written} row writes, {changes.deleted} deletes")
    click.echo(
        f"files: {report.files_copied} copied ({report.bytes_copied / 1e6:.1f} MB), each checked by size, dataset "
        f"hash and a SHA-256 of its copy read back; {report.files_removed} removed; {report.seconds:.1f} s"
    )
    for failure in report.failures:
        click.echo(f"not copied: {failure}", err=True)
    if not report.verified:
        changed = {name: n for name, n in report.differences.items() if n}
        click.echo(
            "NOT VERIFIED: "
            + (f"{len(report.failures)} files failed; " if report.failures else "")
            + (
                "the archive changed during this run ("
                + ", ".join(f"{n} in {name}" for name, n in changed.items())
                + "); "
                if changed
                else ""
            )
            + "run `macpacs migrate` again with the same arguments (stop ingest for the last run). "
            "The archive itself is untouched.",
            err=True,
        )
        return
    instances = report.counts.get("instance", 0)
    click.echo(
        f"VERIFIED: the new index and store hold this archive ({instances} instances, every table compared "
        "row by row). The archive itself is untouched.\n"
        "To serve from them, stop the server, run this command once more (it copies what arrived "
        "meanwhile), then set in the settings file:\n\n"
        f'[index]\nurl = "{migration.index_url_shown}"  # with its password\n\n'
        f'[storage]\nurl = "{migration.storage_url}"\n\n'
        "with [s3] endpoint and credentials (or AWS_* variables) as for this run, and start the server."
    )
