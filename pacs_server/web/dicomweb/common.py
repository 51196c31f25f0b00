"""Pieces shared by QIDO-RS, WADO-RS and STOW-RS: DICOM JSON values, URLs, Accept parsing."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from pydicom.datadict import dictionary_VR, tag_for_keyword

from ..auth import link_host

DICOM_JSON = "application/dicom+json"
_NUMERIC_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"DS", "FL", "FD"}


def base_url(request: Request) -> str:
    """``http(s)://host:port/dicom-web`` for links in answers (RetrieveURL, BulkDataURI).

    ``web.public_url`` when set (behind a reverse proxy); otherwise as the client reached us,
    when its Host header names this server, else the address the connection arrived on
    (``auth.link_host``: a page that reached us through DNS rebinding gets no link to its own
    name). Some clients (dicomweb-client) send a Host header without the port: the port we
    listen on is added then, so that links work.
    """
    public = request.app.state.archive.settings.web.public_url
    if public:
        return public.rstrip("/") + "/dicom-web"
    url = request.base_url.replace(netloc=link_host(request))
    server = request.scope.get("server")
    if url.port is None and server and server[1] not in (80, 443):
        url = url.replace(port=server[1])
    return str(url).rstrip("/") + "/dicom-web"


def warning_header(messages: Iterable[str], limit: int = 4000) -> str:
    """A ``Warning`` header value (code 299, one per message) that no message can break.

    Messages quote what clients sent (a keyword, a UID read from an uploaded file), and a CR or
    LF in a header ends it: the server would then send no response at all. So every character
    outside printable ASCII becomes ``?`` and quotes and backslashes are escaped; messages that
    do not fit in ``limit`` characters are left out whole, never cut inside their quotes.
    """
    parts: list[str] = []
    length = 0
    for message in messages:
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in message[:limit])
        part = '299 macpacs "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if parts and length + 2 + len(part) > limit:
            break
        parts.append(part)
        length += len(part) + 2
    return ", ".join(parts)


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def json_element(keyword: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON element (PS3.18 F.2) from an index value; empty values carry no Value."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    element: dict[str, Any] = {"vr": vr}
    if value is None or value == "":
        return element
    if vr == "PN":
        element["Value"] = [{"Alphabetic": str(v)} for v in str(value).split("\\")]
    elif vr in _NUMERIC_VRS:
        element["Value"] = [int(v) for v in str(value).split("\\") if v.strip().lstrip("-").isdigit()]
    elif vr in _FLOAT_VRS:
        values = []
        for v in str(value).split("\\"):
            try:
                number = float(v)
            except ValueError:
                continue
            values.append(int(number) if number.is_integer() else number)
        element["Value"] = values
    else:
        element["Value"] = str(value).split("\\")
    if not element["Value"]:
        del element["Value"]
    return element


@dataclass
class MediaRange:
    """One entry of an Accept header: ``multipart/related; type="application/dicom"; transfer-syntax=*``."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def part_type(self) -> str:
        """The type of each part: the ``type`` parameter of multipart/related, else the type itself."""
        if self.media_type == "multipart/related":
            return self.params.get("type", "").lower()
        return self.media_type

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("([^"]*)"|[^;,]*)')


def parse_accept(request: Request) -> list[MediaRange]:
    """The Accept header's media ranges in order (quality values ignored); ``*/*`` when absent."""
    header = request.headers.get("accept", "").strip() or "*/*"
    ranges = []
    for item in _split_accept(header):
        media, _, rest = item.partition(";")
        params = {}
        for match in _PARAM_RE.finditer(";" + rest):
            params[match.group(1).lower()] = (match.group(3) if match.group(3) is not None else match.group(2)).strip()
        ranges.append(MediaRange(media.strip().lower(), params))
    return ranges


def _split_accept(header: str) -> list[str]:
    """Split on commas outside quotes (a ``type`` parameter is quoted and may hold none, but be safe)."""
    parts, current, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def not_acceptable(what: str, offered: str) -> HTTPException:
    return HTTPException(406, f"cannot answer with {what}; this resource offers {offered}")
