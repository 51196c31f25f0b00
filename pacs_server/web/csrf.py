"""CSRF protection for the browser pages: a token bound to the session.

The session cookie is sent by the browser with any request to this host (a page on another port
of the same host counts as the same site, so SameSite does not stop it), and a form on another
site could otherwise make a logged-in admin register a node or log out. Every page puts a token
in its forms (hidden ``csrf_token`` field) and in ``<meta name="csrf-token">``, which the page
scripts send back as the ``X-CSRF-Token`` header. The token is an HMAC, under the app's secret,
of what identifies the browser:

- logged in: the session's token, so it is worthless to anyone without that session and ends
  with it (logout, a new password, the user removed);
- not logged in (the login and registration forms): a random ``macpacs_csrf`` cookie
  (HttpOnly, SameSite=Strict) set by the page.

A state-changing request is accepted only when the token it carries is the one for its own
session or cookie. A site that plants a cookie of its choosing (from another port of the same
host, or a sibling subdomain) still cannot compute the HMAC.
"""

from __future__ import annotations

import hmac
import re
import secrets

from fastapi import HTTPException, Request, Response

CSRF_COOKIE = "macpacs_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def _token(request: Request, binding: str) -> str:
    return hmac.new(request.app.state.csrf_secret, binding.encode(), "sha256").hexdigest()


def _binding(request: Request, create: bool) -> str | None:
    """What the token is bound to: the session, else the browser's cookie (made when ``create``)."""
    session = request.app.state.auth.session(request)
    if session is not None:
        return "session:" + session.token
    browser = request.cookies.get(CSRF_COOKIE, "")
    if not _BROWSER_ID.match(browser):
        if not create:
            return None
        browser = request.scope.setdefault("state", {}).get("csrf_new") or secrets.token_urlsafe(32)
        request.scope["state"]["csrf_new"] = browser
    return "browser:" + browser


def token_for(request: Request) -> str:
    """The page's token (``remember`` sets the browser cookie when one had to be made)."""
    binding = _binding(request, create=True)
    assert binding is not None
    return _token(request, binding)


def remember(request: Request, response: Response) -> None:
    """Set the browser cookie when ``token_for`` had to make one for this page."""
    new = request.scope.get("state", {}).get("csrf_new")
    if new:
        secure = request.app.state.auth.secure(request)
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict", secure=secure, path="/")


def verify(request: Request, submitted: str | None) -> None:
    """Raise 403 unless ``submitted`` (form field, else header) is this session's or browser's token."""
    submitted = submitted or request.headers.get(CSRF_HEADER, "")
    binding = _binding(request, create=False)
    expected = _token(request, binding).encode() if binding is not None else b""
    if not submitted or not expected or not hmac.compare_digest(submitted.encode("utf-8", "replace"), expected):
        raise HTTPException(
            403,
            "the form's security token is missing or out of date (CSRF check): reload the page and try again",
        )


def require_csrf_header(request: Request) -> None:
    """Dependency for the JSON endpoints the page scripts call with ``X-CSRF-Token`` (run in a
    worker thread: finding the session reads the index)."""
    verify(request, request.headers.get(CSRF_HEADER))
