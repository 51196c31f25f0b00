"""instance.content_hash (SHA-256 of the dataset), 64-bit file_size

Revision ID: 0003
Revises: 0002

Existing rows get NULL: `macpacs reindex` fills the hash from the files, and ingest computes the
stored copy's hash when a re-send meets a row without one.
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instance", sa.Column("content_hash", byte_string(64), nullable=True))
    if op.get_bind().dialect.name != "sqlite":  # SQLite's INTEGER already holds 64 bits
        op.alter_column("instance", "file_size", type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    op.drop_column("instance", "content_hash")
