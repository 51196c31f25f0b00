"""initial schema: patient, study, series, instance, metadata cache

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("patient_name", byte_string(324), nullable=False),
        sa.Column("patient_name_norm", byte_string(324), nullable=False),
        sa.Column("patient_id", byte_string(64), nullable=False),
        sa.Column("issuer_of_patient_id", byte_string(64), nullable=False),
        sa.Column("patient_birth_date", byte_string(8), nullable=False),
        sa.Column("patient_birth_time", byte_string(16), nullable=False),
        sa.Column("patient_sex", byte_string(16), nullable=False),
        sa.Column("num_studies", sa.Integer(), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("charset", byte_string(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patient_id_issuer"),
    )
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.create_index("ix_patient_name", ["patient_name"], unique=False)
        batch_op.create_index("ix_patient_name_norm", ["patient_name_norm"], unique=False)

    op.create_table(
        "study",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("study_uid", byte_string(64), nullable=False),
        sa.Column("study_date", byte_string(8), nullable=False),
        sa.Column("study_time", byte_string(16), nullable=False),
        sa.Column("accession_number", byte_string(64), nullable=False),
        sa.Column("study_id", byte_string(16), nullable=False),
        sa.Column("study_description", byte_string(64), nullable=False),
        sa.Column("referring_physician_name", byte_string(324), nullable=False),
        sa.Column("referring_physician_name_norm", byte_string(324), nullable=False),
        sa.Column("institution_name", byte_string(64), nullable=False),
        sa.Column("patient_age", byte_string(16), nullable=False),
        sa.Column("patient_size", byte_string(16), nullable=False),
        sa.Column("patient_weight", byte_string(16), nullable=False),
        sa.Column("modalities_in_study", byte_string(256), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("charset", byte_string(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["patient_pk"], ["patient.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("study_uid", name="uq_study_uid"),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index("ix_study_accession", ["accession_number"], unique=False)
        batch_op.create_index("ix_study_date", ["study_date"], unique=False)
        batch_op.create_index("ix_study_patient", ["patient_pk"], unique=False)
        batch_op.create_index("ix_study_updated", ["updated_at"], unique=False)

    op.create_table(
        "series",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("series_uid", byte_string(64), nullable=False),
        sa.Column("modality", byte_string(16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", byte_string(64), nullable=False),
        sa.Column("series_date", byte_string(8), nullable=False),
        sa.Column("series_time", byte_string(16), nullable=False),
        sa.Column("body_part_examined", byte_string(16), nullable=False),
        sa.Column("protocol_name", byte_string(64), nullable=False),
        sa.Column("station_name", byte_string(16), nullable=False),
        sa.Column("manufacturer", byte_string(64), nullable=False),
        sa.Column("pps_start_date", byte_string(8), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["study.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("series_uid", name="uq_series_uid"),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index("ix_series_study", ["study_pk"], unique=False)

    op.create_table(
        "instance",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", byte_string(64), nullable=False),
        sa.Column("sop_class_uid", byte_string(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("content_date", byte_string(8), nullable=False),
        sa.Column("content_time", byte_string(16), nullable=False),
        sa.Column("acquisition_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", byte_string(64), nullable=False),
        sa.Column("storage_key", byte_string(80), nullable=False),
        sa.Column("file_size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("source_ae", byte_string(16), nullable=False),
        sa.ForeignKeyConstraint(["series_pk"], ["series.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instance_uid"),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index("ix_instance_series", ["series_pk"], unique=False)

    op.create_table(
        "instance_metadata",
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["instance_pk"], ["instance.pk"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["series_pk"], ["series.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance_pk"),
    )
    with op.batch_alter_table("instance_metadata", schema=None) as batch_op:
        batch_op.create_index("ix_metadata_series", ["series_pk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance_metadata", schema=None) as batch_op:
        batch_op.drop_index("ix_metadata_series")

    op.drop_table("instance_metadata")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_series")

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study")

    op.drop_table("series")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_updated")
        batch_op.drop_index("ix_study_patient")
        batch_op.drop_index("ix_study_date")
        batch_op.drop_index("ix_study_accession")

    op.drop_table("study")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index("ix_patient_name_norm")
        batch_op.drop_index("ix_patient_name")

    op.drop_table("patient")
