"""The database the migrations build is the schema ``index/schema.py`` declares (issues 13, 17).

A change to a table that forgets its migration (or a migration that differs from the table)
would otherwise show only on an upgraded archive, as a missing index or a NULL where the code
expects a value. Checked on SQLite and on PostgreSQL, from an empty database each time.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from macpacs.pacs_server import index as index_package
from macpacs.pacs_server.index import Index
from macpacs.pacs_server.index.schema import metadata
from tests.conftest import BACKENDS

# Tables of the plugins' own modules (worklist_table, hl7_table...) join the metadata when imported.
for _module in pkgutil.iter_modules(index_package.__path__):
    importlib.import_module(f"{index_package.__name__}.{_module.name}")


@pytest.fixture(params=BACKENDS)
def empty_index(request: pytest.FixtureRequest, tmp_path: Path) -> Index:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").new_database(migrated=False)
    index = Index(url)
    yield index
    index.close()


def test_migrations_build_the_declared_schema(empty_index: Index) -> None:
    empty_index.migrate()
    with empty_index.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        differences = compare_metadata(context, metadata)
    assert differences == [], "\n".join(map(str, differences))


def test_one_head() -> None:
    """Revisions written side by side are merged (0007), so later ones have one parent to follow."""
    from alembic.config import Config

    from macpacs.pacs_server.index.db import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert len(ScriptDirectory.from_config(config).get_heads()) == 1


def test_string_columns_compare_byte_by_byte_on_postgresql(request: pytest.FixtureRequest) -> None:
    """On PostgreSQL every string column has the "C" collation, whatever the database's (the test
    cluster's is en_US.UTF-8): the matcher's ranges and sorts answer as on SQLite."""
    index = Index(request.getfixturevalue("postgres").new_database())
    try:
        with index.engine.connect() as conn:
            assert conn.execute(text("SHOW lc_collate")).scalar() != "C"
            others = conn.execute(
                text(
                    "SELECT table_name || '.' || column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND data_type = 'character varying' "
                    "AND table_name <> 'alembic_version' AND coalesce(collation_name, '') <> 'C'"
                )
            ).scalars()
            assert list(others) == []
            # What a language's collation gets wrong: "~" closes the matcher's time ranges.
            assert conn.execute(text("SELECT '101500' < '1015~' COLLATE \"C\"")).scalar() is True
            assert conn.execute(text("SELECT '101500' < '1015~'")).scalar() is False
    finally:
        index.close()
