"""Plugins (pluggy, as Datasette uses it): found through entry points, enabled by name, isolated.

A plugin is installed like any Python package and declares itself in the ``macpacs.plugins``
entry point group; it runs only once ``[plugins] enable`` (or ``MACPACS_PLUGINS_ENABLE``) names
it. Every hook call is isolated: an implementation that raises is logged with the plugin's name
and skipped, so a broken plugin can neither lose an acknowledged instance nor stop the server.
The hooks themselves are documented in ``hookspecs.py``; docs/plugins.md has a complete example.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from ..config import ConfigError
from . import hookspecs
from .types import Instance, JobSpec, Series, Study

if TYPE_CHECKING:
    from ..archive import Archive

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "macpacs.plugins"
hookimpl = pluggy.HookimplMarker("macpacs")

__all__ = [
    "ENTRY_POINT_GROUP",
    "Instance",
    "JobSpec",
    "PluginInfo",
    "Plugins",
    "Series",
    "Study",
    "available",
    "hookimpl",
]


@dataclass
class PluginInfo:
    """One plugin as ``macpacs plugins`` and the status page show it."""

    name: str
    package: str  # distribution and version, e.g. "macpacs-example 1.0"
    hooks: list[str] = field(default_factory=list)
    error: str = ""  # why it could not be loaded (it then runs no hook)


def available() -> dict[str, EntryPoint]:
    """Every installed plugin, by entry point name (enabled or not)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _package(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else ep.value


class Plugins:
    """The enabled plugins of this process, and the one way the core calls their hooks."""

    def __init__(self, enabled: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._pm = pluggy.PluginManager("macpacs")
        self._pm.add_hookspecs(hookspecs)
        self._options = {name: dict(values) for name, values in (options or {}).items()}
        self._archive: Archive | None = None
        installed = available()
        unknown = [name for name in enabled if name not in installed]
        if unknown:
            raise ConfigError(
                f"plugins.enable names {', '.join(map(repr, unknown))}, which no installed package provides "
                f"(installed plugins: {', '.join(sorted(installed)) or 'none'}); install it, or remove it "
                "from [plugins] enable / MACPACS_PLUGINS_ENABLE"
            )
        self.loaded: list[PluginInfo] = []
        for name in dict.fromkeys(enabled):
            ep = installed[name]
            info = PluginInfo(name, _package(ep))
            try:
                self._pm.register(ep.load(), name=name)
            except Exception as exc:  # a plugin that cannot even load is reported, never fatal
                log.exception("plugin %s (%s) could not be loaded and is disabled", name, info.package)
                info.error = f"{type(exc).__name__}: {exc}"
            else:
                info.hooks = sorted(self._hooks_of(name))
                log.info("plugin %s loaded (%s): %s", name, info.package, ", ".join(info.hooks) or "no hooks")
            self.loaded.append(info)

    def _hooks_of(self, name: str) -> Iterator[str]:
        plugin = self._pm.get_plugin(name)
        for caller in self._pm.get_hookcallers(plugin) or []:
            yield caller.name

    def options(self, name: str) -> dict[str, Any]:
        """The plugin's own settings: its ``[plugins.<name>]`` table of the config file."""
        return dict(self._options.get(name, {}))

    # -- the hooks, as the core calls them -----------------------------------------------------
    def startup(self, archive: Archive) -> None:
        self._archive = archive
        self._call("startup", archive=archive)

    def shutdown(self) -> None:
        if self._archive is not None:
            self._call("shutdown", archive=self._archive)

    def refusal(self, instance: Instance) -> str | None:
        """The first plugin's reason to refuse ``instance``, or None when every plugin accepts it."""
        reasons = self._call("accept_instance", archive=self._archive, instance=instance)
        return str(reasons[0]) if reasons else None

    def instance_jobs(self, instance: Instance, outcome: str) -> list[JobSpec]:
        """The jobs every plugin wants queued with ``instance`` (``instance_jobs``), flattened; a
        plugin whose answer is not a list of job specs is logged and its answer ignored."""
        specs: list[JobSpec] = []
        for name, result in self._named_results(
            "instance_jobs", archive=self._archive, instance=instance, outcome=outcome
        ):
            try:
                specs.extend(JobSpec(*spec) for spec in result)
            except TypeError as exc:
                log.error(
                    "plugin %s's instance_jobs returned %r, not a list of JobSpec (ignored): %s", name, result, exc
                )
        return specs

    def stored(self, instance: Instance, outcome: str) -> None:
        self._call("instance_stored", archive=self._archive, instance=instance, outcome=outcome)

    def stable(self, study: Study) -> None:
        self._call("study_stable", archive=self._archive, study=study)

    def routes(self) -> list[Any]:
        """The routers every plugin's ``register_routes`` returned, flattened."""
        routers: list[Any] = []
        for result in self._call("register_routes", archive=self._archive):
            routers.extend(result if isinstance(result, list | tuple) else [result])
        return routers

    def dicom_services(self) -> list[Any]:
        """The ``DicomService`` objects every plugin's ``dicom_services`` returned, flattened."""
        services: list[Any] = []
        for result in self._call("dicom_services", archive=self._archive):
            services.extend(result if isinstance(result, list | tuple) else [result])
        return services

    def _call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Each implementation in turn (pluggy's order), isolated; the results that are not None."""
        return [result for _name, result in self._named_results(hook, **kwargs)]

    def _named_results(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """(plugin name, result) of each implementation that returned something.

        pluggy's own hook call stops at the first exception; here one plugin's failure is its
        own, logged once with its name, and the others still run.
        """
        results = []
        for impl in reversed(getattr(self._pm.hook, hook).get_hookimpls()):
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception:
                log.exception("plugin %s failed in its %s hook (ignored)", impl.plugin_name, hook)
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results
