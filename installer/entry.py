"""The ``macpacs`` console script: a dispatcher that imports nothing until a command is chosen.

Each part of the product owns its commands. The group maps a command name to the module that
defines it and imports that module only when the command runs, so that ``macpacs supervise``
never imports ``pacs_server`` and keeps working when the server's code is broken
(see ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> "module:attribute" of the click command that implements it
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("macpacs.pacs_server.cli", "serve", "Run the archive in the foreground (DICOM, web, XML-RPC)."),
    "import": ("macpacs.pacs_server.cli", "import_", "Import DICOM files from folders into the archive."),
    "reindex": ("macpacs.pacs_server.cli", "reindex", "Rebuild the index from the stored files alone."),
    "nodes": ("macpacs.pacs_server.cli_nodes", "nodes", "Manage the registry of DICOM nodes."),
    "query": ("macpacs.pacs_server.cli_scu", "query", "C-FIND on a remote DICOM node."),
    "retrieve": ("macpacs.pacs_server.cli_scu", "retrieve", "Retrieve studies from a remote node (C-MOVE or C-GET)."),
    "send": ("macpacs.pacs_server.cli_scu", "send", "Send a study, series or instance to a node (C-STORE)."),
    "users": ("macpacs.pacs_server.cli_users", "users", "Manage web admin users."),
    "plugins": ("macpacs.pacs_server.cli_plugins", "plugins", "List installed plugins and which are enabled."),
    "verify": ("macpacs.pacs_server.cli_maintenance", "verify", "Check the stored files against the index."),
    "backup": ("macpacs.pacs_server.cli_maintenance", "backup", "Copy the index online, while the server runs."),
    "restore": ("macpacs.pacs_server.cli_maintenance", "restore", "Put a backup of the index back in place."),
    "jobs": ("macpacs.pacs_server.cli_jobs", "jobs", "List, retry or cancel queued sends and webhooks."),
    "audit": ("macpacs.pacs_server.cli_audit", "audit_command", "Show and filter the audit trail."),
    "migrate": ("macpacs.pacs_server.cli_migrate", "migrate", "Copy the archive onto PostgreSQL and S3 (resumable)."),
    "install": ("macpacs.installer.cli", "install", "Turn this host into an unattended macpacs server."),
    "uninstall": ("macpacs.installer.cli", "uninstall", "Undo `macpacs install`."),
    "doctor": ("macpacs.installer.cli", "doctor", "Check every part of an installation."),
    "supervise": ("macpacs.supervisor.cli", "supervise", "Watchdog: restart the server when it hangs."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name][0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attribute, _help = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command = getattr(module, attribute, None)
        return command if isinstance(command, click.Command) else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table so that `macpacs --help` imports no part.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="macpacs")
def main() -> None:
    """macpacs: an unattended DICOM archive (PACS) for a Mac, or any Unix host."""
