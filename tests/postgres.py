"""A throw-away PostgreSQL cluster for the tests and benchmarks: Debian's server, a temp folder, a free port.

``initdb`` into a new folder (as the ``postgres`` user when we are root: PostgreSQL refuses to
run as root), ``pg_ctl start`` on a free loopback port with its socket in that folder, trust
authentication for the ``macpacs`` role. The cluster's collation is a language's
(``en_US.UTF-8`` when the machine has it), as on most real servers: the index must not depend on
a byte-wise database collation (``pacs_server/index/column_types.py``).

``new_database()`` gives each test its own database, a copy of a template migrated once, so a
test costs one ``CREATE DATABASE`` rather than a migration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def _server_bin() -> Path:
    """Debian's newest PostgreSQL server (``/usr/lib/postgresql/<major>/bin``), or MACPACS_TEST_PG_BIN."""
    if os.environ.get("MACPACS_TEST_PG_BIN"):
        return Path(os.environ["MACPACS_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _server_bin()
ROLE = "macpacs"
TEMPLATE = "macpacs_template"
# Fast and not durable (a test's data lives seconds); benchmarks ask for the server's defaults.
FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


def missing_binaries() -> str | None:
    """Why no cluster can be started here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL's {PG_BIN}/initdb is missing: apt-get install -y postgresql (.ci/run does this)"
    return None


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


class Cluster:
    """One running PostgreSQL server; ``stop``/``start`` restart it on the same port and data."""

    def __init__(
        self,
        *,
        durable: bool = False,
        max_connections: int = 200,
        folder: Path | None = None,
        settings: tuple[str, ...] = (),
    ) -> None:
        """A new cluster in a temp folder; or, given ``folder``, the one kept there (made on first use:
        a benchmark's filled index outlives its run). ``settings`` are more ``name=value`` options."""
        self.folder = folder or Path(tempfile.mkdtemp(prefix="macpacs-pg-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data = self.folder / "data"
        self.port = _free_port()
        self.log = self.folder / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the package's user
            shutil.chown(self.folder, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._options = [
            "-p",
            str(self.port),
            "-k",
            str(self.folder),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"max_connections={max_connections}",
            *(() if durable else FAST),
            *(option for setting in settings for option in ("-c", setting)),
        ]
        if not (self.data / "PG_VERSION").exists():
            locale = ["--locale=en_US.UTF-8"] if _has_locale("en_US.utf8") else []
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", ROLE, "-E", "UTF8", *locale)
        self._databases = 0
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*self._as_user, str(PG_BIN / tool), *args], capture_output=True, text=True, timeout=120, cwd=self.folder
        )
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}{log}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", " ".join(self._options), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session (as a restart by an administrator does); ``immediate`` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def new_database(self, *, migrated: bool = True) -> str:
        """The URL of a fresh database holding the migrated, empty index schema (or nothing)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as conn:
            if self._databases == 0:
                from macpacs.pacs_server.index import Index

                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
                template = Index(self.url(TEMPLATE))
                try:
                    template.migrate()
                finally:
                    template.close()
            self._databases += 1
            name = f"test_{self._databases}"
            template = sql.Identifier(TEMPLATE if migrated else "template0")
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), template))
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def _has_locale(name: str) -> bool:
    try:
        found = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return name in found
