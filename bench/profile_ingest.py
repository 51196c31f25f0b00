"""Where a C-STORE's CPU goes: CPU per instance of each macpacs process, and a py-spy profile.

Issue 17 asks where the CPU per instance goes before anything is removed. This starts
``macpacs serve`` (defaults: DICOM worker processes), sends the synthetic small instances (or
the CT slices) with DCMTK ``storescu`` after a warm-up, and reports:

- instances per second, and per process (main, each worker) the user and system CPU per
  instance, from psutil before and after the timed run;
- with ``--py-spy`` (``pip install py-spy``; not a dependency of macpacs): a sampling profile of
  every process taken during the timed run, with ``--gil`` so that only Python code holding the
  GIL counts (the CPU the interpreter spends, not the waits in fsync), as the functions that
  take most of it, self and inclusive, in ms per instance.

Run:
    .venv/bin/python bench/profile_ingest.py [--count 3000] [--associations 1] [--ct] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Macpacs, ct_series, send_parallel, server_processes, small_instances, split

SAMPLE_HZ = 250


def _profile(files: list[Path], instances: int, top: int) -> None:
    """Self and inclusive GIL-holding time per instance, over every process's samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for file in files:
        for line in file.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    per_instance = 1000 / SAMPLE_HZ / instances
    total = sum(own.values())
    print(f"\nPython holding the GIL: {total * per_instance:.2f} ms per instance")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"-- {title}, ms per instance")
        for frame, count in counter.most_common(top):
            print(f"{count * per_instance:7.3f}  {frame[:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--ct", action="store_true", help="the 525 KB CT slices instead of the 10 KB instances")
    parser.add_argument("--py-spy", action="store_true", help="also profile with py-spy (--gil)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    folder = ct_series(1000) if args.ct else small_instances(5000)
    lists = [part[: args.count // args.associations] for part in split(folder, args.associations)]
    instances = sum(len(part) for part in lists)
    work = Path(tempfile.mkdtemp(prefix="profile-ingest-"))
    receiver = Macpacs(work / "macpacs").start()
    spies: list[subprocess.Popen[bytes]] = []
    try:
        send_parallel(receiver.port, receiver.aet, [part[:50] for part in lists])  # warm-up, not timed
        assert receiver.proc is not None
        processes = server_processes(receiver.proc.pid)
        if args.py_spy:
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            for n, process in enumerate(processes):
                out = work / f"spy-{n}.txt"
                argv = [spy, "record", "-p", str(process.pid), "-r", str(SAMPLE_HZ), "-f", "raw", "-o", str(out)]
                spies.append(subprocess.Popen([*argv, "--nonblocking", "--gil"], stdout=subprocess.DEVNULL))
            time.sleep(1.0)  # py-spy attached
        before = {p.pid: p.cpu_times() for p in processes}
        seconds = send_parallel(receiver.port, receiver.aet, lists)
        after = {p.pid: p.cpu_times() for p in processes}
    finally:
        for spy_process in spies:
            spy_process.send_signal(2)  # py-spy writes its file on SIGINT
            spy_process.wait()
        receiver.stop()
    kind = "CT slices" if args.ct else "small instances"
    print(f"{instances} {kind} on {args.associations} association(s): {instances / seconds:.0f} inst/s")
    for n, pid in enumerate(before):
        user = (after[pid].user - before[pid].user) * 1000 / instances
        system = (after[pid].system - before[pid].system) * 1000 / instances
        print(f"  {'main' if n == 0 else f'worker {n}'}: user {user:.2f} + system {system:.2f} ms per instance")
    if spies:
        _profile(sorted(work.glob("spy-*.txt")), instances, args.top)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
