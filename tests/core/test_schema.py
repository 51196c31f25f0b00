"""The database the migrations build is the schema ``index/schema.py`` declares (issue 13).

A change to a table that forgets its migration (or a migration that differs from the table)
would otherwise show only on an upgraded archive, as a missing index or a NULL where the code
expects a value.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from macpacs.pacs_server import index as index_package
from macpacs.pacs_server.index import Index
from macpacs.pacs_server.index.schema import metadata

# Tables of the plugins' own modules (worklist_table, hl7_table...) join the metadata when imported.
for _module in pkgutil.iter_modules(index_package.__path__):
    importlib.import_module(f"{index_package.__name__}.{_module.name}")


def test_migrations_build_the_declared_schema(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        index.migrate()
        with index.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
            differences = compare_metadata(context, metadata)
    finally:
        index.close()
    assert differences == [], "\n".join(map(str, differences))
