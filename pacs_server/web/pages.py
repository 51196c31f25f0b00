"""The browser pages: login, study list, study, viewer, upload, DICOM nodes, registration, status.

Pages are Jinja2 templates; the study list, nodes page and viewer fill themselves from JSON
(``ui_api``) and DICOMweb with plain JavaScript modules in ``static/``. Authentication is WEB's
(``auth.py``): a page that needs a login redirects to ``/login?next=...``, and says so when a
session existed but has expired; a page needing a right the user lacks says so (403), and the
pages show only the actions the caller's rights allow (``can`` in the templates). Every form
carries a CSRF token bound to the session (``csrf.py``).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ..archive import Archive
from ..audit import Actor
from ..dimse import scu
from ..dimse.subops import PeerError
from ..index import Query
from ..nodes import Node, NodeError, validate
from ..users import RIGHT_WORDS, Throttled, user_from_row
from . import csrf, status_page, ui_api
from .auth import SESSION_COOKIE, Principal, check_login, client_address, is_loopback, link_host, load_secret
from .lookup import check_uid

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
MODALITIES = ("CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT", "SR", "SC", "RTSTRUCT", "SEG")
STUDY_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = ("SeriesNumber", "SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances")
# Workstation registrations (each one a C-ECHO from the server) per client address.
REGISTER_LIMIT = 10
REGISTER_WINDOW_S = 600.0


def _dicom_date(value: str | None) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) >= 8 else value or ""


def _dicom_time(value: str | None) -> str:
    return f"{value[:2]}:{value[2:4]}" if value and len(value) >= 4 else value or ""


TEMPLATES.env.filters["dicom_date"] = _dicom_date
TEMPLATES.env.filters["dicom_time"] = _dicom_time

router = APIRouter(include_in_schema=False)


def install(app: FastAPI, archive: Archive) -> None:
    """Add the pages, their JSON endpoints and static files to the app (called by ``create_app``)."""
    app.state.csrf_secret = hashlib.sha256(load_secret(archive.settings.data_dir) + b"|csrf").digest()
    app.include_router(router)
    app.include_router(ui_api.router, prefix="/api/ui")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


# -- who is asking ---------------------------------------------------------------------------------
def _archive(request: Request) -> Archive:
    return request.app.state.archive


def _principal(request: Request) -> Principal | None:
    """The caller with its rights, None when it must log in (bad credentials count as none here)."""
    try:
        return request.app.state.auth.principal(request)
    except HTTPException:
        return None


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    expired = "&expired=1" if SESSION_COOKIE in request.cookies else ""
    return RedirectResponse(f"/login?next={quote(target, safe='')}{expired}", status_code=303)


def _allowed(request: Request, right: str) -> tuple[Principal | None, Response | None]:
    """(caller, None) when the caller has ``right``; else (caller, the login redirect or a 403 page)."""
    who = _principal(request)
    if who is not None and who.can(right):
        return who, None
    if who is None or who.user is None:
        return who, _login_redirect(request)
    return who, render(
        request,
        "message.html",
        who,
        status_code=403,
        title="Not allowed",
        text=(
            f"User {who.name} may not {RIGHT_WORDS[right]}. An administrator can allow it on the server "
            f"with `macpacs users rights {who.name} --grant {right}`."
        ),
    )


def render(request: Request, name: str, who: Principal | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page for ``who``: its user (or None) and ``can(right)`` for the template to show only what it may do."""
    token = csrf.token_for(request)
    user = who.user if who else None
    response = TEMPLATES.TemplateResponse(
        request,
        name,
        {"user": user, "can": who.can if who else (lambda _right: False), "csrf_token": token, **context},
        status_code=status_code,
    )
    csrf.remember(request, response)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _safe_next(value: str) -> str:
    """Only local paths: a login link must not send the user to another site."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/studies"
    return value


# -- login -----------------------------------------------------------------------------------------
@router.get("/login")
def login_page(request: Request, next: str = "/studies", expired: str = "", logged_out: str = "") -> HTMLResponse:
    message = ""
    if expired:
        message = "Your session has expired: log in again."
    elif logged_out:
        message = "You are logged out."
    return render(request, "login.html", None, next=_safe_next(next), message=message, active="")


@router.post("/login")
def login(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    next: str = Form("/studies"),
    csrf_token: str = Form(""),
) -> Response:
    csrf.verify(request, csrf_token)
    try:
        user = check_login(request, username.strip(), password)
    except HTTPException as exc:
        error = "Wrong user name or password." if exc.status_code == 401 else str(exc.detail)
        log.warning("web login failed for %r from %s (%s)", username, client_address(request), exc.detail)
        _audit_login(request, username, "failure", str(exc.detail))
        return render(
            request,
            "login.html",
            None,
            status_code=exc.status_code,
            error=error,
            username=username,
            next=_safe_next(next),
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    request.app.state.auth.issue_session(request, response, user)
    log.info("web login: %s from %s", user.username, client_address(request))
    _audit_login(request, user.username, "success", "login page")
    return response


def _audit_login(request: Request, username: str, outcome: str, detail: str, event: str = "login") -> None:
    actor = Actor(username.strip()[:64] or "(no name)", client_address(request), "web")
    request.app.state.archive.audit.record(event, actor, outcome=outcome, detail=detail)


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")) -> Response:
    csrf.verify(request, csrf_token)
    response = RedirectResponse("/login?logged_out=1", status_code=303)
    auth = request.app.state.auth
    current = auth.session(request)
    auth.clear_session(request, response)
    if current is not None:
        _audit_login(request, user_from_row(current.user_row).username, "success", "logout", event="logout")
    return response


# -- studies ---------------------------------------------------------------------------------------
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/studies", status_code=303)


@router.get("/studies")
def studies_page(request: Request) -> Response:
    who, denied = _allowed(request, "read")
    if denied:
        return denied
    return render(request, "studies.html", who, modalities=MODALITIES, active="studies")


def _not_found(request: Request, who: Principal | None, uid: str) -> HTMLResponse:
    return render(
        request,
        "message.html",
        who,
        status_code=404,
        title="Study not found",
        text=f"Study {uid} is not in the archive (it may have been deleted).",
    )


def _invalid_uid(request: Request, who: Principal | None, exc: HTTPException) -> HTMLResponse:
    return render(
        request,
        "message.html",
        who,
        status_code=400,
        title="Not a valid UID",
        text=f"{exc.detail}. Open the study from the study list, or check the link you followed.",
    )


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str) -> Response:
    who, denied = _allowed(request, "read")
    if denied:
        return denied
    try:
        study_uid = check_uid(study_uid, "study UID")
    except HTTPException as exc:
        return _invalid_uid(request, who, exc)
    archive = _archive(request)
    names = archive.settings.dicom.case_insensitive_names
    found = archive.index.find_all(Query("STUDY", {**dict.fromkeys(STUDY_KEYS), "StudyInstanceUID": study_uid}, names))
    series = archive.index.find_all(
        Query("SERIES", {**dict.fromkeys(SERIES_KEYS), "StudyInstanceUID": study_uid}, names)
    )
    if not found:
        return _not_found(request, who, study_uid)
    series.sort(key=lambda s: (s.get("SeriesNumber") is None, s.get("SeriesNumber") or 0))
    nodes = [n for n in archive.nodes.list() if n.status == "active"]
    return render(request, "study.html", who, study=found[0], series=series, nodes=nodes, active="studies")


@router.get("/viewer/{study_uid}")
def viewer_page(request: Request, study_uid: str, series: str = "") -> Response:
    who, denied = _allowed(request, "read")
    if denied:
        return denied
    try:
        study_uid = check_uid(study_uid, "study UID")
        series = check_uid(series, "series UID") if series else ""
    except HTTPException as exc:
        return _invalid_uid(request, who, exc)
    return render(request, "viewer.html", who, study=study_uid, series=series)


@router.get("/upload")
def upload_page(request: Request) -> Response:
    who, denied = _allowed(request, "upload")
    if denied:
        return denied
    return render(request, "upload.html", who, active="upload")


# -- nodes, registration, status ---------------------------------------------------------------------
@router.get("/nodes")
def nodes_page(request: Request) -> Response:
    who, denied = _allowed(request, "admin")
    if denied:
        return denied
    accept = _archive(request).settings.dicom.accept_unknown_nodes
    return render(request, "nodes.html", who, accept_unknown=accept, active="nodes")


def _server_name(request: Request) -> str:
    """This server's name as the page was reached, when that is one of its names (``auth.link_host``)."""
    return urlsplit("//" + link_host(request)).hostname or socket.gethostname()


def _locations_line(request: Request) -> str:
    return status_page.locations_line(_archive(request).settings, _server_name(request))


@router.get("/register")
def register_page(request: Request) -> HTMLResponse:
    form = {"ae_title": "", "port": "11112", "name": "", "description": ""}
    return render(
        request,
        "register.html",
        _principal(request),
        form=form,
        address=client_address(request),
        locations_line=_locations_line(request),
        active="register",
    )


@router.post("/register")
def register(
    request: Request,
    ae_title: str = Form(""),
    port: str = Form(""),
    name: str = Form(""),
    description: str = Form(""),
    csrf_token: str = Form(""),
) -> HTMLResponse:
    """Register the workstation the request comes from: validate, C-ECHO it, then save it pending.

    Only the request's own address is echoed, at most ``REGISTER_LIMIT`` times per window, and
    every failure has one wording: the page cannot be used to probe other hosts or ports.
    Nothing is saved when the echo fails, so a C-MOVE to a registered node is known to work. The
    node is active only when an admin registers it; otherwise it waits for an admin's approval.
    """
    csrf.verify(request, csrf_token)
    who = _principal(request)
    user = who.user if who else None
    archive = _archive(request)
    address = client_address(request)
    form = {"ae_title": ae_title, "port": port, "name": name, "description": description}

    def answer(text: str, kind: str, code: int) -> HTMLResponse:
        return render(
            request,
            "register.html",
            who,
            status_code=code,
            form=form,
            address=address,
            result=text,
            result_kind=kind,
            locations_line=_locations_line(request),
            active="register",
        )

    if is_loopback(address) and not request.app.state.auth.host_is_ours(request):
        return answer(
            "This page was reached through a name that is not this server's, as a web page from another site "
            "would be: open it at http://localhost or by the server's own name. Nothing was saved.",
            "error",
            403,
        )
    try:
        archive.users.rate_limit("register", address, REGISTER_LIMIT, REGISTER_WINDOW_S, "registrations")
    except Throttled as exc:
        return answer(f"{exc}. Nothing was saved.", "error", 429)
    try:
        port_number = int(port)
    except ValueError:
        return answer(
            f"Port {port[:20]!r} is not a number: enter the TCP port of the workstation's DICOM listener.", "error", 400
        )
    registry = archive.nodes
    admin = user is not None and user.is_admin
    try:
        node = validate(
            Node(
                name=(name or ae_title).strip(),
                ae_title=ae_title,
                host=address,
                port=port_number,
                status="active" if admin else "pending",
                description=description.strip(),
            )
        )
        for other in registry.list():
            if other.ae_title == node.ae_title or other.name == node.name:
                raise NodeError(
                    f"AE title {node.ae_title!r} or name {node.name!r} is already registered (node {other.name!r}, "
                    f"{other.status}); ask the administrator to change it, or choose another AE title"
                )
    except NodeError as exc:
        return answer(f"{exc}. Nothing was saved.", "error", 400)
    try:
        ms = scu.echo(node, archive.settings)
    except (PeerError, OSError, RuntimeError) as exc:
        # The reason stays in the log: refused, open-but-not-DICOM and silent ports read alike.
        log.warning("workstation registration: C-ECHO to %s@%s:%d failed: %s", node.ae_title, node.host, node.port, exc)
        return answer(
            f"C-ECHO to {node.ae_title} at {node.host}:{node.port} failed: no DICOM answer. Start the workstation's "
            "DICOM listener, check the AE title, port and firewall, then try again. Nothing was saved.",
            "error",
            502,
        )
    try:
        registry.add(node)
    except NodeError as exc:
        return answer(f"{exc}. Nothing was saved.", "error", 409)
    by = who.name if who else "anonymous"
    log.info("workstation %s@%s:%d registered by %s (%s)", node.ae_title, node.host, node.port, by, node.status)
    if node.status == "pending":
        text = (
            f"C-ECHO OK ({ms:.0f} ms). {node.ae_title} is registered and waits for an administrator's "
            "approval on the DICOM nodes page."
        )
    else:
        text = f"C-ECHO OK ({ms:.0f} ms). {node.ae_title} at {node.host}:{node.port} is registered and active."
    return answer(text, "ok", 200)


@router.get("/status")
def server_status(request: Request) -> Response:
    who, denied = _allowed(request, "read")
    if denied:
        return denied
    info = status_page.view(_archive(request), _server_name(request))
    return render(request, "status.html", who, s=info, active="status")
