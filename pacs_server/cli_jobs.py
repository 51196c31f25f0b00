"""``macpacs jobs list|show|retry|cancel``: the persistent job queue from the command line.

The same queue as the status page's Jobs section (``pacs_server.jobs``): sends, retrieves,
routing and webhooks. Changes take effect in the running server within a second; nothing here
runs a job itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime

import click

from .cli import command_archive, config_options
from .jobs import STATES, Job, JobError, Jobs


def _jobs(config_path: str | None, data_dir: str | None) -> Jobs:
    return command_archive(config_path, data_dir).jobs


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _status(job: Job) -> str:
    if job.retrying:
        wait = job.next_run_at - time.time()
        return f"retry {'now' if wait <= 0 else f'in {wait:.0f} s'}" + (" ALERT" if job.alerted else "")
    return job.state


@click.group()
def jobs() -> None:
    """List, retry or cancel queued sends, retrieves, routing and webhooks."""


@jobs.command("list")
@config_options
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only this state (repeatable).")
@click.option("--kind", "kinds", multiple=True, help="Only jobs of this kind: send, retrieve, webhook (repeatable).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Newest jobs shown.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
def list_(
    config_path: str | None,
    data_dir: str | None,
    states: tuple[str, ...],
    kinds: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> None:
    """The newest jobs, with their state, attempts and last message."""
    found = _jobs(config_path, data_dir).list(states, kinds, limit)
    if as_json:
        click.echo(json.dumps([job.as_json() for job in found], indent=1))
        return
    if not found:
        click.echo("no jobs" + (f" in state {', '.join(states)}" if states else ""))
        return
    rows = [("ID", "STATE", "KIND", "TRIES", "CHANGED", "DONE", "DESCRIPTION", "MESSAGE")]
    for job in found:
        progress = f"{job.done}/{job.total}" + (f" ({job.failed} failed)" if job.failed else "")
        rows.append(
            (
                str(job.id),
                _status(job),
                job.kind,
                f"{job.attempts}/{job.max_attempts}",
                _when(job.updated_at),
                progress,
                job.description,
                job.message,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


@jobs.command()
@config_options
@click.argument("job_id", type=int)
def show(config_path: str | None, data_dir: str | None, job_id: int) -> None:
    """Everything about one job, as JSON."""
    job = _jobs(config_path, data_dir).get(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id} (finished jobs are forgotten after jobs.keep_days)")
    click.echo(json.dumps({**job.as_json(), "payload": job.payload}, indent=2))


@jobs.command()
@config_options
@click.argument("job_ids", type=int, nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every job that stopped as failed.")
def retry(config_path: str | None, data_dir: str | None, job_ids: tuple[int, ...], all_failed: bool) -> None:
    """Run jobs again now (failed, cancelled, or waiting for their next attempt), attempts from zero."""
    queue = _jobs(config_path, data_dir)
    ids = list(job_ids) + ([job.id for job in queue.list(["failed"], limit=10_000)] if all_failed else [])
    if not ids:
        raise click.UsageError("name the jobs to retry (IDs from `macpacs jobs list`), or give --failed")
    _each(ids, queue.retry, "queued again")


@jobs.command()
@config_options
@click.argument("job_ids", type=int, nargs=-1, required=True)
def cancel(config_path: str | None, data_dir: str | None, job_ids: tuple[int, ...]) -> None:
    """Cancel jobs (a running send stops within a few seconds)."""
    queue = _jobs(config_path, data_dir)
    _each(list(job_ids), queue.cancel, "cancelled")


def _each(ids: list[int], action: Callable[[int], Job], done: str) -> None:
    failures = 0
    for job_id in ids:
        try:
            job = action(job_id)
        except JobError as exc:
            click.echo(f"job {job_id}: {exc}", err=True)
            failures += 1
            continue
        click.echo(f"job {job.id} {done}: {job.description}")
    if failures:
        raise click.ClickException(f"{failures} of {len(ids)} jobs could not be changed")
