"""Sending stored files with ``sendfile(2)`` from uvicorn: a small ASGI extension, ``macpacs.sendfiles``.

uvicorn can only write bytes objects: a whole-series retrieval then reads every file into
memory, joins it with the part headers and hands it to the event loop, which copies what the
socket does not take at once into its own buffer. That is three copies in Python per byte and
kept the series near 0.3 of the loopback limit. ``sendfile(2)`` hands the page cache to the
socket in the kernel instead.

``ZeroCopyProtocol`` is uvicorn's ``HttpToolsProtocol`` (passed as ``http=`` in
``uvicorn.Config``) that adds, on plain-TCP connections, an extension modelled on the ASGI
spec's ``http.response.zerocopy`` but taking many files at once (a series is hundreds of small
files: one call for all of them instead of one per file)::

    scope["extensions"]["macpacs.sendfiles"] == {}
    await send({"type": "macpacs.sendfiles", "parts": [(prefix, path, count), ...],
                "trailer": b"...", "more_body": False})

Each part is ``prefix`` bytes (a multipart header) then the first ``count`` bytes of the file at
``path``; ``trailer`` follows the last part. The bytes count towards the response's
Content-Length (or are framed as one chunk), exactly as ``http.response.body`` messages would.
Over TLS the extension is not offered (the kernel would send the file past the TLS layer,
unencrypted), and callers fall back to body messages.

How the socket is shared with the event loop: the transport's write buffer is empty first (the
response headers went out), and nothing else writes to the connection while its one response is
in flight, so the kernel socket is the sender's for the call. The whole list is sent by one
worker thread (``sendfile`` and ``send`` on the non-blocking socket, ``poll`` when it is full),
so the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import threading
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("macpacs.web")
SENDFILES = "macpacs.sendfiles"
POLL_MS = 1000  # a waiting thread re-checks this often whether the client went away
STALL_S = 300.0  # a client that takes nothing for this long is dropped


class _Gone(Exception):
    """The client closed the connection or stopped reading."""


class _Socket:
    """Blocking-style writes on the loop's non-blocking socket, for a worker thread."""

    def __init__(self, sock: socket.socket, transport: asyncio.Transport) -> None:
        # A duplicate descriptor of the same connection: a socket object for send(MSG_MORE),
        # closed after the call without touching the loop's own descriptor.
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.fd = self.sock.fileno()
        self.transport = transport
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLOUT)

    def wait(self) -> None:
        stalled = 0.0
        while True:
            if self.transport.is_closing():
                raise _Gone
            events = self.poller.poll(POLL_MS)
            if any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _fd, mask in events):
                raise _Gone
            if events:
                return
            stalled += POLL_MS / 1000
            if stalled >= STALL_S:
                raise _Gone

    def send(self, data: bytes, more: bool) -> None:
        view = memoryview(data)
        flags = socket.MSG_MORE if more else 0
        while view:
            try:
                view = view[self.sock.send(view, flags) :]
            except BlockingIOError:
                self.wait()
            except (BrokenPipeError, ConnectionError):
                raise _Gone from None

    def sendfile(self, path: Path, count: int) -> None:
        offset = 0
        with open(path, "rb") as fh:
            while offset < count:
                try:
                    sent = os.sendfile(self.fd, fh.fileno(), offset, count - offset)
                except BlockingIOError:
                    self.wait()
                    continue
                except (BrokenPipeError, ConnectionError):
                    raise _Gone from None
                if sent == 0:
                    raise OSError(f"{path} ended {count - offset} bytes early (changed while being sent?)")
                offset += sent


def _send_parts(out: _Socket, parts: list[tuple[bytes, Path, int]], trailer: bytes) -> None:
    try:
        for prefix, path, count in parts:
            if prefix:
                out.send(prefix, more=True)
            out.sendfile(path, count)
        if trailer:
            out.send(trailer, more=False)
    finally:
        out.sock.close()


async def _in_thread(func: Any, *args: Any) -> None:
    """Run ``func`` in a daemon thread of its own and wait for it.

    Not the loop's executor: a few slow downloads must not hold up the short requests (frames)
    that use it, and a sender still waiting on a client must never delay the process's exit
    (executor threads are joined at exit; a daemon thread is not). A thread per response costs
    ~0.1 ms, nothing next to a series.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(exc: BaseException | None) -> None:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def run() -> None:
        exc: BaseException | None = None
        try:
            func(*args)
        except BaseException as error:  # handed to the awaiting task, which handles or logs it
            exc = error
        with contextlib.suppress(RuntimeError):  # the loop has closed (server stopping): nobody waits
            loop.call_soon_threadsafe(finish, exc)

    threading.Thread(target=run, name="web-sendfile", daemon=True).start()
    await done


async def _sendfiles(cycle: RequestResponseCycle, original: Any, message: dict[str, Any]) -> None:
    """``cycle.send`` that also takes ``macpacs.sendfiles`` messages."""
    if message["type"] != SENDFILES:
        await original(message)
        return
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"'{SENDFILES}' is only valid after http.response.start, before the body ends")
    if cycle.disconnected:
        return
    parts: list[tuple[bytes, Path, int]] = message["parts"]
    trailer: bytes = message.get("trailer", b"")
    total = sum(len(prefix) + count for prefix, _path, count in parts) + len(trailer)
    if cycle.scope["method"] != "HEAD" and total:
        if cycle.chunked_encoding:
            cycle.transport.write(b"%x\r\n" % total)
        elif total > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        transport = cycle.transport
        while transport.get_write_buffer_size():  # response headers still queued in the loop
            if transport.is_closing():
                cycle.disconnected = True
                return
            await asyncio.sleep(0.0005)
        try:
            out = _Socket(transport.get_extra_info("socket"), transport)
        except OSError:  # the connection closed just now
            cycle.disconnected = True
            return
        try:
            await _in_thread(_send_parts, out, parts, trailer)
        except _Gone:
            cycle.disconnected = True
            transport.close()
            return
        except OSError as exc:  # a file gone or changed since its size was taken: cut the response
            log.error("response to %s cut short (the client sees it incomplete): %s", cycle.scope["path"], exc)
            cycle.disconnected = True
            transport.close()
            return
        if cycle.chunked_encoding:
            transport.write(b"\r\n")
        else:
            cycle.expected_content_length -= total
    if not message.get("more_body", False):
        await original({"type": "http.response.body", "body": b"", "more_body": False})


class ZeroCopyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering ``macpacs.sendfiles`` on plain TCP connections."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope or self.transport.get_extra_info("sslcontext") is not None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        # The ASGI task has been created but not run yet: it looks up cycle.send when it starts.
        original = cycle.send

        async def send(message: Any) -> None:
            await _sendfiles(cycle, original, message)

        cycle.send = send  # type: ignore[method-assign]
        self.scope.setdefault("extensions", {})[SENDFILES] = {}
