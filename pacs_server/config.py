"""Settings: one TOML file, then environment overrides, then command-line flags.

Every setting has an embedded default that matches what an OsiriX site expects, so that
``macpacs serve`` with no file at all starts a working archive in ``./macpacs-data``.

Environment overrides are named ``MACPACS_<SECTION>_<KEY>`` in upper case, for example
``MACPACS_DICOM_PORT=11113`` or ``MACPACS_STORAGE_DATA_DIR=/Volumes/RAID/macpacs``.
The installer imports this module to write a configuration that the server will accept.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .audit import parse_syslog_target
from .storage.base import parse_s3_url

# Each DICOM worker costs ~100 MB (Python, pynetdicom, its own SQLite cache): beyond this many,
# an automatic count would cost memory for little gain (more can be set explicitly).
MAX_AUTO_WORKERS = 8
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: no backslash, 1..16 chars
# A DNS name: labels of letters, digits and inner hyphens (an IPv4 address is one too).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# SQLAlchemy URL schemes of the index databases macpacs runs on (index/db.py).
SUPPORTED_INDEX_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a host name or an IP address as it appears in a Host header (no port)."""
    if HOST_NAME_RE.fullmatch(text):
        return True
    try:
        ipaddress.IPv6Address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it and says why."""


@dataclass
class DicomSettings:
    """The DICOM listener."""

    ae_title: str = "MACPACS"
    port: int = 11112
    bind: str = "0.0.0.0"
    max_associations: int = 100
    # Seconds without traffic before an association is aborted (pynetdicom's network timeout).
    network_timeout: float = 60.0
    # Seconds to wait for a reply from a peer when we are the client (C-ECHO, C-STORE, ...).
    client_timeout: float = 30.0
    # Reject associations whose called AE title is not ours, unless this is true.
    accept_any_called_ae: bool = False
    # First install: accept associations from peers that are not registered nodes.
    accept_unknown_nodes: bool = True
    # Match PN attributes (PatientName, ReferringPhysicianName) without regard to case.
    case_insensitive_names: bool = True
    # Largest number of matches one C-FIND returns before it stops (0: no limit).
    max_find_results: int = 0
    # Longest sleep of pynetdicom's reactor threads, in ms (they wake on work): dimse/pynetdicom_ext.py.
    reactor_poll_ms: float = 1.0
    # Processes serving DICOM associations (pynetdicom serves one process's associations under
    # one GIL): 0 = one per CPU core, at most MAX_AUTO_WORKERS; 1 = inside the main process.
    workers: int = 0
    # Seconds from TCP accept (and TLS handshake) to the A-ASSOCIATE-RQ; a connection still silent
    # then is closed. At most max_associations connections wait at once (the oldest is closed).
    pre_association_timeout: float = 10.0
    # Connections from one IP address at once (waiting or associated); more are rejected.
    max_associations_per_peer: int = 20
    # DICOM over TLS on a second port (PS3.15 B.1), on once tls_cert and tls_key are set (PEM).
    tls_port: int = 2762
    tls_cert: str = ""
    tls_key: str = ""
    # CA certificates (PEM) that client certificates are verified against; empty: none asked for.
    tls_ca: str = ""
    # With tls_ca: refuse a TLS client that presents no certificate signed by one of them.
    tls_require_client_cert: bool = False

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def worker_count(self) -> int:
        """How many DICOM worker processes ``workers`` means on this machine (1: none, in-process)."""
        if self.workers > 0:
            return self.workers
        return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))


@dataclass
class StorageSettings:
    """Where files and the index live."""

    data_dir: str = "./macpacs-data"
    # Where instance files go: empty for the files folder in data_dir, or an object store,
    # "s3://bucket" or "s3://bucket/prefix" (its endpoint and credentials in [s3]).
    url: str = ""
    # The former name of index.url, still read (index.url wins when both are set).
    index_url: str = ""
    # What a re-sent instance with the same SOP Instance UID but different content does:
    # "keep" keeps the stored file and acknowledges with a warning, "overwrite" replaces it.
    on_conflict: str = "keep"
    # Refuse stores (out of resources) when free space on the data volume falls below this.
    min_free_mb: int = 500
    # A deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) inflating beyond this is refused
    # (0xA700): a few hundred KB can inflate to gigabytes. Above the largest real objects (a
    # tomosynthesis or enhanced multi-frame series, 0.5 to 1.5 GB uncompressed); docs/reliability.md.
    max_inflated_mb: int = 2048
    # A study is stable once no instance arrived for this many seconds (the study_stable hook:
    # routing and webhooks on stable studies; pacs_server/stable.py).
    stable_after: float = 60.0


@dataclass
class IndexSettings:
    """The index database (docs/postgresql.md): SQLite in ``data_dir`` unless ``url`` names another."""

    # SQLAlchemy URL: empty for the SQLite file ``index.sqlite`` in storage.data_dir, or
    # "postgresql://user:password@host:5432/macpacs" (psycopg 3: pip install 'macpacs[postgresql]').
    url: str = ""
    # Connections each process keeps open (the server runs dicom.workers + 1 processes); up to
    # 10 more are opened for a burst and closed after it.
    pool_size: int = 20
    # PostgreSQL: a statement still running after this many seconds is cancelled, and the C-STORE,
    # C-FIND or HTTP request it served fails cleanly (0xA700, 503) instead of hanging.
    statement_timeout: float = 30.0
    # PostgreSQL: seconds to wait for the server to accept a new connection (down or unreachable).
    connect_timeout: float = 10.0
    # SQLite: page cache of each pooled connection, in MB. Each connection keeps its own copy of
    # the pages it read, so a process may hold up to pool_size x this much; the OS page cache holds
    # the index file once for every connection and process (docs/reliability.md, "Soak").
    sqlite_cache_mb: int = 8


@dataclass
class S3Settings:
    """The object store of ``storage.url = "s3://..."`` (docs/archive.md, "Object storage").

    An empty value defers to boto3's own lookup: the standard variables ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_CA_BUNDLE``, then
    ``~/.aws``. The secret never appears in a log line, an error or this object's repr.
    """

    endpoint: str = ""  # e.g. "https://s3.example.org:9000"
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    verify_tls: bool = True  # false: certificates not checked (a test gateway only)
    ca_bundle: str = ""  # PEM file of the CA that signed the store's certificate
    addressing_style: str = "path"  # "path" (MinIO, Ceph, SeaweedFS and AWS), "virtual" or "auto"
    attempts: int = 4  # tries of each request (exponential back-off between them) before it fails
    timeout_s: float = 20.0  # to connect (at most 10 s) and for each answer
    cache_mb: int = 2048  # local read cache under data_dir/cache; 0: none


@dataclass
class WebSettings:
    """The embedded web server (WADO, DICOMweb, pages, /testdbalive)."""

    port: int = 3333
    bind: str = "0.0.0.0"
    tls_cert: str = ""
    tls_key: str = ""
    # Reading (DICOMweb, WADO, JSON API) without logging in: "localhost" (only from this
    # machine), "all" or "off". Admin pages always need a login.
    anonymous_read: str = "localhost"
    # Origins allowed to call the web APIs from a browser page elsewhere (CORS); "*" for any.
    cors_origins: list[str] = field(default_factory=list)
    # Largest STOW-RS / upload request body, in MB (HTTP 413 above it): a whole CT or MR study,
    # or one large multi-frame instance; the upload page sends 32 MB batches (docs/security.md).
    max_upload_mb: int = 1024
    # STOW-RS / upload requests received at once; more get 503 with Retry-After.
    max_concurrent_uploads: int = 4
    # How long a browser login lasts at most (absolute), and without any request (idle).
    session_hours: float = 12.0
    session_idle_minutes: float = 60.0
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or
    # networks, e.g. ["127.0.0.1"]). Empty: those headers are ignored, from loopback too, and
    # anonymous reading from this machine (anonymous_read = "localhost") works only then.
    forwarded_allow_ips: list[str] = field(default_factory=list)
    # URL clients use to reach this server when it differs (reverse proxy), e.g.
    # "https://pacs.example.org"; links in DICOMweb answers start with it. Empty: as reached.
    public_url: str = ""


@dataclass
class XmlRpcSettings:
    """The OsiriX-compatible XML-RPC interface on its own port."""

    port: int = 8080
    bind: str = "0.0.0.0"
    enabled: bool = True
    # Addresses allowed to call it besides localhost.
    allowed_hosts: list[str] = field(default_factory=list)
    # Names clients may put in the Host header besides localhost and this machine's own names
    # and addresses (a DNS alias such as "pacs.example.org"). Any other Host is refused, so that
    # a web page cannot reach the port through DNS rebinding.
    allowed_host_names: list[str] = field(default_factory=list)
    # Let the calls that change or stop something (DBWindowFind with Delete, KillOsiriX,
    # Retrieve, CMove) run without credentials from the allowed hosts, for OsiriX clients that
    # cannot send any. Off: they need HTTP Basic with a macpacs user or an API token.
    open_changes: bool = False
    # HTTPS on this port, with the web port's certificate and key (web.tls_cert, web.tls_key):
    # the port then speaks only TLS, and a plain-HTTP request is answered 400 (docs/xmlrpc.md).
    tls: bool = False


@dataclass
class ServerSettings:
    """The process as a whole."""

    # Server mode: no code path ever waits for a person (errors are logged, never asked).
    server_mode: bool = True
    pid_file: str = ""  # empty: ``macpacs.pid`` in data_dir
    log_dir: str = ""  # empty: ``logs`` in data_dir
    log_level: str = "INFO"
    # The watchdog's --status-file (JSON), shown on the web status page; empty: not shown.
    supervisor_status_file: str = ""
    # This node's name in /health (several nodes behind one load balancer, docs/scale-out.md);
    # empty: "<host name>:<DICOM port>".
    node_name: str = ""


@dataclass
class PluginsSettings:
    """Which installed plugins run (docs/plugins.md), and their own settings."""

    # Entry point names in the ``macpacs.plugins`` group, e.g. ["example"].
    enable: list[str] = field(default_factory=list)
    # Each plugin's ``[plugins.<name>]`` table, as written (the plugin checks its own keys).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class AuditSettings:
    """The audit trail (``audit.jsonl`` in the logs folder: pacs_server/audit.py, docs/security.md)."""

    # Also send every record to syslog: "udp://host:514", "tcp://host:601" or "unix:/var/run/syslog".
    syslog: str = ""
    file_mb: int = 20  # rotate the file at this size...
    files: int = 50  # ...keeping this many old ones


@dataclass
class JobsSettings:
    """The persistent job queue (sends, retrieves, routing, webhooks: pacs_server/jobs.py)."""

    # Jobs run at once by the server process (each send holds one association).
    workers: int = 2
    # How much lower than the server the runners' CPU priority is (0-19; 0: the same). Sending
    # competes with ingest for the cores: lowest, a busy ingest keeps its pace and routing uses
    # what is left (on macOS any value above 0 means the "utility" QoS class).
    nice: int = 19
    # A failed attempt is retried after retry_base_s, doubling up to retry_max_s.
    retry_base_s: float = 10.0
    retry_max_s: float = 3600.0
    # After this many failed attempts an alert is logged (once per job); after max_attempts it stops.
    alert_after: int = 5
    max_attempts: int = 50
    # Finished and cancelled jobs are forgotten after this many days.
    keep_days: float = 7.0


@dataclass
class Settings:
    """All settings of one archive process."""

    dicom: DicomSettings = field(default_factory=DicomSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    web: WebSettings = field(default_factory=WebSettings)
    xmlrpc: XmlRpcSettings = field(default_factory=XmlRpcSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    plugins: PluginsSettings = field(default_factory=PluginsSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    # -- derived paths ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def index_url(self) -> str:
        url = self.index.url or self.storage.index_url
        if url:
            return url
        return f"sqlite:///{self.data_dir / 'index.sqlite'}"

    @property
    def pid_file(self) -> Path:
        if self.server.pid_file:
            return Path(self.server.pid_file).expanduser()
        return self.data_dir / "macpacs.pid"

    @property
    def log_dir(self) -> Path:
        return Path(self.server.log_dir).expanduser() if self.server.log_dir else self.data_dir / "logs"

    def validate(self) -> Settings:
        """Raise ConfigError with a message an administrator can act on."""
        if not AE_TITLE_RE.match(self.dicom.ae_title) or not self.dicom.ae_title.strip():
            raise ConfigError(
                f"dicom.ae_title {self.dicom.ae_title!r} is not a valid AE title: "
                "use 1 to 16 printable ASCII characters, no backslash"
            )
        for name, port in (
            ("dicom.port", self.dicom.port),
            ("web.port", self.web.port),
            ("xmlrpc.port", self.xmlrpc.port),
        ):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name} = {port} is not a TCP port (1-65535)")
        ports = [self.dicom.port, self.web.port] + ([self.xmlrpc.port] if self.xmlrpc.enabled else [])
        if len(set(ports)) != len(ports):
            raise ConfigError(f"dicom.port, web.port and xmlrpc.port must differ (got {ports})")
        if self.storage.on_conflict not in ("keep", "overwrite"):
            raise ConfigError(f'storage.on_conflict = {self.storage.on_conflict!r}: use "keep" or "overwrite"')
        if self.dicom.max_associations < 1:
            raise ConfigError("dicom.max_associations must be at least 1")
        _validate_dicom_tls(self)
        if not 0 <= self.dicom.workers <= 256:
            raise ConfigError(
                f"dicom.workers = {self.dicom.workers}: use 0 (one per CPU core), 1 (no worker processes) or up to 256"
            )
        if self.web.anonymous_read not in ("localhost", "all", "off"):
            raise ConfigError(f'web.anonymous_read = {self.web.anonymous_read!r}: use "localhost", "all" or "off"')
        _validate_index(self.index, self.index_url)
        _validate_s3(self)
        if self.storage.stable_after <= 0:
            raise ConfigError("storage.stable_after must be a positive number of seconds (default 60)")
        j = self.jobs
        if not 0 <= j.nice <= 19:
            raise ConfigError(f"jobs.nice = {j.nice}: use 0 (the server's own CPU priority) to 19 (the lowest)")
        if j.workers < 1 or j.alert_after < 1 or j.max_attempts < 1 or j.retry_base_s <= 0 or j.retry_max_s <= 0:
            raise ConfigError(
                "jobs.workers, jobs.alert_after and jobs.max_attempts must be at least 1, and "
                "jobs.retry_base_s and jobs.retry_max_s positive"
            )
        if self.web.max_upload_mb < 1 or self.web.max_concurrent_uploads < 1 or self.storage.max_inflated_mb < 1:
            raise ConfigError(
                "web.max_upload_mb, web.max_concurrent_uploads and storage.max_inflated_mb must be at least 1"
            )
        if bool(self.web.tls_cert) != bool(self.web.tls_key):
            raise ConfigError("web.tls_cert and web.tls_key must be set together")
        if self.xmlrpc.tls and not self.web.tls_cert:
            raise ConfigError(
                "xmlrpc.tls needs web.tls_cert and web.tls_key: the XML-RPC port serves HTTPS with the web "
                "port's certificate (`sudo macpacs install --https` makes one)"
            )
        if self.web.session_hours <= 0 or self.web.session_idle_minutes <= 0:
            raise ConfigError("web.session_hours and web.session_idle_minutes must be positive")
        for entry in self.web.forwarded_allow_ips:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    f"web.forwarded_allow_ips: {entry!r} is not an address or network: list the reverse "
                    'proxies in front of the server, e.g. ["127.0.0.1"] for one on this machine'
                ) from None
        if self.audit.file_mb < 1 or self.audit.files < 1:
            raise ConfigError("audit.file_mb and audit.files must be at least 1")
        if self.audit.syslog:
            try:
                parse_syslog_target(self.audit.syslog)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        for name in self.xmlrpc.allowed_host_names:
            if not is_host_name(name):
                raise ConfigError(
                    f"xmlrpc.allowed_host_names: {name!r} is not a host name or address "
                    '(write it as clients type it, without port or scheme, e.g. "pacs.example.org" or "10.1.2.3")'
                )
        return self


def _validate_index(index: IndexSettings, url: str) -> None:
    """The index URL's kind and the pool and timeout numbers (the database is reached at start)."""
    if url.split(":", 1)[0] not in SUPPORTED_INDEX_SCHEMES:
        raise ConfigError(
            f"index.url {url.split('://', 1)[0]!r}...: use an empty value (SQLite in storage.data_dir), "
            '"sqlite:////path/index.sqlite" or "postgresql://user:password@host:5432/database"'
        )
    if index.pool_size < 1:
        raise ConfigError("index.pool_size must be at least 1 (default 20)")
    if index.sqlite_cache_mb < 1:
        raise ConfigError(
            "index.sqlite_cache_mb must be at least 1 (MB of page cache per SQLite connection, default 8)"
        )
    if index.statement_timeout <= 0 or index.connect_timeout <= 0:
        raise ConfigError("index.statement_timeout and index.connect_timeout must be positive numbers of seconds")


def _validate_dicom_tls(settings: Settings) -> None:
    """The DICOM TLS port and the connection limits (their files are read at start: dimse/tls.py)."""
    d = settings.dicom
    if d.max_associations_per_peer < 1:
        raise ConfigError("dicom.max_associations_per_peer must be at least 1")
    if d.pre_association_timeout <= 0:
        raise ConfigError("dicom.pre_association_timeout must be a positive number of seconds (default 10)")
    if bool(d.tls_cert) != bool(d.tls_key):
        raise ConfigError("dicom.tls_cert and dicom.tls_key must be set together (PEM certificate and its key)")
    if d.tls_require_client_cert and not d.tls_ca:
        raise ConfigError(
            "dicom.tls_require_client_cert needs dicom.tls_ca "
            "(the CA certificates that client certificates are checked against)"
        )
    if not d.tls_enabled:
        return
    if not 1 <= d.tls_port <= 65535:
        raise ConfigError(f"dicom.tls_port = {d.tls_port} is not a TCP port (1-65535)")
    others = {"dicom.port": d.port, "web.port": settings.web.port}
    if settings.xmlrpc.enabled:
        others["xmlrpc.port"] = settings.xmlrpc.port
    for name, port in others.items():
        if port == d.tls_port:
            raise ConfigError(f"dicom.tls_port = {d.tls_port} is also {name}: give the DICOM TLS port its own number")


def _validate_s3(settings: Settings) -> None:
    """``storage.url`` and the ``[s3]`` settings (the store itself is reached only when opened)."""
    if settings.storage.url:
        try:
            parse_s3_url(settings.storage.url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    s3 = settings.s3
    if s3.addressing_style not in ("path", "virtual", "auto"):
        raise ConfigError(f's3.addressing_style = {s3.addressing_style!r}: use "path", "virtual" or "auto"')
    if s3.attempts < 1 or s3.timeout_s <= 0 or s3.cache_mb < 0:
        raise ConfigError("s3.attempts must be at least 1, s3.timeout_s positive and s3.cache_mb 0 or more")


def _section_classes() -> dict[str, type]:
    return {
        "dicom": DicomSettings,
        "storage": StorageSettings,
        "index": IndexSettings,
        "s3": S3Settings,
        "web": WebSettings,
        "xmlrpc": XmlRpcSettings,
        "server": ServerSettings,
        "plugins": PluginsSettings,
        "jobs": JobsSettings,
        "audit": AuditSettings,
    }


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the type of the default, or say what is wrong."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a whole number, not {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            return [str(item) for item in value]
        raise ConfigError(f"{where} must be a list")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def apply(settings: Settings, values: Mapping[str, Mapping[str, Any]], origin: str) -> None:
    """Apply ``{section: {key: value}}`` to settings; unknown names are errors, not silently ignored."""
    classes = _section_classes()
    for section, items in values.items():
        if section not in classes:
            raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(classes)})")
        if not isinstance(items, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        target = getattr(settings, section)
        known = {f.name for f in fields(target)} - {"options"}
        for key, value in items.items():
            if section == "plugins" and isinstance(value, Mapping):  # a [plugins.<name>] table
                target.options[key] = dict(value)
                continue
            if key not in known:
                choices = ", ".join(sorted(known))
                raise ConfigError(f"{origin}: unknown setting {section}.{key} (known: {choices})")
            setattr(target, key, _coerce(section, key, getattr(target, key), value))


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect ``MACPACS_<SECTION>_<KEY>`` variables into ``{section: {key: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("MACPACS_"):
            continue
        rest = name[len("MACPACS_") :].lower()
        section, _, key = rest.partition("_")
        if section in _section_classes() and key:
            out.setdefault(section, {})[key] = value
    return out


def load(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from defaults, then the TOML file, then the environment, then ``overrides``.

    A relative ``storage.data_dir`` in a file is taken relative to that file, so that a config
    keeps working whatever directory launchd or a shell starts the server from.
    """
    settings = Settings()
    if path is not None:
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        apply(settings, data, str(path))
        data_dir = Path(settings.storage.data_dir).expanduser()
        if "data_dir" in data.get("storage", {}) and not data_dir.is_absolute():
            settings.storage.data_dir = str((path.parent / data_dir).resolve())
    apply(settings, env_overrides(os.environ if environ is None else environ), "environment")
    if overrides:
        given = {s: {k: v for k, v in items.items() if v is not None} for s, items in overrides.items()}
        apply(settings, given, "command line")
    return settings.validate()
