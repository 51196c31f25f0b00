"""``macpacs nodes list|add|edit|remove|echo``: the registry of DICOM nodes from the command line.

Every change goes through ``pacs_server.nodes`` (the same code as the web config page), so a bad
AE title, port or duplicate is refused with the same message everywhere. The running server
applies changes to the next association; no restart is needed.
"""

from __future__ import annotations

from typing import Any

import click

from .audit import AuditTrail, local_actor
from .cli import command_archive, config_options
from .config import Settings
from .nodes import OPERATIONS, STATUSES, Node, NodeError, NodeRegistry


def _registry(config_path: str | None, data_dir: str | None) -> tuple[Settings, NodeRegistry, AuditTrail]:
    archive = command_archive(config_path, data_dir)
    return archive.settings, archive.nodes, archive.audit


def _audit(trail: AuditTrail, detail: str) -> None:
    """A node change in the audit trail, by the account that ran the command."""
    trail.record("node-change", local_actor("cli"), detail=detail)


def _rights(value: str) -> dict[str, bool]:
    """``store,query`` → allow_store/allow_query true, allow_retrieve false (``none``: no right)."""
    wanted = {v.strip().lower() for v in value.split(",") if v.strip()} - {"none"}
    unknown = wanted - set(OPERATIONS)
    if unknown:
        raise click.BadParameter(
            f"unknown operation(s) {', '.join(sorted(unknown))}: use a comma-separated list of "
            f"{', '.join(OPERATIONS)}, or none"
        )
    return {f"allow_{op}": op in wanted for op in OPERATIONS}


_allow_help = "Operations it may perform on us, comma-separated: store,query,retrieve (or none)."


@click.group()
def nodes() -> None:
    """Manage the registry of DICOM nodes (C-MOVE destinations, send targets, access control)."""


@nodes.command("list")
@config_options
def list_(config_path: str | None, data_dir: str | None) -> None:
    """List the registered nodes."""
    _settings, registry, _trail = _registry(config_path, data_dir)
    found = registry.list()
    if not found:
        click.echo("no nodes registered (add one with `macpacs nodes add NAME --ae-title AE --host H --port P`)")
        return
    rows = [("NAME", "AE TITLE", "HOST", "PORT", "TLS", "ALLOWED", "STATUS", "DESCRIPTION")]
    for n in found:
        rows.append(
            (n.name, n.ae_title, n.host, str(n.port), "yes" if n.tls else "no", n.rights, n.status, n.description)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


@nodes.command()
@config_options
@click.argument("name")
@click.option("--ae-title", required=True, help="The node's AE title.")
@click.option("--host", required=True, help="Host name or IP address where the node listens.")
@click.option("--port", required=True, type=int, help="The node's DICOM port.")
@click.option("--tls/--no-tls", default=False, help="The node speaks DICOM over TLS.")
@click.option("--allow", default="store,query,retrieve", show_default=True, help=_allow_help)
@click.option("--status", type=click.Choice(STATUSES), default="active", show_default=True)
@click.option("--description", default="", help="Free text (where it is, who to call).")
def add(
    config_path: str | None,
    data_dir: str | None,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    tls: bool,
    allow: str,
    status: str,
    description: str,
) -> None:
    """Register a node called NAME."""
    _settings, registry, trail = _registry(config_path, data_dir)
    try:
        node = registry.add(
            Node(name, ae_title, host, port, tls=tls, status=status, description=description, **_rights(allow))
        )
    except NodeError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(trail, f"added {node.name} ({node.ae_title}@{node.host}:{node.port}, may {node.rights})")
    click.echo(f"added node {node.name}: {node.ae_title}@{node.host}:{node.port}, may {node.rights}")


@nodes.command()
@config_options
@click.argument("name")
@click.option("--name", "new_name", help="Rename the node.")
@click.option("--ae-title")
@click.option("--host")
@click.option("--port", type=int)
@click.option("--tls/--no-tls", default=None)
@click.option("--allow", help=_allow_help)
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--description")
def edit(config_path: str | None, data_dir: str | None, name: str, new_name: str | None, **fields: Any) -> None:
    """Change fields of the node NAME (only the options given)."""
    _settings, registry, trail = _registry(config_path, data_dir)
    changes = {k: v for k, v in fields.items() if v is not None and k != "allow"}
    if new_name is not None:
        changes["name"] = new_name
    if fields.get("allow") is not None:
        changes.update(_rights(fields["allow"]))
    if not changes:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    try:
        node = registry.edit(name, **changes)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(trail, f"changed {name}: {', '.join(sorted(changes))}")
    click.echo(f"node {node.name}: {node.ae_title}@{node.host}:{node.port}, may {node.rights}, {node.status}")


@nodes.command()
@config_options
@click.argument("name")
def remove(config_path: str | None, data_dir: str | None, name: str) -> None:
    """Remove the node NAME from the registry."""
    _settings, registry, trail = _registry(config_path, data_dir)
    try:
        registry.remove(name)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(trail, f"removed {name}")
    click.echo(f"removed node {name}")


@nodes.command()
@config_options
@click.argument("name")
def echo(config_path: str | None, data_dir: str | None, name: str) -> None:
    """C-ECHO the node NAME and print the round-trip time."""
    from .dimse import scu

    settings, registry, _trail = _registry(config_path, data_dir)
    try:
        node = registry.get(name)
        ms = scu.echo(node, settings)
    except (NodeError, scu.ScuError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"C-ECHO {node.name} ({node.ae_title}@{node.host}:{node.port}): success in {ms:.1f} ms")
