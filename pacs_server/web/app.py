"""The web application: one FastAPI app on the web port (default 3333).

``create_app(archive)`` assembles the routers: health (``/testdbalive``, ``/health``), WADO-URI
(``/wado``), DICOMweb (``/dicom-web``), the JSON API (``/api``), and the browser pages. The
OpenAPI document is at ``/openapi.json`` (browsable at ``/api/docs``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from ..archive import Archive
from ..index import IndexUnavailable, IndexUnreadable, QueryError
from ..retrieve import FileMissing
from ..storage import StorageError
from . import api, debug, health, pages, wado_uri
from .auth import Authenticator
from .dicomweb import router as dicomweb_router
from .dicomweb.frames_fast import FrameShortPath
from .status import package_version


def create_app(archive: Archive) -> FastAPI:
    settings = archive.settings
    app = FastAPI(
        title="macpacs",
        version=package_version(),
        description="DICOM archive: WADO-URI, DICOMweb (QIDO-RS, WADO-RS, STOW-RS), JSON API, health.",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.archive = archive
    app.state.users = archive.users
    app.state.auth = Authenticator(archive)
    app.add_middleware(FrameShortPath)  # added first: the CORS middleware below wraps it
    if settings.web.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.web.cors_origins,
            allow_credentials="*" not in settings.web.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Location", "Warning", "X-Total-Count"],
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # A 400 saying which parameter is wrong and why, without echoing the value: FastAPI's own
        # 422 repeats it, and a value no UTF-8 can hold (a JSON lone surrogate) made that a 500.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(QueryError)
    async def _bad_query(_request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid query: {exc}"}, status_code=400)

    @app.exception_handler(FileMissing)
    async def _missing_file(_request: Request, exc: FileMissing) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; restore the file or run `macpacs reindex`"}, status_code=500)

    @app.exception_handler(StorageError)
    async def _storage_down(_request: Request, exc: StorageError) -> JSONResponse:
        # An object store that did not answer, after its retries: worth a retry later.
        return JSONResponse({"detail": f"storage unavailable: {exc.strerror or exc}"}, status_code=503)

    @app.exception_handler(IndexUnreadable)
    async def _corrupt_index(_request: Request, exc: IndexUnreadable) -> JSONResponse:
        # The server repairs it by itself in server mode (recovery.py): worth a retry shortly.
        detail = f"{exc}; see /health for the repair under way"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(IndexUnavailable)
    async def _index_unavailable(_request: Request, exc: IndexUnavailable) -> JSONResponse:
        # The database server is restarting or overloaded (index.statement_timeout): nothing was
        # changed, and the next request gets a fresh connection.
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    app.include_router(health.router)
    app.include_router(wado_uri.router)
    app.include_router(dicomweb_router, prefix="/dicom-web")
    app.include_router(api.router, prefix="/api")
    if debug.enabled():
        app.include_router(debug.router)

    # Browser pages (login, study list, viewer, settings) and their static files: pages.py.
    pages.install(app, archive)
    for router in archive.plugins.routes():  # the register_routes hook (docs/plugins.md)
        app.include_router(router)
    return app
