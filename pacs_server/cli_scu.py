"""``macpacs send``, ``macpacs query``, ``macpacs retrieve``: the archive as a DICOM client.

Each command names a registered node (``macpacs nodes add``), shows progress for long work and
ends with a one-line summary; a failure exits non-zero with a message that says what to fix.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from . import dicom_status
from .cli import command_archive, config_options
from .nodes import Node, NodeError, NodeRegistry


def _node(registry: NodeRegistry, name: str) -> Node:
    try:
        return registry.get(name)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from None


def _target_keys(
    patient_id: str | None, study: str | None, series: str | None, instance: str | None
) -> tuple[str, dict]:
    """The retrieve level and unique keys given on the command line (exactly one is needed)."""
    given = [
        (lvl, key, v)
        for lvl, key, v in (
            ("PATIENT", "PatientID", patient_id),
            ("STUDY", "StudyInstanceUID", study),
            ("SERIES", "SeriesInstanceUID", series),
            ("IMAGE", "SOPInstanceUID", instance),
        )
        if v
    ]
    if not given:
        raise click.UsageError("say what to transfer: --study UID, --series UID, --instance UID or --patient-id ID")
    # The deepest level given decides; higher keys stay as hierarchical context.
    level = given[-1][0]
    return level, {key: value for _lvl, key, value in given}


def _target_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option("--patient-id", help="Everything of this patient (Patient ID)."),
            click.option("--study", help="Study Instance UID."),
            click.option("--series", help="Series Instance UID."),
            click.option("--instance", help="SOP Instance UID."),
        ]
    ):
        func = option(func)
    return func


class _Bar:
    """A click progress bar driven by sub-operation counts (total may be learnt late)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.done = 0

    def __call__(self, progress: Any) -> None:
        if self.bar is None and progress.total:
            self.bar = click.progressbar(length=progress.total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        if self.bar is not None:
            now = progress.completed + progress.failed + progress.warning
            self.bar.update(now - self.done)
            self.done = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command()
@config_options
@click.argument("node")
@_target_options
def send(
    config_path: str | None,
    data_dir: str | None,
    node: str,
    patient_id: str | None,
    study: str | None,
    series: str | None,
    instance: str | None,
) -> None:
    """Send a patient, study, series or instance of this archive to NODE (C-STORE)."""
    from .dimse import scu

    _level, keys = _target_keys(patient_id, study, series, instance)
    archive = command_archive(config_path, data_dir)
    target = _node(archive.nodes, node)
    bar = _Bar(f"sending to {target.name}")
    try:
        progress = scu.send(target, archive, keys, on_progress=bar)
    finally:
        bar.close()
    if not progress.total:
        raise click.ClickException("nothing in this archive matches; check the UID with `macpacs query` or the web UI")
    click.echo(f"sent to {target.name}: {progress.summary()}")
    if progress.failed:
        raise click.ClickException(f"{progress.failed} of {progress.total} instances were not sent (see the log)")


QUERY_OPTIONS = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "accession": "AccessionNumber",
    "date": "StudyDate",
    "modality": "ModalitiesInStudy",
    "description": "StudyDescription",
}


@click.command()
@config_options
@click.argument("node")
@click.option("--patient-name", help="Patient name; wildcards * and ? (DOE* matches DOE^JOHN).")
@click.option("--patient-id", help="Patient ID.")
@click.option("--accession", help="Accession number.")
@click.option("--date", help="Study date YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end open).")
@click.option("--modality", help="A modality in the study (CT, MR...).")
@click.option("--description", help="Study description; wildcards allowed.")
@click.option("-k", "--key", "extra", multiple=True, help="Any other key as Keyword=value (repeatable).")
def query(config_path: str | None, data_dir: str | None, node: str, extra: tuple[str, ...], **options: Any) -> None:
    """C-FIND studies on NODE with the keys of OsiriX's Query & Retrieve window."""
    from .dimse import scu

    keys = {QUERY_OPTIONS[name]: value for name, value in options.items() if value}
    for item in extra:
        keyword, sep, value = item.partition("=")
        if not sep or not keyword.strip():
            raise click.BadParameter(f"{item!r}: use Keyword=value", param_hint="-k")
        keys[keyword.strip()] = value
    archive = command_archive(config_path, data_dir)
    target = _node(archive.nodes, node)
    try:
        found = scu.query(target, archive.settings, "STUDY", keys)
    except (scu.ScuError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    rows = [("PATIENT NAME", "PATIENT ID", "DATE", "MODALITY", "ACCESSION", "DESCRIPTION", "IMAGES", "STUDY UID")]
    for ds in found:
        rows.append(
            tuple(
                str(ds.get(k, "") or "")
                for k in (
                    "PatientName",
                    "PatientID",
                    "StudyDate",
                    "ModalitiesInStudy",
                    "AccessionNumber",
                    "StudyDescription",
                    "NumberOfStudyRelatedInstances",
                    "StudyInstanceUID",
                )
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{len(found)} studies found on {target.name}")


@click.command()
@config_options
@click.argument("node")
@_target_options
@click.option(
    "--method",
    type=click.Choice(["move", "get"]),
    default="move",
    show_default=True,
    help="move: NODE sends to our listener (we must be registered on NODE); get: on this association.",
)
@click.option("--destination", help="C-MOVE destination AE title (default: ours, dicom.ae_title).")
def retrieve(
    config_path: str | None,
    data_dir: str | None,
    node: str,
    patient_id: str | None,
    study: str | None,
    series: str | None,
    instance: str | None,
    method: str,
    destination: str | None,
) -> None:
    """Retrieve a patient, study, series or instance from NODE into this archive."""
    from .dimse import scu

    level, keys = _target_keys(patient_id, study, series, instance)
    archive = command_archive(config_path, data_dir)
    settings = archive.settings
    target = _node(archive.nodes, node)
    bar = _Bar(f"retrieving from {target.name}")
    try:
        result = scu.retrieve(target, archive, level, keys, method=method, destination=destination, on_progress=bar)
    except scu.ScuError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
    p = result.progress
    click.echo(f"C-{method.upper()} from {target.name}: status 0x{result.status:04X}, {p.summary()}")
    if result.status == 0 and not p.total:
        click.echo("nothing matched on the node")
    if not result.ok:
        raise click.ClickException(_explain(result, target, method, destination or settings.dicom.ae_title))


# A peer's C-MOVE/C-GET refusal we never send ourselves: out of resources, unable to calculate the
# number of matches (PS3.4 C.4.2.1.5).
OUT_OF_RESOURCES_COUNTING = 0xA701


def _explain(result: Any, target: Node, method: str, destination: str) -> str:
    """A failed retrieve in words, with what to check."""
    status, p = result.status, result.progress
    move_hint = (
        f"; check that {target.name} knows the destination {destination} as a DICOM node" if method == "move" else ""
    )
    if status == dicom_status.UNKNOWN_MOVE_DESTINATION:
        why = f"{target.name} does not know the destination {destination}; register it there as a DICOM node"
    elif status == dicom_status.WARNING_SUBOPERATIONS:
        why = f"{p.failed} of {p.total} instances failed"
    elif status == dicom_status.CANCEL:
        why = "cancelled"
    elif status in (OUT_OF_RESOURCES_COUNTING, dicom_status.SUBOPERATIONS_IMPOSSIBLE):
        why = f"{target.name} could not perform the sub-operations ({p.failed} failed){move_hint}"
    elif status == dicom_status.DOES_NOT_MATCH_SOP_CLASS or 0xC000 <= status <= 0xCFFF:  # Cxxx: failed
        why = f"{target.name} could not process the request (status 0x{status:04X}){move_hint}"
    else:
        why = f"{target.name} answered status 0x{status:04X}"
    comment = f" ({result.comment})" if result.comment else ""
    return f"retrieve incomplete: {why}{comment}"
