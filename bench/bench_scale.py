"""Issue 17: the index at 25,000,000 instances: queries, start-up, /health and ingest as it grows.

Run (other work shares the machine: keep it at the lowest priority):
    nice -n 19 .venv/bin/python bench/bench_scale.py [--sizes 1000000,5000000,25000000]
        [--data bench/data/scale] [--out bench/results/scale.json] [--skip-ingest] [--skip-orthanc]
    nice -n 19 .venv/bin/python bench/bench_scale.py --index postgresql [--sizes 1000000,25000000]

With ``--index postgresql`` the same rows go into a PostgreSQL database (Debian's server, a
durable cluster kept in ``<data>/postgresql`` between runs, with ``shared_buffers`` and
``effective_cache_size`` set for this 24 GB machine as a site would; the schema migrated by
``Index.migrate``; rows written with ``COPY``), and the same queries are measured in process
and through ``macpacs serve`` with ``index.url`` on it. Ingest next to Orthanc's PostgreSQL
plugin is ``bench/bench_postgres.py``'s; this one measures the queries only.

One index is filled on the way up and measured at each size (a checkpoint):
- in process, each common query through ``Index.find_all`` (the matcher's SQL, no network),
  with its EXPLAIN QUERY PLAN, and ``counts``/``stored_bytes``/``analyze``;
- ``macpacs serve`` on that index: start-up until ``/testdbalive`` answers, C-FIND with DCMTK
  ``findscu``, the same searches as QIDO-RS over HTTP, the study list's JSON page, ``/health``
  and the status page;
- at the last size only: CT slices sent with ``storescu`` into that index and into an empty one,
  alternately (4 rounds of 500), and Orthanc filled with 25,000 instances through DICOM, queried by
  Patient ID beside macpacs.

The index is filled with bulk SQL (rows built here, inserted with ``executemany`` in large
transactions, every column of the server's schema), not through DICOM: the stored files do not
exist, so only the query figures and the ingest into it are meaningful, not retrieval. The
archive is a mix of modalities, one study after another at a constant rate of studies a day (so
a month holds as many studies at 1 million as at 25 million instances):

| modality | share of studies | series a study | instances a series |
|---|---|---|---|
| CT | 15 % | 1-3 | 100-1000 |
| MR | 10 % | 3-6 | 20-200 |
| CR/DX | 45 % | 1-2 | 1-2 |
| US | 20 % | 1 | 10-60 |
| MG | 10 % | 1 | 4 |

That is ~240 instances a study, ~104,000 studies and ~62,000 patients at 25 million (60 % of
studies are a new patient's, the rest a returning one's), CT 69 % of the instances. Names are
common surnames with a Zipf-like spread (``DOE*``, with DOERR and DOERING, matches 1.3 % of patients), UIDs grow with
the study date as a modality's do, 5 % of studies are priors with an older date. The metadata
column (the DICOM JSON cache) holds one blob per series, a real MR header's DICOM JSON with the
series' first SOP Instance UID in it, zlib-compressed (~830 bytes), repeated for each instance of
the series (WADO-RS metadata of a filled series is therefore not exact, only its size): a real
CT header compresses to ~2,600 bytes, which at 25 million instances (65 GB) would not fit the
disk this runs on. The ``sizing`` part of docs/archive.md extrapolates. Each study is recorded as
stable (``study_stable``), as the server does once a study stops receiving.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench.common import DATA, Macpacs, Orthanc, ct_series, send_parallel, small_instances, split
from macpacs.pacs_server.index import Index, Query
from macpacs.pacs_server.index.matcher import build
from macpacs.pacs_server.index.schema import metadata as schema_metadata
from macpacs.pacs_server.ingest import read_instance
from macpacs.pacs_server.storage import blob_key
from tests.synthetic import write_series

ROOT = "1.2.826.0.1.3680043.10.1234.25"
STUDIES_PER_DAY = 29
FIRST_DAY = date(2016, 1, 4)
MIN_FREE_BYTES = 30 * 1024**3  # the fill stops rather than leave less free on the disk
COMMIT_EVERY = 250_000  # instances a transaction

# modality: (share of studies, series a study, instances a series, SOP class, rows, bytes a file, descriptions)
MODALITIES: dict[str, tuple[float, tuple[int, int], tuple[int, int], str, int, int, tuple[str, ...]]] = {
    "CT": (0.15, (1, 3), (100, 1000), "1.2.840.10008.5.1.4.1.1.2", 512, 525_000,
           ("CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS W CONTRAST", "CT HEAD W/O CONTRAST", "CTA CHEST")),
    "MR": (0.10, (3, 6), (20, 200), "1.2.840.10008.5.1.4.1.1.4", 256, 140_000,
           ("MR BRAIN W/WO CONTRAST", "MR KNEE LEFT", "MR LUMBAR SPINE", "MR PROSTATE")),
    "DX": (0.45, (1, 2), (1, 2), "1.2.840.10008.5.1.4.1.1.1.1", 2048, 8_400_000,
           ("XR CHEST 2 VIEWS", "XR KNEE 3 VIEWS", "XR HAND", "XR PELVIS")),
    "US": (0.20, (1, 1), (10, 60), "1.2.840.10008.5.1.4.1.1.6.1", 600, 1_440_000,
           ("US ABDOMEN COMPLETE", "US THYROID", "US OB 2ND TRIMESTER")),
    "MG": (0.10, (1, 1), (4, 4), "1.2.840.10008.5.1.4.1.1.1.2", 3328, 27_000_000,
           ("MG SCREENING BILATERAL", "MG DIAGNOSTIC LEFT")),
}  # fmt: skip
_KINDS = list(MODALITIES)
_SHARES = [MODALITIES[m][0] for m in _KINDS]

SURNAMES = (  # noqa: SIM905
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ "
    "GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE HARRIS "
    "SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL "
    "FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS MUELLER SCHMIDT "
    "SCHNEIDER FISCHER WEBER MEYER WAGNER BECKER SCHULZ HOFFMANN MARTIN BERNARD DUBOIS THOMAS ROBERT "
    "RICHARD PETIT DURAND LEROY MOREAU ROSSI RUSSO FERRARI ESPOSITO BIANCHI ROMANO COLOMBO KOWALSKI "
    "NOWAK DOE DOERR DOERING JANSEN DEJONG DEVRIES VANDIJK BAKKER VISSER SMIT MEIJER DEBOER MULDER "
    "DEGROOT BOS VOS PETERS HENDRIKS"
).split()
GIVEN = (  # noqa: SIM905
    "JAMES MARY ROBERT PATRICIA JOHN JENNIFER MICHAEL LINDA DAVID ELIZABETH WILLIAM BARBARA RICHARD "
    "SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN ANNA PAUL EMMA LUCAS MARIE PIERRE SOFIA LUCA JAN "
    "EVA"
).split()
_NAME_WEIGHTS = [1 / (rank + 1) ** 0.7 for rank in range(len(SURNAMES))]

# Columns filled here for each table, in insert order; ``check_columns`` keeps them equal to the schema.
COLUMNS = {
    "patient": "pk patient_name patient_name_norm patient_id issuer_of_patient_id patient_birth_date "
    "patient_birth_time patient_sex num_studies num_series num_instances charset created_at",
    "study": "pk patient_pk study_uid study_date study_time accession_number study_id study_description "
    "referring_physician_name referring_physician_name_norm institution_name patient_age patient_size "
    "patient_weight modalities_in_study num_series num_instances charset created_at updated_at stored_bytes",
    "series": "pk study_pk series_uid modality series_number series_description series_date series_time "
    "body_part_examined protocol_name station_name manufacturer pps_start_date num_instances created_at",
    "instance": "pk series_pk sop_instance_uid sop_class_uid instance_number content_date content_time "
    "acquisition_number rows columns number_of_frames transfer_syntax_uid storage_key file_size content_hash "
    "received_at source_ae",
    "instance_metadata": "instance_pk series_pk data",
    "study_stable": "study_uid seen_updated_at generation state fired_at",
}
COLUMNS_OF = {table: names.split() for table, names in COLUMNS.items()}
TABLES = ("patient", "study", "series", "instance", "instance_metadata", "study_stable")  # insert order
PATIENT_COUNTS = (
    "UPDATE patient SET num_studies = num_studies + %s, num_series = num_series + %s,"
    " num_instances = num_instances + %s WHERE pk = %s"
)


def check_columns() -> None:
    """The fill writes every column of the server's tables (a new column must be filled here too)."""
    for table, names in COLUMNS_OF.items():
        declared = [c.name for c in schema_metadata.tables[table].c]
        if sorted(declared) != sorted(names):
            raise SystemExit(f"bench_scale: {table} columns differ from the schema: {sorted(declared)}")


def patient_row(number: int, now: float) -> tuple[Any, ...]:
    """Patient ``number`` (0-based), the same on every run."""
    rng = random.Random(number * 7919 + 1)
    surname = rng.choices(SURNAMES, _NAME_WEIGHTS)[0]
    name = f"{surname}^{rng.choice(GIVEN)}" + (f"^{chr(65 + rng.randrange(26))}" if rng.random() < 0.3 else "")
    born = date(1930, 1, 1) + timedelta(days=rng.randrange(33_000))
    return (
        number + 1, name, name.upper(), f"{7_000_000 + number}", "", born.strftime("%Y%m%d"), "",
        rng.choice("MF"), 0, 0, 0, "ISO_IR 100", now,
    )  # fmt: skip


def metadata_template() -> tuple[str, str]:
    """A real MR header's DICOM JSON (pydicom's MR_small.dcm, as ingest caches it) and its SOP UID."""
    from pydicom.data import get_testdata_file

    parsed = read_instance(Path(get_testdata_file("MR_small.dcm")))
    return zlib.decompress(parsed.record.metadata).decode(), parsed.sop_instance_uid


class Filler:
    """Appends studies to an index file with plain SQL, resuming from what the file holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.template, self.template_uid = metadata_template()
        self.con = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=MEMORY", "synchronous=OFF", "cache_size=-4000000", "temp_store=MEMORY"):
            self.con.execute(f"PRAGMA {pragma}")
        self.inserts = {
            table: f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            for table, names in COLUMNS_OF.items()
        }
        self._resume(lambda sql: self.con.execute(sql).fetchone()[0])

    def _resume(self, scalar: Callable[[str], int]) -> None:
        self.studies = scalar("SELECT count(*) FROM study")
        self.patients = scalar("SELECT count(*) FROM patient")
        self.series_pk = scalar("SELECT coalesce(max(pk), 0) FROM series")
        self.instance_pk = scalar("SELECT coalesce(max(pk), 0) FROM instance")
        self.instances = scalar("SELECT count(*) FROM instance")

    def close(self) -> None:
        self.con.execute("PRAGMA journal_mode=WAL")  # what the server runs in
        self.con.close()

    def fill_to(self, target: int) -> None:
        start, first = time.perf_counter(), self.instances
        while self.instances < target:
            if shutil.disk_usage(self.path.parent).free < MIN_FREE_BYTES:
                raise SystemExit(f"bench_scale: less than {MIN_FREE_BYTES >> 30} GB free: fill stopped")
            self._write(self._batch(target))
            rate = (self.instances - first) / (time.perf_counter() - start)
            print(f"  fill: {self.instances:,} instances, {self.studies:,} studies, {rate:,.0f} inst/s", flush=True)

    def _write(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        self.con.execute("BEGIN")
        for table in TABLES:
            self.con.executemany(self.inserts[table], rows[table])
        self.con.executemany(PATIENT_COUNTS.replace("%s", "?"), rows["patient_counts"])
        self.con.execute("COMMIT")

    def _batch(self, target: int) -> dict[str, list[tuple[Any, ...]]]:
        rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in (*COLUMNS_OF, "patient_counts")}
        counts: dict[int, list[int]] = {}
        added = 0
        while added < COMMIT_EVERY and self.instances + added < target:
            added += self._study(rows, counts)
        rows["patient_counts"] = [(s, se, i, pk) for pk, (s, se, i) in counts.items()]
        self.instances += added
        return rows

    def _study(self, rows: dict[str, list[tuple[Any, ...]]], counts: dict[int, list[int]]) -> int:
        n = self.studies
        self.studies += 1
        rng = random.Random(n * 104_729 + 3)
        now = time.time()
        if self.patients == 0 or rng.random() < 0.6:
            patient_pk = self.patients + 1
            rows["patient"].append(patient_row(self.patients, now))
            self.patients += 1
        else:
            patient_pk = rng.randrange(self.patients) + 1
        day = FIRST_DAY + timedelta(days=n // STUDIES_PER_DAY)
        if rng.random() < 0.05:  # a prior from elsewhere
            day -= timedelta(days=rng.randrange(1, 1800))
        study_date = day.strftime("%Y%m%d")
        study_time = f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        modality = rng.choices(_KINDS, _SHARES)[0]
        _share, n_series, per_series, sop_class, size, file_size, descriptions = MODALITIES[modality]
        study_uid = f"{ROOT}.{study_date}{study_time}.{n}"
        received = now - (date(2026, 1, 1) - day).days * 86400.0
        referring = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
        total_series = rng.randint(*n_series)
        total_instances = 0
        for k in range(1, total_series + 1):
            self.series_pk += 1
            series_uid = f"{study_uid}.{k}"
            count = rng.randint(*per_series)
            first_uid = f"{series_uid}.1"
            blob = zlib.compress(self.template.replace(self.template_uid, first_uid).encode(), 6)
            rows["series"].append(
                (self.series_pk, n + 1, series_uid, modality, k, f"{modality} SERIES {k}", study_date, study_time,
                 "CHEST" if modality in ("CT", "DX") else "", "", f"{modality}01", "ACME MEDICAL", study_date,
                 count, now)
            )  # fmt: skip
            instance_rows, metadata_rows = rows["instance"], rows["instance_metadata"]
            series_pk = self.series_pk
            for j in range(1, count + 1):
                self.instance_pk += 1
                uid = f"{series_uid}.{j}"
                instance_rows.append(
                    (self.instance_pk, series_pk, uid, sop_class, j, study_date, study_time, 1, size, size, None,
                     "1.2.840.10008.1.2.1", blob_key(uid), file_size, hashlib.sha256(uid.encode()).hexdigest(),
                     received, f"{modality}01")
                )  # fmt: skip
                metadata_rows.append((self.instance_pk, series_pk, blob))
            total_instances += count
        rows["study"].append(
            (n + 1, patient_pk, study_uid, study_date, study_time, f"ACC{n:08d}", str(n % 100_000),
             rng.choice(descriptions), referring, referring.upper(), "MACPACS GENERAL HOSPITAL",
             f"{rng.randrange(1, 95):03d}Y", "", "", modality, total_series, total_instances, "ISO_IR 100",
             now, now, total_instances * file_size)
        )  # fmt: skip
        # Stable already, as the server records a study that stopped receiving: otherwise its first
        # scan would fire the study_stable hook for every study of the archive.
        rows["study_stable"].append((study_uid, now, 1, "fired", now))
        patient_counts = counts.setdefault(patient_pk, [0, 0, 0])
        patient_counts[0] += 1
        patient_counts[1] += total_series
        patient_counts[2] += total_instances
        # A new patient's row is inserted in this batch with zero counters, then updated like the others.
        return total_instances


class PostgresFiller(Filler):
    """The same rows, into a PostgreSQL database with ``COPY``; the pk sequences are moved past them."""

    def __init__(self, url: str, disk: Path) -> None:
        import psycopg

        self.path = disk / "index"  # fill_to checks the free space of ``path.parent``
        self.template, self.template_uid = metadata_template()
        self.con = psycopg.connect(url)
        self.con.execute("SET synchronous_commit = off")  # this session's commits only: the fill's speed
        self._resume(lambda sql: self.con.execute(sql).fetchone()[0])
        self.con.commit()

    def _write(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        with self.con.transaction(), self.con.cursor() as cur:
            for table in TABLES:
                with cur.copy(f"COPY {table} ({', '.join(COLUMNS_OF[table])}) FROM STDIN") as copy:
                    for row in rows[table]:
                        copy.write_row(row)
            cur.executemany(PATIENT_COUNTS, rows["patient_counts"])

    def close(self) -> None:
        with self.con.transaction():
            for table in ("patient", "study", "series", "instance"):
                sequence = f"pg_get_serial_sequence('{table}', 'pk')"
                self.con.execute(f"SELECT setval({sequence}, (SELECT coalesce(max(pk), 1) FROM {table}))")
        self.con.close()


# -- what is measured at each size --------------------------------------------------------------
def samples(index: Index) -> dict[str, str]:
    """Values the queries look for, taken from the filled index (a patient with several studies...)."""
    with index.engine.connect() as conn:
        sql = conn.exec_driver_sql
        patient_id = sql("SELECT patient_id FROM patient WHERE num_studies >= 3 ORDER BY pk LIMIT 1").scalar()
        last_day = sql("SELECT max(study_date) FROM study").scalar()
        ct = sql(
            "SELECT study_uid, pk FROM study WHERE modalities_in_study = 'CT' AND num_series >= 2"
            " ORDER BY pk DESC LIMIT 1"
        ).one()
        series_uid = conn.execute(
            text("SELECT series_uid FROM series WHERE study_pk = :pk ORDER BY pk LIMIT 1"), {"pk": ct[1]}
        ).scalar()
        accession = conn.execute(
            text("SELECT accession_number FROM study WHERE pk = :pk"), {"pk": ct[1] // 2 + 1}
        ).scalar()
    month_end = date(int(last_day[:4]), int(last_day[4:6]), 1) - timedelta(days=1)
    month = f"{month_end.strftime('%Y%m')}01-{month_end.strftime('%Y%m%d')}"
    return {
        "patient_id": patient_id,
        "month": month,
        "study_uid": ct[0],
        "series_uid": series_uid,
        "accession": accession,
    }


STUDY_KEYS = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy")


def queries(s: dict[str, str]) -> dict[str, tuple[str, dict[str, str]]]:
    """label → (level, matching keys): C-FIND, QIDO-RS and the in-process figures ask the same."""
    return {
        "study, PatientID": ("STUDY", {"PatientID": s["patient_id"]}),
        "study, PatientName=DOE*": ("STUDY", {"PatientName": "DOE*"}),
        "study, StudyDate one month": ("STUDY", {"StudyDate": s["month"]}),
        "study, AccessionNumber": ("STUDY", {"AccessionNumber": s["accession"]}),
        "study, ModalitiesInStudy=MR + month": ("STUDY", {"ModalitiesInStudy": "MR", "StudyDate": s["month"]}),
        "series, Modality=MR + SeriesDate month": ("SERIES", {"Modality": "MR", "SeriesDate": s["month"]}),
        "series of a study": ("SERIES", {"StudyInstanceUID": s["study_uid"]}),
        "instances of a series": ("IMAGE", {"StudyInstanceUID": s["study_uid"], "SeriesInstanceUID": s["series_uid"]}),
    }


def _query(level: str, keys: dict[str, str], limit: int | None = None) -> Query:
    returned = {"STUDY": STUDY_KEYS, "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDate"),
                "IMAGE": ("SOPInstanceUID", "InstanceNumber")}[level]  # fmt: skip
    return Query(level, {**dict.fromkeys(returned), **keys}, limit=limit)


def measure(func: Callable[[], object], repeats: int) -> tuple[float, float, Any]:
    """Median wall time and median CPU time of this process (ms), and the last result. On a shared
    machine the CPU time is the steadier figure of the two for work done in this process."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = func()
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return round(statistics.median(times), 2), round(statistics.median(cpu), 2), result


def median_ms(func: Callable[[], object], repeats: int) -> tuple[float, Any]:
    wall, _cpu, result = measure(func, repeats)
    return wall, result


def plan(index: Index, query: Query) -> list[str]:
    statement, _ = build(query)
    compiled = statement.compile(dialect=index.engine.dialect)
    params = tuple(compiled.params[k] for k in compiled.positiontup) if compiled.positional else compiled.params
    explain = "EXPLAIN QUERY PLAN " if index.is_sqlite else "EXPLAIN "
    with index.engine.connect() as conn:
        return [row[-1] for row in conn.exec_driver_sql(explain + compiled.string, params)]


def in_process(url: str, s: dict[str, str], repeats: int) -> dict[str, Any]:
    index = Index(url)
    try:
        out: dict[str, Any] = {}
        out["analyze_ms"], out["analyze_cpu_ms"], _ = measure(index.analyze, 1)
        for label, (level, keys) in queries(s).items():
            query = _query(level, keys)
            ms, cpu, rows = measure(lambda q=query: index.find_all(q), repeats)
            out[label] = {"ms": ms, "cpu_ms": cpu, "matches": len(rows), "plan": plan(index, query)}
            print(f"  in process: {label:36s} {ms:8.2f} ms, CPU {cpu:8.2f} ms ({len(rows)} matches)", flush=True)
        study_list = Query(
            "STUDY", dict.fromkeys(STUDY_KEYS), order_by=[("StudyDate", True), ("StudyTime", True)], limit=50
        )
        ms, cpu, (_rows, total) = measure(lambda: index.page(study_list), repeats)
        out["study list page (50 by date, with total)"] = {
            "ms": ms,
            "cpu_ms": cpu,
            "matches": total,
            "plan": plan(index, study_list),
        }
        print(f"  in process: study list page                  {ms:8.2f} ms, CPU {cpu:8.2f} ms ({total})", flush=True)
        with index.engine.connect() as conn:  # what the status document read before revision 0008
            for name, sql in (("count(*) of instance", "SELECT count(*) FROM instance"),
                              ("sum(file_size) of instance", "SELECT sum(file_size) FROM instance")):  # fmt: skip
                ms, cpu, value = measure(lambda sql=sql: conn.exec_driver_sql(sql).scalar(), 1)
                out[name] = {"ms": ms, "cpu_ms": cpu, "value": value}
                print(f"  in process: {name:36s} {ms:8.2f} ms, CPU {cpu:8.2f} ms ({value})", flush=True)
        for name in ("counts", "stored_bytes"):
            ms, cpu, value = measure(getattr(index, name), repeats)
            out[name] = {"ms": ms, "cpu_ms": cpu, "value": value}
            print(f"  in process: {name:36s} {ms:8.2f} ms, CPU {cpu:8.2f} ms ({value})", flush=True)
        return out
    finally:
        index.close()


def http_ms(url: str, repeats: int) -> tuple[float, bytes]:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()

    return median_ms(get, repeats)


FINDSCU_KEYS = {
    "STUDY": ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy"],
    "SERIES": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDate"],
    "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"],
}


def findscu(port: int, aet: str, level: str, keys: dict[str, str], repeats: int) -> dict[str, float]:
    """findscu wall time (ms, median), with ``-q`` (prints nothing) and ``-v`` (one line a match)."""
    args = ["/usr/bin/findscu", "-S", "-aec", aet, "127.0.0.1", str(port), "-k", f"QueryRetrieveLevel={level}"]
    for key in FINDSCU_KEYS[level]:
        args += ["-k", f"{key}={keys[key]}" if key in keys else key]
    env = {**os.environ, "TCP_NODELAY": "1"}
    quiet, _ = median_ms(lambda: subprocess.run([*args, "-q"], capture_output=True, env=env, check=True), repeats)
    verbose, proc = median_ms(lambda: subprocess.run([*args, "-v"], capture_output=True, text=True, env=env), repeats)
    return {"quiet_ms": quiet, "verbose_ms": verbose, "matches": (proc.stdout + proc.stderr).count("(Pending)")}


def qido_url(base: str, level: str, keys: dict[str, str]) -> str:
    keys = dict(keys)
    if level == "STUDY":
        path = "/dicom-web/studies"
    elif level == "SERIES" and "StudyInstanceUID" not in keys:
        path = "/dicom-web/series"
    elif level == "SERIES":
        path = f"/dicom-web/studies/{keys.pop('StudyInstanceUID')}/series"
    else:
        path = f"/dicom-web/studies/{keys.pop('StudyInstanceUID')}/series/{keys.pop('SeriesInstanceUID')}/instances"
    return base + path + "?" + urllib.parse.urlencode({**keys, "limit": "100"})


def started(server: Macpacs, fresh: bool) -> float:
    """Start ``server``; seconds until ``/testdbalive`` answers 200 (DICOM accepts by then)."""
    start = time.perf_counter()
    server.start(fresh=fresh)
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=5) as response:
                if response.status == 200:
                    return round(time.perf_counter() - start, 2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def served(
    data_dir: Path, work: Path, s: dict[str, str], repeats: int, configs: tuple[Path | None, Path | None] = (None, None)
) -> dict[str, Any]:
    """Through ``macpacs serve``: an empty index first (this run's floor), then the filled one.
    ``configs``: the macpacs.toml of each (their ``index.url``), or None for SQLite in the folder."""
    empty = Macpacs(work / "empty", config=configs[0])
    out: dict[str, Any] = {"startup_empty_s": started(empty, fresh=True)}
    try:  # the same machine's floor in this run: an association and an answer with nothing to find
        reference = findscu(empty.port, empty.aet, "STUDY", {"PatientID": s["patient_id"]}, repeats)
        reference["qido_ms"], _ = http_ms(f"http://127.0.0.1:{empty.web_port}/dicom-web/studies?limit=100", repeats)
        reference["health_ms"], _ = http_ms(f"http://127.0.0.1:{empty.web_port}/health", repeats)
        out["empty index"] = reference
        print(f"  serve: an empty index                   {reference}", flush=True)
    finally:
        empty.stop()
    server = Macpacs(work / "full", data_dir=data_dir, config=configs[1])
    out["startup_s"] = started(server, fresh=False)
    base = f"http://127.0.0.1:{server.web_port}"
    print(f"  serve: up in {out['startup_s']} s (an empty index: {out['startup_empty_s']} s)", flush=True)
    try:
        for label, (level, keys) in queries(s).items():
            found = findscu(server.port, server.aet, level, keys, repeats)
            ms, body = http_ms(qido_url(base, level, keys), repeats)
            found["qido_ms"], found["qido_matches"] = ms, len(json.loads(body or b"[]"))
            out[label] = found
            print(
                f"  serve: {label:36s} findscu -q {found['quiet_ms']:7.1f} -v {found['verbose_ms']:7.1f} ms"
                f" ({found['matches']}), QIDO limit=100 {ms:7.1f} ms ({found['qido_matches']})",
                flush=True,
            )
        for label, path in (
            ("study list JSON (50 by date)", "/api/ui/studies?limit=50"),
            ("study list JSON, name DOE", "/api/ui/studies?limit=50&name=DOE"),
            ("study list HTML", "/studies"),
            ("health", "/health"),
            ("status page", "/status"),
        ):
            ms, body = http_ms(base + path, repeats)
            out[label] = {"ms": ms}
            if label == "health":
                doc = json.loads(body)
                out[label] |= {"counts": doc.get("counts"), "stored_bytes": doc.get("stored_bytes")}
            print(f"  serve: {label:36s} {ms:7.1f} ms", flush=True)
    finally:
        server.stop()
    return out


# -- ingest into the full index, Orthanc ----------------------------------------------------------
def ct_runs(count: int) -> Iterator[list[str]]:
    """Two different series of ``count`` CT slices (a series is never sent twice into one index)."""
    yield sorted(str(p) for p in ct_series(count).rglob("*.dcm"))
    second = DATA / f"ct{count}-b"
    if not (second / "done").exists():
        shutil.rmtree(second, ignore_errors=True)
        write_series(second, count, size=512, patient_name="BENCH^CTB", patient_id="BENCHCTB")
        (second / "done").write_text("")
    yield sorted(str(p) for p in second.rglob("*.dcm"))


def ingest(data_dir: Path, work: Path) -> dict[str, list[float]]:
    """CT slices on 1 association into the full index and into an empty one, alternately: four
    rounds of 500 (halves of two 1,000-slice series, so that nothing is sent twice into one index)."""
    out: dict[str, list[float]] = {"empty": [], "full": []}
    rounds = [half for files in ct_runs(1000) for half in (files[:500], files[500:])]
    for run, files in enumerate(rounds):
        for label in ("empty", "full") if run % 2 == 0 else ("full", "empty"):
            server = Macpacs(work / f"ingest-{label}", data_dir=data_dir if label == "full" else None)
            server.start(fresh=label == "empty")
            try:
                rate = len(files) / send_parallel(server.port, server.aet, [files])
            finally:
                server.stop()
            out[label].append(round(rate, 1))
            print(f"  ingest run {run + 1}: {label} index {rate:7.1f} inst/s", flush=True)
    return out


def index_writes(path: Path, work: Path, count: int, rounds: int = 3) -> dict[str, list[float]]:
    """The index's part of ingest, in process: ``Index.add_instance`` of ``count`` CT records (new
    random UIDs each round, as another vendor's modality would send) into the full index and into
    an empty one, alternately; CPU ms an instance (this process), and wall ms with the commits."""
    records = [read_instance(Path(f)).record for f in next(ct_runs(1000))[:count]]
    empty = work / "writes-empty" / "index.sqlite"
    shutil.rmtree(empty.parent, ignore_errors=True)
    empty.parent.mkdir(parents=True)
    out: dict[str, list[float]] = {"empty cpu_ms": [], "full cpu_ms": [], "empty wall_ms": [], "full wall_ms": []}
    for run in range(rounds):
        for label, target in (("empty", empty), ("full", path)) if run % 2 == 0 else (("full", path), ("empty", empty)):
            study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
            for record in records:
                uid = f"2.25.{uuid.uuid4().int}"
                record.study["study_uid"], record.series["series_uid"] = study, series
                record.instance["sop_instance_uid"], record.instance["storage_key"] = uid, blob_key(uid)
            index = Index(f"sqlite:///{target}")
            index.migrate()
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                for record in records:
                    index.add_instance(record)
                wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            finally:
                index.close()
            out[f"{label} cpu_ms"].append(round(cpu * 1000 / count, 3))
            out[f"{label} wall_ms"].append(round(wall * 1000 / count, 3))
            print(f"  index writes, round {run + 1}, {label}: CPU {cpu * 1000 / count:.3f} ms,"
                  f" wall {wall * 1000 / count:.3f} ms an instance", flush=True)  # fmt: skip
    return out


def orthanc(work: Path, macpacs_data: Path, s: dict[str, str], count: int, repeats: int) -> dict[str, Any]:
    """Orthanc (its SQLite index) filled with ``count`` small instances through DICOM, then C-FIND by
    Patient ID, beside macpacs on the full index."""
    files = small_instances(count)
    receiver = Orthanc(work / "orthanc").start()
    try:
        seconds = send_parallel(receiver.port, receiver.aet, split(files, 4))
        print(f"  orthanc: {count:,} instances stored in {seconds:.0f} s", flush=True)
        found = findscu(receiver.port, receiver.aet, "STUDY", {"PatientID": "SP000130"}, repeats)
        name = findscu(receiver.port, receiver.aet, "STUDY", {"PatientName": "SMITH*"}, repeats)
    finally:
        receiver.stop()
    server = Macpacs(work / "orthanc-side", data_dir=macpacs_data).start(fresh=False)
    try:
        ours = findscu(server.port, server.aet, "STUDY", {"PatientID": s["patient_id"]}, repeats)
    finally:
        server.stop()
    print(f"  orthanc {count:,}: PatientID {found}, PatientName=SMITH* {name}; macpacs full: {ours}", flush=True)
    return {"instances": count, "orthanc PatientID": found, "orthanc SMITH*": name, "macpacs PatientID": ours}


PG_SETTINGS = ("shared_buffers=4GB", "effective_cache_size=16GB", "max_wal_size=8GB", "work_mem=16MB")


class Target:
    """Where the filled index lives (an SQLite file in the server's folder, or a PostgreSQL database),
    how to fill it, and how to get an empty one of the same kind for the floor."""

    def __init__(self, kind: str, data: Path) -> None:
        self.kind = kind
        self.data_dir = data / ("archive" if kind == "sqlite" else "archive-pg")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config: Path | None = None
        if kind == "sqlite":
            self.url = f"sqlite:///{self.data_dir / 'index.sqlite'}"
        else:
            from tests.postgres import Cluster

            self.cluster = Cluster(durable=True, folder=data / "postgresql", settings=PG_SETTINGS)
            self.url = self._database("scale", keep=True)
            self.config = self._config(self.data_dir, self.url)
        index = Index(self.url)
        index.migrate()
        index.close()

    def _database(self, name: str, keep: bool) -> str:
        import psycopg

        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists and not keep:
                conn.execute(f'DROP DATABASE "{name}"')
            if not exists or not keep:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.cluster.url(name)

    @staticmethod
    def _config(folder: Path, url: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "macpacs.toml"
        config.write_text(f'[index]\nurl = "{url}"\n')
        return config

    def empty_config(self, work: Path) -> Path | None:
        """The macpacs.toml of a new, empty index (None: SQLite in the empty server's own folder)."""
        if self.kind == "sqlite":
            return None
        return self._config(work / "empty-config", self._database("scale_empty", keep=False))

    def filler(self) -> Filler:
        if self.kind == "sqlite":
            return Filler(self.data_dir / "index.sqlite")
        return PostgresFiller(self.url, self.cluster.folder)

    def size_bytes(self) -> int:
        if self.kind == "sqlite":
            return (self.data_dir / "index.sqlite").stat().st_size
        index = Index(self.url)
        try:
            with index.engine.connect() as conn:
                return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())
        finally:
            index.close()

    def close(self) -> None:
        if self.kind == "postgresql":
            self.cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--sizes", default="1000000,5000000,25000000")
    parser.add_argument("--data", type=Path, default=DATA / "scale")
    parser.add_argument("--out", type=Path, help="default: bench/results/scale.json (scale-pg.json for PostgreSQL)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-served", action="store_true", help="only the in-process figures at each size")
    parser.add_argument("--only-writes", action="store_true", help="only the index writes at the last size")
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--orthanc-count", type=int, default=25_000)
    args = parser.parse_args()
    args.data = args.data.resolve()  # the servers run in folders of their own
    args.out = args.out or Path(f"bench/results/scale{'-pg' if args.index == 'postgresql' else ''}.json")
    check_columns()
    if args.only_writes:
        path = args.data / "archive" / "index.sqlite"
        print(json.dumps(index_writes(path, args.data / "work", 500)), flush=True)
        return
    target = Target(args.index, args.data)
    try:
        measure_sizes(target, args)
    finally:
        target.close()


def measure_sizes(target: Target, args: argparse.Namespace) -> None:
    """Fill to each size and measure there; then, on SQLite, ingest into the last and Orthanc beside it."""
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    sizes = [int(size) for size in args.sizes.split(",")]
    work = args.data / "work"
    for size in sizes:
        filler = target.filler()
        start = time.perf_counter()
        if filler.instances < size:
            filler.fill_to(size)
        filled_s = time.perf_counter() - start
        held = filler.instances
        filler.close()
        index = Index(target.url)
        s = samples(index)
        index.close()
        size_bytes = target.size_bytes()
        print(f"checkpoint {held:,} instances ({size_bytes / 1e9:.1f} GB): {s}", flush=True)
        entry = {"instances": held, "fill_s": round(filled_s), "index_bytes": size_bytes, "samples": s}
        entry["in_process"] = in_process(target.url, s, args.repeats)
        if not args.skip_served:
            entry["served"] = served(target.data_dir, work, s, args.repeats, (target.empty_config(work), target.config))
        results[str(size)] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=int))  # PostgreSQL sums are Decimal
    if target.kind != "sqlite":
        return  # PostgreSQL ingest, next to Orthanc's plugin: bench/bench_postgres.py
    last = results[str(sizes[-1])]
    path = target.data_dir / "index.sqlite"
    if not args.skip_ingest:
        last["index_writes"] = index_writes(path, work, 500)
        last["ingest_ct"] = ingest(target.data_dir, work)
    if not args.skip_orthanc:
        last["orthanc"] = orthanc(work, target.data_dir, last["samples"], args.orthanc_count, args.repeats)
    args.out.write_text(json.dumps(results, indent=1, default=int))  # PostgreSQL sums are Decimal


if __name__ == "__main__":
    main()
