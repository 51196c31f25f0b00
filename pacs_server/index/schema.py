"""Tables of the index: patient → study → series → instance, plus the per-instance metadata cache.

Query columns are generated from ``attributes.ATTRIBUTES`` so that ingest, the matcher and the
schema cannot drift apart. Changing a table here needs a new Alembic migration in ``migrations/``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

from .attributes import ATTRIBUTES
from .column_types import byte_string

metadata = MetaData()


def _query_columns(level: str) -> list[Column]:
    columns: list[Column] = []
    for attr in ATTRIBUTES:
        if attr.level != level:
            continue
        if attr.kind in ("int", "count"):
            columns.append(
                Column(
                    attr.column,
                    Integer,
                    nullable=attr.kind != "count",
                    default=0 if attr.kind == "count" else None,
                )
            )
        else:
            columns.append(Column(attr.column, byte_string(attr.length), nullable=False, default=""))
        if attr.kind == "pn":
            columns.append(Column(attr.column + "_norm", byte_string(attr.length), nullable=False, default=""))
    return columns


patient = Table(
    "patient",
    metadata,
    Column("pk", Integer, primary_key=True),
    *_query_columns("PATIENT"),
    Column("charset", byte_string(128), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patient_id_issuer"),
    Index("ix_patient_name", "patient_name"),
    Index("ix_patient_name_norm", "patient_name_norm"),
)

study = Table(
    "study",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_pk", Integer, ForeignKey("patient.pk", ondelete="CASCADE"), nullable=False),
    *_query_columns("STUDY"),
    Column("charset", byte_string(128), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Bytes of the study's stored files, kept with its counters by every write (from 0008), so
    # that the archive's total is a sum over studies, not a scan of 25 million instance rows.
    Column("stored_bytes", BigInteger().with_variant(Integer, "sqlite"), nullable=False, default=0),
    UniqueConstraint("study_uid", name="uq_study_uid"),
    Index("ix_study_patient", "patient_pk"),
    Index("ix_study_date", "study_date"),
    Index("ix_study_accession", "accession_number"),
    Index("ix_study_updated", "updated_at"),
)

series = Table(
    "series",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_pk", Integer, ForeignKey("study.pk", ondelete="CASCADE"), nullable=False),
    *_query_columns("SERIES"),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("series_uid", name="uq_series_uid"),
    Index("ix_series_study", "study_pk"),
    # Series searched across studies by date (QIDO-RS /series, C-FIND at SERIES level with
    # Modality and SeriesDate): a scan of every series without it (from 0008, docs/benchmarks.md).
    Index("ix_series_date", "series_date"),
)

instance = Table(
    "instance",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("series_pk", Integer, ForeignKey("series.pk", ondelete="CASCADE"), nullable=False),
    *_query_columns("IMAGE"),
    Column("transfer_syntax_uid", byte_string(64), nullable=False),
    Column("storage_key", byte_string(80), nullable=False),
    # Bytes of the stored file (a multi-frame instance can pass 2 GiB: 64-bit on PostgreSQL).
    Column("file_size", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    # SHA-256 (hex) of the encoded dataset after the file meta: what a sender put on the wire,
    # equal for two copies of one instance from different senders. Re-sends are compared on it;
    # NULL for instances indexed before revision 0003 until `macpacs reindex` fills it.
    Column("content_hash", byte_string(64), nullable=True),
    Column("received_at", Float, nullable=False),
    Column("source_ae", byte_string(16), nullable=False, default=""),
    UniqueConstraint("sop_instance_uid", name="uq_instance_uid"),
    Index("ix_instance_series", "series_pk"),
)

# DICOM JSON of each instance without bulk data (zlib), written at ingest so that metadata
# requests (WADO-RS /metadata) never re-read files. Kept apart to keep `instance` rows small.
instance_metadata = Table(
    "instance_metadata",
    metadata,
    Column("instance_pk", Integer, ForeignKey("instance.pk", ondelete="CASCADE"), primary_key=True),
    Column("series_pk", Integer, ForeignKey("series.pk", ondelete="CASCADE"), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Index("ix_metadata_series", "series_pk"),
)

LEVEL_TABLES = {"PATIENT": patient, "STUDY": study, "SERIES": series, "IMAGE": instance}

# DICOM peers: C-MOVE destinations, SCU targets, access control (managed by pacs_server.nodes).
node = Table(
    "node",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("name", byte_string(64), nullable=False),
    Column("ae_title", byte_string(16), nullable=False),
    Column("host", byte_string(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("tls", Boolean, nullable=False, default=False),
    Column("allow_store", Boolean, nullable=False, default=True),
    Column("allow_query", Boolean, nullable=False, default=True),
    Column("allow_retrieve", Boolean, nullable=False, default=True),
    # "active", or "pending" for a workstation that registered itself and awaits an admin.
    Column("status", byte_string(16), nullable=False, default="active"),
    Column("description", byte_string(1024), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("name", name="uq_node_name"),
    UniqueConstraint("ae_title", name="uq_node_ae_title"),
)

# Web admin users (passwords hashed) and their API tokens (stored as hashes only).
web_user = Table(
    "web_user",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("username", byte_string(64), nullable=False),
    Column("password_hash", byte_string(255), nullable=False),
    Column("role", byte_string(16), nullable=False, default="admin"),
    Column("created_at", Float, nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", Float, nullable=False, default=0.0),
    # What the user may do: rights names joined by commas (pacs_server.users.RIGHTS), from 0004.
    Column("rights", byte_string(255), nullable=False, default=""),
    UniqueConstraint("username", name="uq_web_user_username"),
)

api_token = Table(
    "api_token",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", Integer, ForeignKey("web_user.pk", ondelete="CASCADE"), nullable=False),
    Column("name", byte_string(64), nullable=False, default=""),
    Column("token_hash", byte_string(128), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("token_hash", name="uq_api_token_hash"),
)


# Work that outlives a request (pacs_server.jobs, SQL in jobs_table.py): sends, retrieves,
# routing, webhooks. A job is taken by one runner at a time (a conditional UPDATE of ``state``).
job = Table(
    "job",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("kind", byte_string(32), nullable=False),
    Column("description", byte_string(512), nullable=False, default=""),
    Column("payload", Text, nullable=False, default="{}"),  # JSON, the kind's own
    # Queued jobs with one batch key may run together (instances routed to one node: one association).
    Column("batch_key", byte_string(255), nullable=True),
    # At most one job per key, ever: a hook that runs twice (after a crash) queues nothing twice.
    Column("dedupe_key", byte_string(255), nullable=True),
    # queued, running, done, failed (gave up or cannot succeed), cancelled
    Column("state", byte_string(16), nullable=False, default="queued"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("next_run_at", Float, nullable=False),
    Column("owner", byte_string(128), nullable=False, default=""),  # host:pid:claim of the runner
    Column("lease_until", Float, nullable=False, default=0.0),  # a running job past it is re-queued
    Column("total", Integer, nullable=False, default=0),
    Column("done", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("message", Text, nullable=False, default=""),
    Column("alerted", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("dedupe_key", name="uq_job_dedupe_key"),
    Index("ix_job_state_next", "state", "next_run_at"),
    Index("ix_job_batch", "batch_key", "state"),
)

# Studies that became stable (pacs_server.stable, SQL in stable_table.py): the study's
# updated_at when study_stable last fired for it, so that a restart neither repeats nor loses one.
study_stable = Table(
    "study_stable",
    metadata,
    Column("study_uid", byte_string(64), primary_key=True),
    Column("seen_updated_at", Float, nullable=False),
    Column("generation", Integer, nullable=False),  # 1 the first time, +1 each time it fires again
    Column("state", byte_string(16), nullable=False),  # "firing" while the hooks run, then "fired"
    Column("fired_at", Float, nullable=False),
)

# Browser logins (pacs_server.sessions, SQL in sessions_table.py): the cookie carries a random
# token, the row its SHA-256, so that logout, a new password or removing the user end it at
# once on every server node sharing the index.
web_session = Table(
    "web_session",
    metadata,
    Column("token_hash", byte_string(64), primary_key=True),
    Column("user_pk", Integer, ForeignKey("web_user.pk", ondelete="CASCADE"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # absolute end (web.session_hours)
    Column("address", byte_string(64), nullable=False, default=""),
    Index("ix_web_session_user", "user_pk"),
    Index("ix_web_session_expires", "expires_at"),
)

# Counters of attempts per key within a window (login failures per client address, workstation
# registrations per address: users_table), each attempt one upsert adding 1 (SET count = count + 1).
rate_limit = Table(
    "rate_limit",
    metadata,
    Column("key", byte_string(128), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("window_start", Float, nullable=False),
    Index("ix_rate_limit_window", "window_start"),
)
