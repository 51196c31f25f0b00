"""The OsiriX XML-RPC methods, with OsiriX's parameter names, reply shapes and error codes.

Every method takes one struct and answers a struct whose ``error`` is a string code (``"0"``
success, ``"-1"`` nothing found, ...). A call OsiriX would refuse with ``ReturnWithCode(400)``
raises BadRequest, which the server turns into HTTP 400. There is no GUI: the methods that open
viewers in OsiriX (DisplayStudy, DisplaySeries, DisplayStudyList...) return what they would show.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from ..archive import Archive
from ..audit import Actor
from ..delete import delete_matching
from ..dimse import scu
from ..index import Query, QueryError
from ..index.matcher import All, Expr, Match
from ..nodes import Node, NodeError
from ..predicate import PredicateError, parse
from . import osirix

log = logging.getLogger(__name__)

MAX_ELEMENTS = 100_000  # a reply larger than this is refused: narrow the predicate
EXECUTE = {"": "Select", "nothing": "Select", "select": "Select", "open": "Select", "delete": "Delete"}
CGET_RETRIEVE_MODE = 1  # OsiriX's retrieveMode values: 0 C-MOVE, 1 C-GET, 2 WADO
MAX_FILTERS = 9  # filterKey/filterValue, filterKey2/filterValue2 ... filterKey9/filterValue9
# Calls that change or stop something, and the user right each needs (``needs``), as on the web
# pages: stopping is an admin's; pulling studies in from a node is a transfer, the "send" right's.
CHANGING = {"killosirix": "admin", "retrieve": "send", "cmove": "send"}
FIND_METHODS = ("dbwindowfind", "findobject")


class BadRequest(ValueError):
    """The call cannot be served as asked (OsiriX's ReturnWithCode(400)); the message says why."""


def _struct(params: tuple[Any, ...]) -> dict[str, Any]:
    """OsiriX methods take one struct; anything else counts as an empty one."""
    return params[0] if params and isinstance(params[0], dict) else {}


def needs(method: str, params: tuple[Any, ...]) -> str | None:
    """The right this call needs: None (anyone allowed to reach the port), "send", "delete" or "admin".

    ``DBWindowFind``/``FindObject`` read unless ``execute`` is Delete, read exactly as the method
    reads it, so that no spelling of Delete slips past as a read.
    """
    name = method.lower()
    if name in FIND_METHODS:
        execute = EXECUTE.get(str(_struct(params).get("execute") or "").strip().lower())
        return "delete" if execute == "Delete" else None
    return CHANGING.get(name)


def _text(args: dict[str, Any], *names: str) -> str:
    """The first non-empty parameter among ``names`` (OsiriX accepts PatientID and patientID)."""
    for name in names:
        value = args.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


class OsirixMethods:
    """The methods registered on the XML-RPC dispatcher; ``caller`` is set per request."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.settings = archive.settings
        self.index = archive.index
        self.local = threading.local()

    @property
    def caller(self) -> str:
        """Who makes the current call, for log lines: ``user@address``, or the address alone."""
        return getattr(self.local, "caller", "?")

    def table(self) -> dict[str, Callable[..., Any]]:
        """Method name (as OsiriX spells it) → function."""
        return {
            "DBWindowFind": self.DBWindowFind,
            "FindObject": self.DBWindowFind,
            "DisplayStudy": self.DisplayStudy,
            "DisplaySeries": self.DisplaySeries,
            "DisplayStudyListByPatientName": self.DisplayStudyListByPatientName,
            "DisplayStudyListByPatientId": self.DisplayStudyListByPatientId,
            "KillOsiriX": self.KillOsiriX,
            "Retrieve": self.Retrieve,
            "CMove": self.CMove,
        }

    # -- queries ---------------------------------------------------------------------------------
    def _select(self, entity: str, where: Expr) -> list[dict[str, str]]:
        query = Query(
            level=osirix.LEVEL_OF[entity],
            keys=dict.fromkeys(osirix.keywords(entity)),
            where=where,
            limit=MAX_ELEMENTS + 1,
        )
        try:
            rows = self.index.find_all(query)
        except QueryError as exc:
            raise BadRequest(f"predicate cannot be used: {exc}") from None
        if len(rows) > MAX_ELEMENTS:
            raise BadRequest(f"more than {MAX_ELEMENTS} {entity} elements match; narrow the predicate")
        return [osirix.element(entity, row) for row in rows]

    def DBWindowFind(self, *params: Any) -> dict[str, Any]:
        """``{request, table, execute}`` → ``{error: "0", elements: [...]}``.

        Unlike OsiriX, which answers ``-1`` when nothing matches, an empty result is ``"0"`` with
        no elements: the watchdog's probe (a predicate matching nothing) relies on it.
        """
        args = _struct(params)
        request = str(args.get("request") or "")
        if not request.strip() or not str(args.get("table") or "").strip():
            raise BadRequest("DBWindowFind needs request (a predicate) and table (Study, Series or Image)")
        execute = EXECUTE.get(str(args.get("execute") or "").strip().lower())
        if execute is None:
            raise BadRequest(f"execute {str(args.get('execute'))[:40]!r} is not one of Select, Open, Delete, Nothing")
        try:
            entity = osirix.table_name(args.get("table"))
            where = osirix.to_expression(entity, parse(request))
        except PredicateError as exc:
            raise BadRequest(f"predicate error: {exc}") from None
        elements = self._select(entity, where)
        if execute == "Delete" and elements:
            query = Query(level=osirix.LEVEL_OF[entity], where=where)
            deleted = delete_matching(
                self.index, self.archive.blobs, query, reason=f"XML-RPC DBWindowFind from {self.caller}"
            )
            self._audit("delete", count=deleted.instances, detail=f"XML-RPC DBWindowFind {entity} {request}: {deleted}")
        elif elements:  # an empty answer revealed nothing: the watchdog's probe asks for nothing every few seconds
            self._audit("query", count=len(elements), detail=f"XML-RPC DBWindowFind {entity} {request}")
        return {"error": "0", "elements": elements}

    def _audit(self, event: str, **details: Any) -> None:
        user, _, address = self.caller.rpartition("@")
        self.archive.audit.record(event, Actor(user or "anonymous", address, "xmlrpc"), **details)

    def DisplayStudy(self, *params: Any) -> dict[str, Any]:
        """``{PatientID, StudyInstanceUID, AccessionNumber, StudyID}`` (any of them) → the studies."""
        args = _struct(params)
        pairs = (
            ("PatientID", _text(args, "PatientID", "patientID")),
            ("StudyInstanceUID", _text(args, "StudyInstanceUID", "studyInstanceUID")),
            ("AccessionNumber", _text(args, "AccessionNumber", "accessionNumber")),
            ("StudyID", _text(args, "StudyID", "studyID")),
        )
        return self._display(
            "Study", pairs, "DisplayStudy needs PatientID, StudyInstanceUID, AccessionNumber or StudyID"
        )

    def DisplaySeries(self, *params: Any) -> dict[str, Any]:
        """``{PatientID, SeriesInstanceUID}`` (either) → the series."""
        args = _struct(params)
        pairs = (
            ("PatientID", _text(args, "PatientID", "patientID")),
            ("SeriesInstanceUID", _text(args, "SeriesInstanceUID", "seriesInstanceUID")),
        )
        return self._display("Series", pairs, "DisplaySeries needs PatientID or SeriesInstanceUID")

    def _display(self, entity: str, pairs: tuple[tuple[str, str], ...], missing: str) -> dict[str, Any]:
        matches = tuple(Match(keyword, "eq", value) for keyword, value in pairs if value)
        if not matches:
            raise BadRequest(missing)
        elements = self._select(entity, All(matches))
        if not elements:
            return {"error": "-1"}  # as OsiriX: nothing to display
        return {"error": "0", "elements": elements}

    def DisplayStudyListByPatientName(self, *params: Any) -> dict[str, Any]:
        """``{PatientName}``: OsiriX filters its study list by it; we return that list."""
        name = _text(_struct(params), "PatientName")
        if not name:
            raise BadRequest("DisplayStudyListByPatientName needs PatientName")
        return {"error": "0", "elements": self._select("Study", Match("PatientName", "contains", name, True))}

    def DisplayStudyListByPatientId(self, *params: Any) -> dict[str, Any]:
        """``{PatientID}``: the studies of that patient."""
        patient_id = _text(_struct(params), "PatientID")
        if not patient_id:
            raise BadRequest("DisplayStudyListByPatientId needs PatientID")
        return {"error": "0", "elements": self._select("Study", Match("PatientID", "eq", patient_id))}

    def KillOsiriX(self, *params: Any) -> dict[str, Any]:
        """A graceful shutdown, as OsiriX's quit; the reply goes out before the server stops."""
        log.warning("XML-RPC KillOsiriX from %s: stopping the server", self.caller)
        self._audit("stop", detail="XML-RPC KillOsiriX")
        timer = threading.Timer(0.3, self.archive.request_stop)
        timer.daemon = True
        timer.start()
        return {"error": "0"}

    # -- query/retrieve from other nodes ---------------------------------------------------------------
    def Retrieve(self, *params: Any) -> dict[str, Any]:
        """``{serverName, filterKey, filterValue, ... filterKey9, filterValue9, retrieveMode}``.

        Queries the node for studies matching the filters (DICOM keywords), answers at once and
        retrieves them in the background, as OsiriX does: ``"0"`` started, ``"-2"`` unknown
        server, ``"-3"`` nothing found, ``"-1"`` the query failed.
        """
        args = _struct(params)
        server_name = _text(args, "serverName")
        if not server_name:
            raise BadRequest("Retrieve needs serverName (a DICOM node registered with `macpacs nodes add`)")
        filters: dict[str, str] = {}
        for i in range(1, MAX_FILTERS + 1):
            suffix = "" if i == 1 else str(i)
            key, value = args.get(f"filterKey{suffix}"), args.get(f"filterValue{suffix}")
            if key is None or value is None:
                continue
            key = str(key).strip()
            if not key or tag_for_keyword(key) is None or dictionary_VR(key) == "SQ":
                raise BadRequest(
                    f"filterKey{suffix} {key[:40]!r} is not a DICOM keyword (e.g. PatientID, AccessionNumber)"
                )
            filters[key] = str(value)
        node = self._node(server_name)
        if node is None:
            return {"error": "-2"}
        try:
            studies = scu.query(node, self.settings, "STUDY", filters)
        except Exception as exc:  # refused, unreachable, timed out: OsiriX's -1
            log.error("XML-RPC Retrieve from %s: query on %s failed: %s", self.caller, node.name, exc)
            return {"error": "-1"}
        uids = [str(ds.get("StudyInstanceUID", "")) for ds in studies if ds.get("StudyInstanceUID")]
        if not uids:
            log.info("XML-RPC Retrieve from %s: nothing on %s matches %s", self.caller, node.name, filters)
            return {"error": "-3"}
        method = "get" if str(args.get("retrieveMode", "")).strip() == str(CGET_RETRIEVE_MODE) else "move"
        self._retrieve_in_background(node, uids, method)
        return {"error": "0"}

    def CMove(self, *params: Any) -> dict[str, Any]:
        """``{accessionNumber, server}``: query the node for that accession number and C-MOVE it here.

        Answers ``"0"`` at once (the work runs in the background, as in OsiriX) or ``"-1"`` for
        an unknown server.
        """
        args = _struct(params)
        accession, server_name = _text(args, "accessionNumber"), _text(args, "server")
        if not accession or not server_name:
            raise BadRequest("CMove needs accessionNumber and server (a registered DICOM node)")
        node = self._node(server_name)
        if node is None:
            return {"error": "-1"}
        self.archive.jobs.submit(
            "retrieve",
            f"XML-RPC CMove of accession {accession} from {node.name}",
            {"node": node.name, "query": {"AccessionNumber": accession}, "method": "move"},
        )
        self._audit("retrieve", detail=f"XML-RPC CMove of accession {accession} from {node.name} into this archive")
        return {"error": "0"}

    def _node(self, name: str) -> Node | None:
        try:
            return self.archive.nodes.get(name)
        except NodeError as exc:
            log.warning("XML-RPC from %s: %s", self.caller, exc)
            return None

    def _retrieve_in_background(self, node: Node, uids: list[str], method: str) -> None:
        """A ``retrieve`` job (dimse/transfer_jobs.py): retried by the queue while the node fails."""
        self.archive.jobs.submit(
            "retrieve",
            f"XML-RPC Retrieve of {len(uids)} studies from {node.name}",
            {"node": node.name, "study_uids": uids, "method": method},
        )
        self._audit("retrieve", studies=uids, detail=f"XML-RPC Retrieve from {node.name} into this archive")
