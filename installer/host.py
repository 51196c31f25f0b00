"""The host as the install steps see it: the command seam, files under an optional root, probes.

Paths given to :class:`Host` are the *final* paths (``/usr/local/macpacs``, ``/etc/kcpassword``);
with ``--root DIR`` they are written under DIR (like ``DESTDIR`` for packaging and tests), and the
content of every file still names the final paths.

In a dry run nothing is written: each file is printed with its mode, owner and content, in order
with the commands (a secret file is described, never shown).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import shutil
import socket
import ssl
import stat
import tempfile
import time
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path

from .system import System


class Host:
    """Files, ownership and probes of the machine being installed, through one System."""

    def __init__(self, system: System, *, root: Path | None = None, is_root: bool = True) -> None:
        self.system = system
        self.root = root
        self.is_root = is_root

    # -- output ---------------------------------------------------------------------------
    @property
    def dry_run(self) -> bool:
        return self.system.dry_run

    def say(self, text: str) -> None:
        self.system.out(self.system.mask(text))

    def run(self, argv: list[str], input: str | None = None, **kwargs: object):  # -> Result
        return self.system.run(argv, input, **kwargs)  # type: ignore[arg-type]

    # -- paths ----------------------------------------------------------------------------
    def real(self, path: Path) -> Path:
        """Where a final path lives on this machine (under --root when given)."""
        path = Path(path)
        if self.root is None:
            return path
        return self.root / path.relative_to(path.anchor)

    def exists(self, path: Path) -> bool:
        return self.real(path).exists()

    def read_bytes(self, path: Path) -> bytes | None:
        try:
            return self.real(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_text(self, path: Path) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", "replace")

    def owner_mode(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = self.real(path).stat()
        except FileNotFoundError:
            return None
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    # -- changes --------------------------------------------------------------------------
    def write(
        self,
        path: Path,
        content: bytes | str,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] | None = None,
        secret: bool = False,
        quiet: bool = False,
    ) -> None:
        """Write a file atomically (temporary file, fsync, rename) with its mode and owner.

        ``quiet``: the installer's own bookkeeping (the state file), not announced.
        """
        data = content.encode("utf-8") if isinstance(content, str) else content
        who = f", owner {owner[0]}:{owner[1]}" if owner else ""
        if self.dry_run:
            self.say(f"    > write {path} (mode {mode:04o}{who}):")
            if secret:
                self.say("      <derived from the password: not shown>")
            else:
                for line in data.decode("utf-8").splitlines():
                    self.say(f"      | {line}".rstrip())
            return
        if not quiet:
            self.say(f"    > wrote {path} (mode {mode:04o}{who})")
        real = self.real(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", dir=real.parent)
        try:
            os.fchmod(fd, mode)
            self._chown(fd, owner)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def mkdir(self, path: Path, *, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
        who = f", owner {owner[0]}:{owner[1]}" if owner else ""
        self.say(f"    > mkdir {path} (mode {mode:04o}{who})")
        if self.dry_run:
            return
        real = self.real(path)
        real.mkdir(parents=True, exist_ok=True)
        os.chmod(real, mode)
        if owner is not None and self.is_root:
            os.chown(real, *owner)

    def remove(self, path: Path) -> None:
        self.say(f"    > remove {path}")
        if not self.dry_run:
            with contextlib.suppress(FileNotFoundError):
                self.real(path).unlink()

    def remove_tree(self, path: Path) -> None:
        self.say(f"    > remove folder {path} and everything in it")
        if not self.dry_run:
            shutil.rmtree(self.real(path), ignore_errors=True)

    def _chown(self, fd: int, owner: tuple[int, int] | None) -> None:
        # Without root (packaging into --root as a normal user) ownership is left to the packager.
        if owner is not None and self.is_root:
            os.fchown(fd, *owner)

    # -- probes (not commands: the standard library answers them) -------------------------
    def port_free(self, port: int) -> bool:
        """Whether a TCP port can be bound on all interfaces, as the server will bind it."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return False
        return True

    def existing_ancestor(self, path: Path) -> Path:
        real = self.real(path)
        while not real.exists() and real != real.parent:
            real = real.parent
        return real

    def disk_free(self, path: Path) -> int:
        """Free bytes on the volume that holds (or will hold) ``path``."""
        return shutil.disk_usage(self.existing_ancestor(path)).free

    def writable(self, path: Path) -> str | None:
        """None when ``path`` (or the folder it will be created in) takes writes, else why not.

        Root passes every permission check, so this actually writes a probe file; a read-only
        volume answers EROFS whoever asks.
        """
        where = self.existing_ancestor(path)
        if not where.is_dir():
            return f"{where} is not a folder"
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            return f"{where} is on a read-only volume"
        try:
            fd, probe = tempfile.mkstemp(prefix=".macpacs-write-test.", dir=where)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return f"{where} is on a read-only volume"
            return f"cannot write in {where}: {exc.strerror}"
        os.close(fd)
        os.unlink(probe)
        return None

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str] | None:
        """(status, body) of a GET, or None when nothing answers. Proxies are ignored: loopback only.

        Over HTTPS the certificate is not checked: this asks our own server on 127.0.0.1 whether
        it answers (``doctor`` checks the certificate itself, installer/certificate.py).
        """
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=unchecked)
        )
        try:
            with opener.open(url, timeout=timeout) as resp:
                return resp.status, resp.read(4096).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (OSError, ValueError):
            return None

    def xmlrpc_probe(self, url: str, timeout: float = 5.0, ca_file: str | None = None) -> str | None:
        """None when the OsiriX XML-RPC server answers the side-effect-free probe, else why not.

        The probe is the supervisor's: ``DBWindowFind`` on ``Study`` matching nothing. Over https
        it trusts ``ca_file`` as the supervisor's ``--ca-file`` does (the certificate itself is an
        anchor, whoever signed it), so that a certificate the supervisor would refuse fails here.
        """
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.real(Path(ca_file))) if ca_file else None)
            if ca_file:
                context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        transport = _TimeoutTransport(timeout, context)
        proxy = xmlrpc.client.ServerProxy(url, transport=transport)
        try:
            reply = proxy.DBWindowFind({"request": 'patientID == "__macpacs_doctor__"', "table": "Study"})
        except ssl.SSLCertVerificationError as exc:
            return f"its certificate is not the one the supervisor trusts ({ca_file}): {exc.verify_message}"
        except (OSError, xmlrpc.client.Error) as exc:
            return str(exc) or type(exc).__name__
        if isinstance(reply, dict) and str(reply.get("error")) == "0":
            return None
        return f"unexpected reply {reply!r:.200}"

    def primary_ip(self) -> str:
        """The address other machines reach this one at (a UDP connect sends no packet)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(("192.0.2.1", 9))  # TEST-NET-1: routing decision only
                return sock.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    def hostname(self) -> str:
        return socket.gethostname()


class _TimeoutTransport(xmlrpc.client.Transport):
    """http, or https with ``context``; with a timeout."""

    def __init__(self, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._timeout = timeout
        self._context = context

    def make_connection(self, host):  # type: ignore[no-untyped-def]
        if self._context is None:
            conn = super().make_connection(host)
            conn.timeout = self._timeout
            return conn
        chost, self._extra_headers, _x509 = self.get_host_info(host)
        self._connection = host, http.client.HTTPSConnection(chost, timeout=self._timeout, context=self._context)
        return self._connection[1]
