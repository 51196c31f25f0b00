"""scheduled_procedure (the modality worklist), performed_procedure (MPPS), hl7_message (HL7 intake)

Revision ID: 0005
Revises: 0003

Tables of the worklist, mpps and hl7 plugins (pacs_server/index/worklist_table.py, hl7_table.py).
"""

import sqlalchemy as sa
from alembic import op

from macpacs.pacs_server.index.column_types import byte_string

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduled_procedure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("item_key", byte_string(200), nullable=False),
        sa.Column("source", byte_string(16), nullable=False),
        sa.Column("patient_id", byte_string(64), nullable=False),
        sa.Column("issuer_of_patient_id", byte_string(64), nullable=False),
        sa.Column("patient_name", byte_string(324), nullable=False),
        sa.Column("patient_name_norm", byte_string(324), nullable=False),
        sa.Column("patient_birth_date", byte_string(8), nullable=False),
        sa.Column("patient_sex", byte_string(16), nullable=False),
        sa.Column("accession_number", byte_string(64), nullable=False),
        sa.Column("requested_procedure_id", byte_string(64), nullable=False),
        sa.Column("study_uid", byte_string(64), nullable=False),
        sa.Column("sps_id", byte_string(64), nullable=False),
        sa.Column("modality", byte_string(16), nullable=False),
        sa.Column("station_ae", byte_string(16), nullable=False),
        sa.Column("station_name", byte_string(16), nullable=False),
        sa.Column("start_date", byte_string(8), nullable=False),
        sa.Column("start_time", byte_string(16), nullable=False),
        sa.Column("performing_physician", byte_string(324), nullable=False),
        sa.Column("performing_physician_norm", byte_string(324), nullable=False),
        sa.Column("status", byte_string(16), nullable=False),
        sa.Column("item", sa.Text(), nullable=False),
        sa.Column("message_time", byte_string(26), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("item_key", name="uq_scheduled_procedure_key"),
    )
    op.create_index("ix_sps_status_date", "scheduled_procedure", ["status", "start_date"])
    op.create_index("ix_sps_station", "scheduled_procedure", ["station_ae"])
    op.create_index("ix_sps_patient", "scheduled_procedure", ["patient_id"])
    op.create_index("ix_sps_accession", "scheduled_procedure", ["accession_number"])
    op.create_table(
        "performed_procedure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", byte_string(64), nullable=False),
        sa.Column("status", byte_string(16), nullable=False),
        sa.Column("calling_ae", byte_string(16), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_performed_procedure_uid"),
    )
    op.create_table(
        "hl7_message",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("sending_application", byte_string(227), nullable=False),
        sa.Column("sending_facility", byte_string(227), nullable=False),
        sa.Column("control_id", byte_string(199), nullable=True),
        sa.Column("message_type", byte_string(16), nullable=False),
        sa.Column("message_time", byte_string(26), nullable=False),
        sa.Column("peer", byte_string(64), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("ack_code", byte_string(2), nullable=False),
        sa.Column("ack_text", byte_string(1024), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("sending_application", "sending_facility", "control_id", name="uq_hl7_message_control_id"),
    )
    op.create_index("ix_hl7_message_received", "hl7_message", ["received_at"])


def downgrade() -> None:
    op.drop_table("hl7_message")
    op.drop_table("performed_procedure")
    op.drop_table("scheduled_procedure")
