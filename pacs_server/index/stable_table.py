"""The ``study_stable`` table: which studies the ``study_stable`` hook fired for (``pacs_server.stable``).

A study's last instance time is its ``study.updated_at``, which ingest's own transaction sets
for every new or overwritten instance, whichever process stored it (DICOM workers included), so
nothing more is written per instance. A study is due when ``updated_at`` is older than the
stable delay and newer than what ``study_stable`` last recorded for it. Firing is claimed with a
conditional write (``seen_updated_at < updated_at``), so that one process fires each
generation once, even with several servers on one database. Writes go as the job queue's do
(``jobs_table.quick_write``): a firing lost to a power cut fires again, which plugins dedupe.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, or_, select, update

from . import upsert
from .db import Index
from .jobs_table import quick_write
from .schema import instance, series, study, study_stable

FIRING, FIRED = "firing", "fired"


class StableTable:
    """The stable-study bookkeeping of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.engine = index.engine

    def due(self, cutoff: float, since: float, limit: int = 1000) -> list[tuple[str, float]]:
        """(study UID, updated_at) of studies last changed in (``since``, ``cutoff``] that have not
        fired for that change yet, oldest first."""
        s, st = study.c, study_stable.c
        stmt = (
            select(s.study_uid, s.updated_at)
            .select_from(study.outerjoin(study_stable, st.study_uid == s.study_uid))
            .where(
                s.updated_at <= cutoff,
                s.updated_at > since,
                or_(st.study_uid.is_(None), st.seen_updated_at < s.updated_at),
            )
            .order_by(s.updated_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(stmt)]

    def claim(self, study_uid: str, updated_at: float) -> int | None:
        """Record that the study is firing for the change at ``updated_at``; its generation (1 the
        first time), or None when another process claimed this change first."""
        st = study_stable.c
        now = time.time()
        with quick_write(self.index) as conn:
            generation = conn.execute(select(st.generation).where(st.study_uid == study_uid)).scalar()
            if generation is None:
                stmt = upsert.insert(study_stable, self.engine.dialect.name).values(
                    study_uid=study_uid, seen_updated_at=updated_at, generation=1, state=FIRING, fired_at=now
                )
                # RETURNING, not rowcount: psycopg gives no rowcount for a Core INSERT (always -1,
                # so on PostgreSQL no study ever fired).
                inserted = conn.execute(stmt.on_conflict_do_nothing().returning(st.study_uid)).first()
                return 1 if inserted is not None else None
            claimed = conn.execute(
                update(study_stable)
                .where(st.study_uid == study_uid, st.seen_updated_at < updated_at)
                .values(seen_updated_at=updated_at, generation=st.generation + 1, state=FIRING, fired_at=now)
            ).rowcount
            return generation + 1 if claimed == 1 else None

    def fired(self, study_uid: str, generation: int) -> None:
        """The hooks of that generation have run."""
        st = study_stable.c
        with quick_write(self.index) as conn:
            conn.execute(
                update(study_stable)
                .where(and_(st.study_uid == study_uid, st.generation == generation))
                .values(state=FIRED)
            )

    def interrupted(self, begun_before: float) -> list[tuple[str, int, float]]:
        """(study UID, generation, when it began) of firings begun before ``begun_before`` and never
        finished: the process that began them stopped, or (several servers on one database)
        still runs their hooks, which is why only old ones are asked for."""
        st = study_stable.c
        stmt = select(st.study_uid, st.generation, st.fired_at).where(st.state == FIRING, st.fired_at < begun_before)
        with self.engine.connect() as conn:
            return [(row[0], row[1], row[2]) for row in conn.execute(stmt)]

    def take_over(self, study_uid: str, generation: int, began: float) -> bool:
        """Claim an interrupted firing (as ``interrupted`` listed it) for this process: True for
        the one process whose conditional write found it unchanged."""
        st = study_stable.c
        with quick_write(self.index) as conn:
            return (
                conn.execute(
                    update(study_stable)
                    .where(
                        st.study_uid == study_uid, st.generation == generation, st.state == FIRING, st.fired_at == began
                    )
                    .values(fired_at=time.time())
                ).rowcount
                == 1
            )

    def source_aes(self, study_uid: str) -> list[str]:
        """The calling AE titles (or other sources) the study's instances came from."""
        stmt = (
            select(instance.c.source_ae)
            .distinct()
            .select_from(
                instance.join(series, series.c.pk == instance.c.series_pk).join(study, study.c.pk == series.c.study_pk)
            )
            .where(study.c.study_uid == study_uid)
        )
        with self.engine.connect() as conn:
            return sorted(value for value in conn.execute(stmt).scalars() if value)

    def state(self, study_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(study_stable).where(study_stable.c.study_uid == study_uid)).mappings().first()
        return dict(row) if row else None
