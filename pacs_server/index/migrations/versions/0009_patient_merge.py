"""patient_merge: patients merged away by HL7 ADT^A40, remembered as redirections

Revision ID: 0009
Revises: 0008

An instance that arrives after a merge with the prior patient ID is indexed under the
surviving patient (index/patient_records.py).
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_merge",
        sa.Column("prior_id", byte_string(64), nullable=False),
        sa.Column("prior_issuer", byte_string(64), nullable=False),
        sa.Column("surviving_id", byte_string(64), nullable=False),
        sa.Column("surviving_issuer", byte_string(64), nullable=False),
        sa.Column("merged_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("prior_id", "prior_issuer"),
    )


def downgrade() -> None:
    op.drop_table("patient_merge")
