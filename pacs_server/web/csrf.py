"""CSRF protection for the browser pages: a signed double-submit token.

The session cookie is sent by the browser with any request to this host, so a form on another
site could otherwise make a logged-in admin delete a study. Every page sets a ``macpacs_csrf``
cookie (random, signed with the app's secret, SameSite=Strict) and puts the same value in its
forms (hidden ``csrf_token`` field) and in a ``<meta name="csrf-token">`` tag that the page
scripts send back as the ``X-CSRF-Token`` header. A state-changing request is accepted only
when the value it carries equals the cookie and the signature is ours: another site can neither
read our cookie nor set one with our signature.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeSerializer

CSRF_COOKIE = "macpacs_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


def _serializer(request: Request) -> URLSafeSerializer:
    return URLSafeSerializer(request.app.state.csrf_secret, salt="macpacs-csrf")


def _valid(request: Request, token: str) -> bool:
    try:
        _serializer(request).loads(token)
    except BadSignature:
        return False
    return True


def token_for(request: Request) -> str:
    """The page's token: the one in the cookie if it is ours, else a new one (set by ``remember``)."""
    existing = request.cookies.get(CSRF_COOKIE, "")
    if existing and _valid(request, existing):
        return existing
    cached = getattr(request.state, "csrf_new", None)
    if cached is None:
        cached = _serializer(request).dumps(secrets.token_urlsafe(24))
        request.state.csrf_new = cached
    return cached


def remember(request: Request, response: Response) -> None:
    """Set the cookie when ``token_for`` had to make a new token for this page."""
    new = getattr(request.state, "csrf_new", None)
    if new:
        auth = request.app.state.auth
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict", secure=auth.secure, path="/")


def verify(request: Request, submitted: str | None) -> None:
    """Raise 403 unless ``submitted`` (form field or header) is the cookie's signed token."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    submitted = submitted or request.headers.get(CSRF_HEADER, "")
    if not cookie or not submitted or not hmac.compare_digest(cookie, submitted) or not _valid(request, cookie):
        raise HTTPException(
            403,
            "the form's security token is missing or out of date (CSRF check): reload the page and try again",
        )


async def require_csrf_header(request: Request) -> None:
    """Dependency for the JSON endpoints the page scripts call with ``X-CSRF-Token``."""
    verify(request, request.headers.get(CSRF_HEADER))
