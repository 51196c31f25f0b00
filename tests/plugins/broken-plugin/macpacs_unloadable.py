"""A plugin that fails on import: reported by `macpacs plugins`, never fatal to the server."""

raise ImportError("unloadable plugin: a dependency is missing")
