"""job (the persistent job queue) and study_stable (studies the study_stable hook fired for)

Revision ID: 0006
Revises: 0003

The studies already in the archive count as stable when this revision is applied: enabling
routing or webhooks on an existing archive acts on what arrives from then on, instead of
sending the whole archive again.
"""

import time

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0006"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("kind", byte_string(32), nullable=False),
        sa.Column("description", byte_string(512), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("batch_key", byte_string(255), nullable=True),
        sa.Column("dedupe_key", byte_string(255), nullable=True),
        sa.Column("state", byte_string(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_run_at", sa.Float(), nullable=False),
        sa.Column("owner", byte_string(128), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("alerted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("dedupe_key", name="uq_job_dedupe_key"),
    )
    with op.batch_alter_table("job") as batch_op:
        batch_op.create_index("ix_job_state_next", ["state", "next_run_at"], unique=False)
        batch_op.create_index("ix_job_batch", ["batch_key", "state"], unique=False)
    op.create_table(
        "study_stable",
        sa.Column("study_uid", byte_string(64), nullable=False),
        sa.Column("seen_updated_at", sa.Float(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", byte_string(16), nullable=False),
        sa.Column("fired_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid"),
    )
    study = sa.table("study", sa.column("study_uid", sa.String), sa.column("updated_at", sa.Float))
    stable = sa.table(
        "study_stable",
        sa.column("study_uid", sa.String),
        sa.column("seen_updated_at", sa.Float),
        sa.column("generation", sa.Integer),
        sa.column("state", sa.String),
        sa.column("fired_at", sa.Float),
    )
    now = time.time()
    op.execute(
        stable.insert().from_select(
            ["study_uid", "seen_updated_at", "generation", "state", "fired_at"],
            sa.select(
                study.c.study_uid,
                study.c.updated_at,
                sa.literal(0),
                sa.literal("fired"),
                sa.literal(now),
            ),
        )
    )


def downgrade() -> None:
    op.drop_table("study_stable")
    op.drop_table("job")
