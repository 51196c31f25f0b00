"""nodes registry, web users and API tokens

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("name", byte_string(64), nullable=False),
        sa.Column("ae_title", byte_string(16), nullable=False),
        sa.Column("host", byte_string(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("allow_store", sa.Boolean(), nullable=False),
        sa.Column("allow_query", sa.Boolean(), nullable=False),
        sa.Column("allow_retrieve", sa.Boolean(), nullable=False),
        sa.Column("status", byte_string(16), nullable=False),
        sa.Column("description", byte_string(1024), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("ae_title", name="uq_node_ae_title"),
        sa.UniqueConstraint("name", name="uq_node_name"),
    )
    op.create_table(
        "web_user",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("username", byte_string(64), nullable=False),
        sa.Column("password_hash", byte_string(255), nullable=False),
        sa.Column("role", byte_string(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("username", name="uq_web_user_username"),
    )
    op.create_table(
        "api_token",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("name", byte_string(64), nullable=False),
        sa.Column("token_hash", byte_string(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["user_pk"], ["web_user.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("token_hash", name="uq_api_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_token")
    op.drop_table("web_user")
    op.drop_table("node")
