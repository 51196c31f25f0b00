"""The browser pages: login, study list, study, viewer, upload, DICOM nodes, registration, status.

Pages are Jinja2 templates; the study list, nodes page and viewer fill themselves from JSON
(``ui_api``) and DICOMweb with plain JavaScript modules in ``static/``. Authentication is WEB's
(``auth.py``): a page that needs a login redirects to ``/login?next=...``, and says so when a
session existed but has expired. Every form carries a CSRF token (``csrf.py``).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ..archive import Archive
from ..dimse import scu
from ..dimse.subops import PeerError
from ..index import Query
from ..nodes import Node, NodeError, validate
from ..users import User
from . import csrf, status_page, ui_api
from .auth import SESSION_COOKIE, check_login, clear_session, client_address, issue_session, load_secret
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


def current_user(request: Request) -> User | None:
    """The logged-in user, or None (no session, expired session, bad credentials)."""
    try:
        return request.app.state.auth.identify(request)
    except HTTPException:
        return None


def _login_redirect(request: Request, user: User | None) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    expired = "&expired=1" if user is None and SESSION_COOKIE in request.cookies else ""
    return RedirectResponse(f"/login?next={quote(target, safe='')}{expired}", status_code=303)


def _reader(request: Request) -> tuple[User | None, Response | None]:
    """(user, None) when the caller may read; (None, redirect to login) otherwise."""
    user = current_user(request)
    if user is None and not request.app.state.auth.anonymous_allowed(request):
        return None, _login_redirect(request, user)
    return user, None


def _admin(request: Request) -> tuple[User | None, Response | None]:
    user = current_user(request)
    if user is None:
        return None, _login_redirect(request, user)
    if not user.is_admin:
        return user, render(
            request,
            "message.html",
            user,
            status_code=403,
            title="Admins only",
            text=f"User {user.username} is not an admin: this page needs an admin login.",
        )
    return user, None


def render(request: Request, name: str, user: User | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    token = csrf.token_for(request)
    response = TEMPLATES.TemplateResponse(
        request, name, {"user": user, "csrf_token": token, **context}, status_code=status_code
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
    issue_session(request, response, user.username)
    log.info("web login: %s from %s", user.username, client_address(request))
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")) -> Response:
    csrf.verify(request, csrf_token)
    response = RedirectResponse("/login?logged_out=1", status_code=303)
    clear_session(request, response)
    return response


# -- studies ---------------------------------------------------------------------------------------
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/studies", status_code=303)


@router.get("/studies")
def studies_page(request: Request) -> Response:
    user, denied = _reader(request)
    if denied:
        return denied
    return render(request, "studies.html", user, modalities=MODALITIES, active="studies")


def _not_found(request: Request, user: User | None, uid: str) -> HTMLResponse:
    return render(
        request,
        "message.html",
        user,
        status_code=404,
        title="Study not found",
        text=f"Study {uid} is not in the archive (it may have been deleted).",
    )


def _invalid_uid(request: Request, user: User | None, exc: HTTPException) -> HTMLResponse:
    return render(
        request,
        "message.html",
        user,
        status_code=400,
        title="Not a valid UID",
        text=f"{exc.detail}. Open the study from the study list, or check the link you followed.",
    )


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str) -> Response:
    user, denied = _reader(request)
    if denied:
        return denied
    try:
        study_uid = check_uid(study_uid, "study UID")
    except HTTPException as exc:
        return _invalid_uid(request, user, exc)
    archive = _archive(request)
    names = archive.settings.dicom.case_insensitive_names
    found = archive.index.find_all(Query("STUDY", {**dict.fromkeys(STUDY_KEYS), "StudyInstanceUID": study_uid}, names))
    series = archive.index.find_all(
        Query("SERIES", {**dict.fromkeys(SERIES_KEYS), "StudyInstanceUID": study_uid}, names)
    )
    if not found:
        return _not_found(request, user, study_uid)
    series.sort(key=lambda s: (s.get("SeriesNumber") is None, s.get("SeriesNumber") or 0))
    nodes = [n for n in archive.nodes.list() if n.status == "active"]
    return render(request, "study.html", user, study=found[0], series=series, nodes=nodes, active="studies")


@router.get("/viewer/{study_uid}")
def viewer_page(request: Request, study_uid: str, series: str = "") -> Response:
    user, denied = _reader(request)
    if denied:
        return denied
    try:
        study_uid = check_uid(study_uid, "study UID")
        series = check_uid(series, "series UID") if series else ""
    except HTTPException as exc:
        return _invalid_uid(request, user, exc)
    return render(request, "viewer.html", user, study=study_uid, series=series)


@router.get("/upload")
def upload_page(request: Request) -> Response:
    user, denied = _reader(request)
    if denied:
        return denied
    return render(request, "upload.html", user, active="upload")


# -- nodes, registration, status ---------------------------------------------------------------------
@router.get("/nodes")
def nodes_page(request: Request) -> Response:
    user, denied = _admin(request)
    if denied:
        return denied
    accept = _archive(request).settings.dicom.accept_unknown_nodes
    return render(request, "nodes.html", user, accept_unknown=accept, active="nodes")


def _locations_line(request: Request) -> str:
    s = _archive(request).settings
    return status_page.locations_line(s, request.url.hostname or socket.gethostname())


@router.get("/register")
def register_page(request: Request) -> HTMLResponse:
    user = current_user(request)
    archive = _archive(request)
    form = {"ae_title": "", "host": client_address(request), "port": "11112", "name": "", "description": ""}
    return render(
        request,
        "register.html",
        user,
        form=form,
        accept_unknown=archive.settings.dicom.accept_unknown_nodes,
        locations_line=_locations_line(request),
        active="register",
    )


@router.post("/register")
def register(
    request: Request,
    ae_title: str = Form(""),
    host: str = Form(""),
    port: str = Form(""),
    name: str = Form(""),
    description: str = Form(""),
    csrf_token: str = Form(""),
) -> HTMLResponse:
    """Register a workstation: validate, C-ECHO it, then save (pending unless the server trusts it).

    Nothing is saved when the echo fails, so a C-MOVE to a registered node is known to work.
    """
    csrf.verify(request, csrf_token)
    user = current_user(request)
    archive = _archive(request)
    form = {"ae_title": ae_title, "host": host, "port": port, "name": name, "description": description}
    trusted = archive.settings.dicom.accept_unknown_nodes or (user is not None and user.is_admin)

    def answer(text: str, kind: str, code: int) -> HTMLResponse:
        return render(
            request,
            "register.html",
            user,
            status_code=code,
            form=form,
            result=text,
            result_kind=kind,
            accept_unknown=archive.settings.dicom.accept_unknown_nodes,
            locations_line=_locations_line(request),
            active="register",
        )

    try:
        port_number = int(port)
    except ValueError:
        return answer(
            f"Port {port!r} is not a number: enter the TCP port of the workstation's DICOM listener.", "error", 400
        )
    registry = archive.nodes
    try:
        node = validate(
            Node(
                name=(name or ae_title).strip(),
                ae_title=ae_title,
                host=host,
                port=port_number,
                status="active" if trusted else "pending",
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
        log.warning("workstation registration: C-ECHO to %s@%s:%d failed: %s", node.ae_title, node.host, node.port, exc)
        return answer(
            f"C-ECHO to {node.ae_title} at {node.host}:{node.port} failed: {exc}. Start the workstation's DICOM "
            "listener, check the AE title, port and firewall, then try again. Nothing was saved.",
            "error",
            502,
        )
    try:
        registry.add(node)
    except NodeError as exc:
        return answer(f"{exc}. Nothing was saved.", "error", 409)
    by = user.username if user else "anonymous"
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
    user, denied = _reader(request)
    if denied:
        return denied
    archive = _archive(request)
    info = status_page.view(archive, request.url.hostname or socket.gethostname())
    return render(request, "status.html", user, s=info, active="status")
