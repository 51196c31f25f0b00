"""Health probes: /testdbalive over HTTP, OsiriX XML-RPC ``DBWindowFind``, an optional C-ECHO, and
the server's heartbeat (``GET /heartbeat``: the server's own account of its parts, see core.py).

A hung server is exactly what we watch for, so no probe is trusted to return on time. Each round
runs the probes concurrently in worker threads and stops waiting at a hard deadline. A probe still
stuck from an earlier round is not started again (it is reported failed), so at most one thread
per probe can ever be blocked: stuck threads never accumulate, however long the server hangs.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
import xmlrpc.client
from dataclasses import asdict, dataclass
from typing import Any

import requests

HEALTHY_BODY = "Test DB Alive succeeded"
# A predicate that matches no study, so the XML-RPC probe has no side effect.
XMLRPC_PARAMS = {"request": 'studyInstanceUID == "macpacs-supervisor-probe"', "table": "Study"}


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    ok: bool
    detail: str
    elapsed_ms: int
    # Failed for want of an answer in time (a busy server looks the same), not on a wrong answer.
    timed_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Probe:
    """One named check; ``check`` returns a short detail on success and raises on failure."""

    name = "probe"

    def check(self, timeout: float) -> str:
        raise NotImplementedError


class HttpProbe(Probe):
    """GET /testdbalive: healthy only on status 200 and the body OsiriX sends."""

    name = "web"

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        # A proxy from the environment must never stand between a watchdog and a loopback server.
        self.session.trust_env = False
        self.session.verify = ca_file or True  # https: a self-signed server certificate (--ca-file)

    def check(self, timeout: float) -> str:
        response = self.session.get(self.url, timeout=timeout, allow_redirects=False)
        # No connection kept for the next round: the installed interval (5 s) is uvicorn's keep-alive
        # time-out, so the server may close a kept connection just as the next probe goes out, and
        # that reset would count against a healthy server.
        self.session.close()
        body = response.text[:200]
        if response.status_code != 200:
            raise ProbeFailed(f"HTTP {response.status_code}: {body!r}")
        # Surrounding whitespace is tolerated; any other body is not the healthy answer.
        if body.strip() != HEALTHY_BODY:
            raise ProbeFailed(f"HTTP 200 with unexpected body {body!r}")
        return "HTTP 200"


class HeartbeatProbe(Probe):
    """GET /heartbeat: healthy on 200 and ``"ok": true``; keeps the last answer (free space, PID)."""

    name = "heartbeat"

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = ca_file or True
        self.answer: dict[str, Any] = {}

    def check(self, timeout: float) -> str:
        response = self.session.get(self.url, timeout=timeout, allow_redirects=False)
        try:
            answer = response.json()
        except ValueError:
            raise ProbeFailed(f"HTTP {response.status_code}, not a heartbeat: {response.text[:200]!r}") from None
        if not isinstance(answer, dict):
            raise ProbeFailed(f"HTTP {response.status_code}: not a heartbeat: {answer!r:.200}")
        self.answer = answer
        if response.status_code != 200 or answer.get("ok") is not True:
            stale = "; ".join(str(part) for part in answer.get("stale") or []) or "no reason given"
            raise ProbeFailed(f"HTTP {response.status_code}: the server reports {stale}")
        return f"HTTP 200, PID {answer.get('pid')}"


class _TimeoutTransport(xmlrpc.client.Transport):
    """xmlrpc.client's transport has no timeout; a hung server would block it forever.

    ``secure``: https, trusting ``ca_file`` (the server's own certificate, or its CA) when given,
    else the system's CAs. A certificate given is trusted as an anchor even when it is not a CA's
    (a hospital-issued server certificate, say), and its names are checked against the URL's.
    """

    def __init__(self, timeout: float, secure: bool, ca_file: str | None = None) -> None:
        super().__init__()
        self.timeout = timeout
        self.secure = secure
        self.context = ssl.create_default_context(cafile=ca_file) if secure else None
        if self.context is not None and ca_file:
            self.context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self.secure:
            chost, self._extra_headers, _x509 = self.get_host_info(host)
            self._connection = host, http.client.HTTPSConnection(chost, timeout=self.timeout, context=self.context)
            return self._connection[1]
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


class XmlRpcProbe(Probe):
    """``DBWindowFind`` on Study with a predicate matching nothing: expects ``{error: "0"}``.

    An ``https://`` URL (the server's ``xmlrpc.tls``) trusts ``ca_file``; a certificate it does not
    trust, or a port that does not speak TLS, fails with a line saying which and what to change.
    """

    name = "xmlrpc"

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        self.url = url
        self.ca_file = ca_file

    def check(self, timeout: float) -> str:
        transport = _TimeoutTransport(timeout, secure=self.url.startswith("https:"), ca_file=self.ca_file)
        proxy = xmlrpc.client.ServerProxy(self.url, transport=transport)
        try:
            reply = proxy.DBWindowFind(XMLRPC_PARAMS)
        except ssl.SSLCertVerificationError as exc:
            trusted = f"--ca-file {self.ca_file}" if self.ca_file else "the system's CAs (no --ca-file)"
            raise ProbeFailed(
                f"TLS: the XML-RPC server's certificate is not trusted by {trusted}: {exc.verify_message}; "
                "give --ca-file the certificate the server serves (its web.tls_cert) or the CA that signed it"
            ) from None
        except ssl.SSLError as exc:
            raise ProbeFailed(
                f"TLS with the XML-RPC port failed ({exc}): is xmlrpc.tls on in the server's config? "
                "If not, probe it with an http:// URL"
            ) from None
        except xmlrpc.client.Fault as exc:
            raise ProbeFailed(f"XML-RPC fault {exc.faultCode}: {exc.faultString}") from None
        except xmlrpc.client.ProtocolError as exc:
            raise ProbeFailed(f"HTTP {exc.errcode} {exc.errmsg}") from None
        finally:
            transport.close()
        if not isinstance(reply, dict) or str(reply.get("error")) != "0":
            raise ProbeFailed(f"DBWindowFind answered {reply!r:.200}")
        return 'error "0"'


class EchoProbe(Probe):
    """C-ECHO: proves the DICOM listener still accepts and answers an association."""

    name = "dicom"

    def __init__(self, host: str, port: int, ae_title: str, calling_ae: str = "MACPACS-SUP") -> None:
        self.host, self.port, self.ae_title, self.calling_ae = host, port, ae_title, calling_ae
        # pynetdicom logs every association at INFO; one probe per round would flood the log.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def check(self, timeout: float) -> str:
        from pynetdicom import AE  # imported lazily: costly, and only needed with --dicom
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise ProbeFailed(f"association with {self.ae_title}@{self.host}:{self.port} not established")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code != 0:
            raise ProbeFailed(f"C-ECHO status {code!r}")
        return "C-ECHO 0x0000"


class ProbeFailed(Exception):
    """A probe got an answer, and the answer is not the healthy one."""


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error: requests wraps a refused connection three layers deep."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or getattr(exc, "reason", None) or exc.__context__
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProbeFailed):
        return str(exc)
    if isinstance(exc, requests.Timeout | TimeoutError):
        return f"timed out: {type(exc).__name__}"
    root = _root_cause(exc)
    if isinstance(root, OSError) and root.strerror:
        return f"{root.strerror.lower()} ({type(root).__name__})"
    return f"{type(root).__name__}: {root}"[:300]


class ProbeRunner:
    """Runs every probe concurrently with one hard deadline; never blocks past it."""

    def __init__(self, probes: list[Probe], timeout: float) -> None:
        self.probes = probes
        self.timeout = timeout
        self._busy: dict[str, threading.Thread] = {}

    def run_round(self) -> list[ProbeResult]:
        start = time.monotonic()
        deadline = start + self.timeout
        slots: dict[str, list[ProbeResult]] = {}
        for probe in self.probes:
            previous = self._busy.get(probe.name)
            if previous is not None and previous.is_alive():
                continue  # still stuck in an earlier round: reported below, not started twice
            slot: list[ProbeResult] = []
            thread = threading.Thread(
                target=self._run_one, args=(probe, slot, start), name=f"probe-{probe.name}", daemon=True
            )
            slots[probe.name] = slot
            self._busy[probe.name] = thread
            thread.start()
        results = []
        for probe in self.probes:
            thread = self._busy[probe.name]
            if probe.name not in slots:
                results.append(ProbeResult(probe.name, False, "previous probe still hung", 0, timed_out=True))
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            slot = slots[probe.name]
            if slot:
                results.append(slot[0])
            else:
                elapsed = int((time.monotonic() - start) * 1000)
                results.append(
                    ProbeResult(probe.name, False, f"no answer within {self.timeout:g} s", elapsed, timed_out=True)
                )
        return results

    def _run_one(self, probe: Probe, slot: list[ProbeResult], start: float) -> None:
        # Socket timeouts a little under the deadline: an ordinary hang reports "timed out" and
        # the thread ends; the deadline in run_round is the backstop for what they cannot catch.
        timed_out = False
        try:
            ok, detail = True, probe.check(self.timeout * 0.9)
        except Exception as exc:
            ok, detail = False, _describe(exc)
            # A failure that took the whole time allowed (an association that timed out, say) is
            # a want of an answer too, whatever the library called it.
            timed_out = isinstance(exc, requests.Timeout | TimeoutError) or (
                time.monotonic() - start >= self.timeout * 0.85
            )
        slot.append(ProbeResult(probe.name, ok, detail, int((time.monotonic() - start) * 1000), timed_out))


def build_probes(
    web_url: str | None, xmlrpc_url: str | None, dicom: str | None, *, ca_file: str | None = None
) -> list[Probe]:
    """Probes for the URLs given on the command line; ``dicom`` is ``HOST:PORT:AET``."""
    probes: list[Probe] = []
    if web_url:
        probes.append(HttpProbe(web_url, ca_file))
    if xmlrpc_url:
        probes.append(XmlRpcProbe(xmlrpc_url, ca_file))
    if dicom:
        host, port, aet = parse_dicom(dicom)
        probes.append(EchoProbe(host, port, aet))
    return probes


def parse_dicom(value: str) -> tuple[str, int, str]:
    """``HOST:PORT:AET`` → parts; raises ValueError with a message fit for the command line."""
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit():
        raise ValueError(f"--dicom expects HOST:PORT:AET, got {value!r}")
    return parts[0], int(parts[1]), parts[2]
