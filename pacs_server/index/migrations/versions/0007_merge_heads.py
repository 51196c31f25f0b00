"""merge: sessions (0004), worklist (0005) and jobs (0006), developed side by side from 0003

Revision ID: 0007
Revises: 0004, 0005, 0006

Changes nothing: the history has one head again, and later revisions follow this one.
"""

revision = "0007"
down_revision = ("0004", "0005", "0006")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
