"""A plugin that raises in every hook, to show that a broken plugin costs nothing stored."""

from macpacs.pacs_server.plugins import hookimpl


@hookimpl
def startup(archive):
    raise RuntimeError("broken plugin: startup")


@hookimpl
def accept_instance(archive, instance):
    raise RuntimeError("broken plugin: accept_instance")


@hookimpl
def instance_jobs(archive, instance, outcome):
    raise RuntimeError("broken plugin: instance_jobs")


@hookimpl
def instance_stored(archive, instance, outcome):
    raise RuntimeError("broken plugin: instance_stored")


@hookimpl
def register_routes(archive):
    raise RuntimeError("broken plugin: register_routes")
