"""Alembic environment: migrations run on the connection the index hands over (no ini file)."""

from alembic import context

from macpacs.pacs_server.index.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run macpacs migrations through pacs_server.index.Index.migrate(), not alembic")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
