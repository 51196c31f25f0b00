"""Issue 17 benchmark: ``macpacs migrate`` of a SQLite-plus-files archive onto PostgreSQL and
SeaweedFS's S3 gateway, next to a plain upload of the same files in the same run.

Run:  .venv/bin/python bench/bench_migrate.py [--ct 200] [--small 1000] [--jobs 4] [--out bench/results/migrate.json]

The source archive is ``macpacs import`` of ``--ct`` CT slices (512×512 int16, ~525 KB) and
``--small`` 64×64 instances (~10 KB), made once per run (not timed). One durable PostgreSQL
cluster (tests/postgres.py) and one SeaweedFS gateway (tests/s3gateway.py) on loopback, on the
disk of the archive. Measured, each into an empty database and prefix:
- "upload": boto3's S3Transfer (as the S3 store uses) uploading the archive's files with
  ``--jobs`` threads: what any copy of these bytes costs, the reference;
- "migrate": ``macpacs migrate --jobs N``, which also reads every file back and hashes it twice
  (its dataset hash against the index, SHA-256 of the copy read back) and copies every row;
- "again": the same command once more with nothing to copy: the cost of the final check
  (every row of both sides compared) that a catch-up run pays.
This machine has 2 cores shared by PostgreSQL, the gateway and the command, so the figures
include the servers' CPU; the ratio to "upload" is what carries over, and the command's own CPU
per instance (``migrate_cpu_ms_per_instance``) sizes a larger migration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, MACPACS, ct_series, small_instances
from tests.postgres import Cluster
from tests.s3gateway import Gateway

WORK = DATA / "work-migrate"


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock seconds, and the CPU seconds of the command itself (not of the servers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{done.stdout}\n{done.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def upload(gateway: Gateway, files: list[Path], root: Path, bucket: str, prefix: str, jobs: int) -> float:
    from boto3.s3.transfer import S3Transfer, TransferConfig

    client = gateway.client()
    transfer = S3Transfer(client, TransferConfig(multipart_threshold=64 << 20, max_concurrency=4))
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda p: transfer.upload_file(str(p), bucket, prefix + str(p.relative_to(root))), files))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    source = WORK / "archive"
    env = {**os.environ}
    for folder in (ct_series(args.ct), small_instances(args.small)):
        run([MACPACS, "import", "--data-dir", str(source), str(folder)], env)
    files = sorted((source / "files").rglob("*.dcm"))
    size = sum(p.stat().st_size for p in files)
    print(f"archive: {len(files)} instances, {size / 1e6:.0f} MB")

    cluster = Cluster(durable=True)
    gateway = Gateway(WORK / "weed").start()
    try:
        bucket = gateway.bucket("bench")
        env |= gateway.env()
        figures: dict[str, float] = {}
        figures["upload_s"] = upload(
            gateway, files, source / "files", bucket, f"upload-{uuid.uuid4().hex[:8]}/", args.jobs
        )
        argv = [MACPACS, "migrate", "--data-dir", str(source), "--index", cluster.new_database(migrated=False),
                "--storage", f"s3://{bucket}/migrate", "--jobs", str(args.jobs)]  # fmt: skip
        figures["migrate_s"], figures["migrate_cpu_s"] = run(argv, env)
        figures["again_s"], figures["again_cpu_s"] = run(argv, env)
    finally:
        gateway.stop()
        cluster.destroy()
    result = {
        "instances": len(files),
        "megabytes": round(size / 1e6, 1),
        "jobs": args.jobs,
        **{k: round(v, 2) for k, v in figures.items()},
        "upload_MB_s": round(size / 1e6 / figures["upload_s"], 1),
        "migrate_MB_s": round(size / 1e6 / figures["migrate_s"], 1),
        "migrate_instances_s": round(len(files) / figures["migrate_s"], 1),
        "migrate_vs_upload": round(figures["upload_s"] / figures["migrate_s"], 2),
        "migrate_cpu_ms_per_instance": round(1000 * figures["migrate_cpu_s"] / len(files), 1),
        "again_instances_s": round(len(files) / figures["again_s"], 1),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
