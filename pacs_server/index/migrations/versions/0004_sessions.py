"""web_session (server-side logins), rate_limit (attempt counters), web_user.rights

Revision ID: 0004
Revises: 0003

Existing users get the rights of their role: ``admin`` everything; ``read``, which could read,
download, send and upload (STOW-RS) before roles existed, becomes ``user`` with those four
rights, so that nobody loses what they could do. Sessions issued before this revision were
signed cookies, not rows: they end, and users log in again once.
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ADMIN_RIGHTS = "admin,delete,download,read,send,upload"
FORMER_READ_RIGHTS = "download,read,send,upload"


def upgrade() -> None:
    op.create_table(
        "web_session",
        sa.Column("token_hash", byte_string(64), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("address", byte_string(64), nullable=False),
        sa.ForeignKeyConstraint(["user_pk"], ["web_user.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_web_session_user", "web_session", ["user_pk"])
    op.create_index("ix_web_session_expires", "web_session", ["expires_at"])
    op.create_table(
        "rate_limit",
        sa.Column("key", byte_string(128), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_rate_limit_window", "rate_limit", ["window_start"])
    op.add_column("web_user", sa.Column("rights", byte_string(255), nullable=False, server_default=""))
    user = sa.table("web_user", sa.column("role", sa.String), sa.column("rights", sa.String))
    op.execute(user.update().where(user.c.role == "admin").values(rights=ADMIN_RIGHTS))
    op.execute(user.update().where(user.c.role == "read").values(role="user", rights=FORMER_READ_RIGHTS))


def downgrade() -> None:
    with op.batch_alter_table("web_user") as batch:
        batch.drop_column("rights")
    op.drop_index("ix_rate_limit_window", "rate_limit")
    op.drop_table("rate_limit")
    op.drop_index("ix_web_session_expires", "web_session")
    op.drop_index("ix_web_session_user", "web_session")
    op.drop_table("web_session")
