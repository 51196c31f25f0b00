"""The registry of DICOM nodes: the peers we know, where they listen and what they may do.

A node is a workstation or another PACS. The registry answers three questions:

- where to send: a C-MOVE destination or a ``macpacs send`` target is looked up by AE title
  or name (``get``, ``by_ae_title``);
- who may connect: with ``dicom.accept_unknown_nodes = false`` only active nodes may open an
  association, and only from the node's host (``access_for``);
- what they may do: each node has ``allow_store``, ``allow_query`` and ``allow_retrieve``.

The command line (``macpacs nodes``) and the web config page both edit the registry through
this module, so validation lives here once: every error is a ``NodeError`` whose message
names the field and what is wrong with it, ready to show to an administrator.

``status`` is ``"active"`` or ``"pending"``: a workstation that registers itself (later) is
stored as pending and has no rights until an administrator activates it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import AE_TITLE_RE
from .index import Index
from .index.nodes_table import DuplicateNode, NodeTable

STATUSES = ("active", "pending")
OPERATIONS = ("store", "query", "retrieve")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
HOST_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,255}$")  # hostname, IPv4 or IPv6 literal
RESOLVE_TTL = 60.0  # seconds a resolved host name is trusted by the access check


class NodeError(ValueError):
    """A node cannot be added, changed or found; the message says which field and why."""


@dataclass(frozen=True)
class Node:
    """One DICOM peer as stored in the registry."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    allow_store: bool = True
    allow_query: bool = True
    allow_retrieve: bool = True
    status: str = "active"
    description: str = ""

    def allows(self, operation: str) -> bool:
        """Whether this node may perform ``operation`` (store, query, retrieve) on us."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        return self.status == "active" and bool(getattr(self, f"allow_{operation}"))

    @property
    def rights(self) -> str:
        """``store,query,retrieve`` (or ``none``), for listings."""
        return ",".join(op for op in OPERATIONS if getattr(self, f"allow_{op}")) or "none"


FIELDS = tuple(f.name for f in dataclasses.fields(Node))


def validate(node: Node) -> Node:
    """Return ``node`` with trimmed text, or raise NodeError naming the first bad field."""
    name = node.name.strip()
    ae = node.ae_title.strip()
    host = node.host.strip()
    if not NAME_RE.match(name):
        raise NodeError(
            f"name {node.name!r} is not valid: use 1 to 64 letters, digits, spaces, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not ae or not AE_TITLE_RE.match(ae):
        raise NodeError(
            f"AE title {node.ae_title!r} of node {name!r} is not valid: use 1 to 16 printable ASCII "
            "characters, no backslash"
        )
    if not HOST_RE.match(host):
        raise NodeError(f"host {node.host!r} of node {name!r} is not a host name or IP address")
    if isinstance(node.port, bool) or not isinstance(node.port, int) or not 1 <= node.port <= 65535:
        raise NodeError(f"port {node.port!r} of node {name!r} is not a TCP port (1-65535)")
    if node.status not in STATUSES:
        raise NodeError(f"status {node.status!r} of node {name!r}: use one of {', '.join(STATUSES)}")
    if len(node.description) > 1024:
        raise NodeError(f"description of node {name!r} is longer than 1024 characters")
    return dataclasses.replace(node, name=name, ae_title=ae, host=host)


def _from_row(row: Mapping[str, Any]) -> Node:
    return Node(**{f: row[f] for f in FIELDS})


def _duplicate(exc: DuplicateNode, node: Node) -> NodeError:
    """The administrator's message for a name or AE title already taken."""
    if exc.column is None:  # a concurrent add won the race
        return NodeError(f"node {node.name!r} or AE title {node.ae_title!r} is already registered")
    what = {"name": "name", "ae_title": "AE title"}[exc.column]
    return NodeError(f"{what} {exc.value!r} is already used by node {exc.other!r}")


class NodeRegistry:
    """The nodes stored in one index database. Thread-safe; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.table = NodeTable(index)
        self._resolved: dict[str, tuple[float, set[str]]] = {}
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------
    def list(self) -> list[Node]:
        """Every node, by name."""
        return [_from_row(r) for r in self.table.all()]

    def find(self, name: str) -> Node | None:
        """The node called ``name``, or None."""
        row = self.table.by("name", name)
        return _from_row(row) if row else None

    def get(self, name_or_ae: str) -> Node:
        """The node with this name, else with this AE title; NodeError when there is none."""
        node = self.find(name_or_ae) or self.by_ae_title(name_or_ae)
        if node is None:
            known = ", ".join(n.name for n in self.list()) or "none yet"
            raise NodeError(f"no DICOM node named {name_or_ae!r} (known: {known}); add it with `macpacs nodes add`")
        return node

    def by_ae_title(self, ae_title: str) -> Node | None:
        """The node registered with this AE title (surrounding spaces ignored), or None."""
        row = self.table.by("ae_title", ae_title.strip())
        return _from_row(row) if row else None

    # -- writing ----------------------------------------------------------------------------
    def add(self, node: Node) -> Node:
        """Register a new node; NodeError on a bad field or a duplicate name or AE title."""
        node = validate(node)
        try:
            self.table.insert(dataclasses.asdict(node))
        except DuplicateNode as exc:
            raise _duplicate(exc, node) from exc
        return node

    def edit(self, name: str, /, **changes: Any) -> Node:
        """Change fields of the node ``name`` (any of ``Node``'s fields; ``name=`` renames it)."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise NodeError(f"unknown node field(s): {', '.join(sorted(unknown))} (known: {', '.join(FIELDS)})")
        current = self.find(name)
        if current is None:
            raise NodeError(f"no DICOM node named {name!r}")
        updated = validate(dataclasses.replace(current, **changes))
        try:
            self.table.update(name, dataclasses.asdict(updated))
        except DuplicateNode as exc:
            raise _duplicate(exc, updated) from exc
        return updated

    def remove(self, name: str) -> None:
        """Delete the node ``name``; NodeError when there is none."""
        if not self.table.delete(name):
            raise NodeError(f"no DICOM node named {name!r}")

    # -- access control -----------------------------------------------------------------------
    def access_for(self, calling_ae: str, address: str) -> Node | None:
        """The active node matching a peer's calling AE title and IP address, or None.

        A node matches when its AE title is the calling AE title and its host is (or resolves
        to) the peer's address, so that another machine cannot borrow a workstation's AE title.
        """
        node = self.by_ae_title(calling_ae)
        if node is None or node.status != "active":
            return None
        return node if address in self._addresses(node.host) else None

    def _addresses(self, host: str) -> set[str]:
        try:
            return {str(ipaddress.ip_address(host))}
        except ValueError:
            pass
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(host)
            if cached and now - cached[0] < RESOLVE_TTL:
                return cached[1]
        try:
            found = {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except OSError:
            found = set()
        with self._lock:
            self._resolved[host] = (now, found)
        return found
