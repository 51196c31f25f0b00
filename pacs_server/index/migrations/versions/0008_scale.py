"""study.stored_bytes: each study's file bytes, kept by ingest and delete, so that the archive's
total is a sum over studies (the status document asks it at every /health); ix_series_date, for
series searched across studies by date

Revision ID: 0008
Revises: 0007

The new column is filled from the instance rows once, here: one pass over the instance table
(measured at 25,000,000 instances in docs/benchmarks.md). ``Index.migrate`` refreshes the
planner's statistics after every upgrade.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.add_column("study", sa.Column("stored_bytes", big, nullable=False, server_default="0"))
    study = sa.table("study", sa.column("pk", sa.Integer), sa.column("stored_bytes", big))
    series = sa.table("series", sa.column("pk", sa.Integer), sa.column("study_pk", sa.Integer))
    instance = sa.table("instance", sa.column("series_pk", sa.Integer), sa.column("file_size", big))
    total = (
        sa.select(sa.func.coalesce(sa.func.sum(instance.c.file_size), 0))
        .select_from(series.join(instance, instance.c.series_pk == series.c.pk))
        .where(series.c.study_pk == study.c.pk)
        .scalar_subquery()
    )
    op.execute(study.update().values(stored_bytes=total))
    op.create_index("ix_series_date", "series", ["series_date"])


def downgrade() -> None:
    op.drop_index("ix_series_date", "series")
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy: dropping the old study table
    # with foreign keys on would cascade to its series.
    op.drop_column("study", "stored_bytes")
