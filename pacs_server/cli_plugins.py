"""``macpacs plugins``: the installed plugins, which are enabled, and what each one hooks into."""

from __future__ import annotations

import click

from .cli import config_options, load_settings


@click.command()
@config_options
def plugins(config_path: str | None, data_dir: str | None) -> None:
    """List installed plugins (entry point group macpacs.plugins): enabled, loaded, their hooks."""
    from .config import ConfigError
    from .plugins import Plugins, available

    settings = load_settings(config_path, storage={"data_dir": data_dir})
    installed = available()
    try:
        loaded = {info.name: info for info in Plugins(settings.plugins.enable, settings.plugins.options).loaded}
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if not installed:
        click.echo("No plugin is installed (none declares the macpacs.plugins entry point).")
        return
    rows = [("NAME", "PACKAGE", "STATE", "HOOKS")]
    for name in sorted(installed):
        info = loaded.get(name)
        if info is None:
            rows.append((name, installed[name].value, "not enabled", ""))
        elif info.error:
            rows.append((name, info.package, "FAILED to load", info.error))
        else:
            rows.append((name, info.package, "enabled", ", ".join(info.hooks) or "none"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    if any(info.error for info in loaded.values()):
        raise SystemExit(1)
