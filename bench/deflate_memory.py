"""Memory of the server while it receives a deflate bomb: a 308 KB C-STORE whose dataset inflates
to 314 MB (600 zero frames of 512 x 512 x 2 bytes), sent by DCMTK ``storescu -xd``.

Prints, for ``storage.max_inflated_mb`` at its default (2048: stored) and at 128 (refused), the
growth of the server's RSS (psutil, sampled every 10 ms; ``dicom.workers = 1`` so that the
server is one process), and, for comparison, what reading the header of the same file costs a
process with pydicom's own reader (what ingest did before: it inflates the dataset whole) and
with ingest's ``read_instance`` now.

Usage: python bench/deflate_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess, free_port, run_tool  # noqa: E402
from tests.core.test_deflate import FRAMES, PeakRss, write_deflated  # noqa: E402

# RSS growth of a fresh process reading the header of argv[2] with argv[1] ("pydicom" or "ingest").
READ = """
import resource, sys
from pathlib import Path
import pydicom
from macpacs.pacs_server.ingest import read_instance
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "pydicom":
    pydicom.dcmread(sys.argv[2], stop_before_pixels=True)
else:
    read_instance(Path(sys.argv[2]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        bomb = root / "bomb.dcm"
        write_deflated(bomb, FRAMES)
        print(f"file: {bomb.stat().st_size / 1024:.0f} KB, inflating to {FRAMES * 512 * 512 * 2 / 1e6:.0f} MB")
        for reader in ("pydicom", "ingest"):
            grown = subprocess.run([sys.executable, "-c", READ, reader, str(bomb)], capture_output=True, text=True)
            print(f"header read by {reader}: peak RSS +{float(grown.stdout):.0f} MB")
        for limit in ("2048", "128"):
            server = ServerProcess(
                data_dir=root / f"data-{limit}",
                dicom_port=free_port(),
                web_port=free_port(),
                xmlrpc_port=free_port(),
                env={"MACPACS_DICOM_WORKERS": "1", "MACPACS_STORAGE_MAX_INFLATED_MB": limit},
            )
            server.start()
            try:
                with PeakRss(server.proc.pid) as rss:
                    sent = run_tool("storescu", "-v", "-xd", *server.dicom_args(), str(bomb), check=False)
                refused = "Refused: OutOfResources" in sent.stdout + sent.stderr
                print(
                    f"server, max_inflated_mb = {limit}: RSS {rss.before / 2**20:.0f} -> {rss.peak / 2**20:.0f} MB "
                    f"(+{rss.growth_mb:.0f} MB), {'refused (0xA700)' if refused else 'stored'}"
                )
            finally:
                server.stop()


if __name__ == "__main__":
    main()
