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
thread, with blocking ``sendfile`` and ``send`` calls (``_Socket`` says why), so the event loop
keeps serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger(__name__)
SENDFILES = "macpacs.sendfiles"
# A blocked write gives up after this long without progress, to check whether the client went
# away (a sendfile that got part of its file out first can take a few times this to return).
WAIT_S = 1
STALL_S = 300  # a client that takes nothing for this long is dropped
# Holds a part header back to go out with the file after it (Linux); macOS has no such flag.
MSG_MORE = getattr(socket, "MSG_MORE", 0)


def _timeval(seconds: int) -> bytes:
    """A ``struct timeval`` for ``SO_SNDTIMEO`` (two longs where the microseconds are 0: the
    layout on Linux and, with its padding, on macOS)."""
    return struct.pack("ll", seconds, 0)


class _Gone(Exception):
    """The client closed the connection or stopped reading."""


class _Socket:
    """Blocking writes on a duplicate of the loop's socket, for the sending thread.

    The connection is switched to blocking mode for the call and back to non-blocking before the
    loop writes to it again. ``O_NONBLOCK`` belongs to the open file, so the loop's descriptor is
    blocking meanwhile too. The loop only reads from it then, when ``epoll`` says data is there,
    and uvicorn stops reading once a pipelined request's headers are in, so the loop does not
    wait on it. Why blocking: on a non-blocking socket ``sendfile``
    returns each time the send buffer fills, and the thread goes back round Python and ``poll``.
    Measured on this machine with a bare sender process, 500 files (263 MB) over loopback went
    out at 0.53 of the loopback limit that way, against 0.68–0.83 with a blocking ``sendfile``.
    ``SO_SNDTIMEO`` bounds each blocked call, so the thread still notices a closed connection or
    a client that stopped reading.
    """

    def __init__(self, sock: socket.socket, transport: asyncio.Transport) -> None:
        # A duplicate descriptor of the same connection: closed after the call without touching
        # the loop's own descriptor.
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.fd = self.sock.fileno()
        self.transport = transport
        self.stalled = 0.0
        try:
            self.nodelay = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            self.sock.setblocking(True)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(WAIT_S))
        except OSError:  # the connection closed just now: the caller drops the response
            with contextlib.suppress(OSError):
                self.sock.setblocking(False)  # never leave the loop's descriptor blocking
            self.sock.close()
            raise

    def coalesce(self, on: bool) -> None:
        """Let the kernel fill whole segments (Nagle on), or push what it holds and send at once.

        The loop's transports run with ``TCP_NODELAY``. Left on under ``sendfile``, it cost ~16%
        of the throughput and more CPU per byte (263 MB over loopback, this machine: ~2,600
        against ~3,100 MB/s). Turning it back on before the last bytes pushes them out, so the
        response never ends waiting on a delayed ACK.
        """
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0 if on else 1)

    def close(self) -> None:
        """Give the connection back to the loop as it was: non-blocking, no send timeout, its
        ``TCP_NODELAY`` setting."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, self.nodelay)
            self.sock.setblocking(False)
        except OSError:  # the connection is already gone
            pass
        finally:
            self.sock.close()

    def timed_out(self) -> None:
        """A blocked write gave up after ``WAIT_S`` without sending anything."""
        if self.transport.is_closing():
            raise _Gone
        self.stalled += WAIT_S
        if self.stalled >= STALL_S:
            raise _Gone

    def send(self, data: bytes, more: bool) -> None:
        view = memoryview(data)
        flags = MSG_MORE if more else 0
        while view:
            try:
                sent = self.sock.send(view, flags)
            except BlockingIOError:
                self.timed_out()
                continue
            except (BrokenPipeError, ConnectionError):
                raise _Gone from None
            view = view[sent:]
            self.stalled = 0.0

    def sendfile(self, path: str | Path, count: int) -> None:
        offset = 0
        # os.open, not open(): no buffered file object, and none of the fstat/ioctl/lseek that
        # open() adds (~1 ms over a 500-file series, in the sending thread).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while offset < count:
                try:
                    sent = os.sendfile(self.fd, fd, offset, count - offset)
                except BlockingIOError:
                    self.timed_out()
                    continue
                except (BrokenPipeError, ConnectionError):
                    raise _Gone from None
                if sent == 0:
                    raise OSError(f"{path} ended {count - offset} bytes early (changed while being sent?)")
                offset += sent
                self.stalled = 0.0
        finally:
            os.close(fd)


def _send_parts(out: _Socket, parts: list[tuple[bytes, str | Path, int]], trailer: bytes) -> None:
    try:
        out.coalesce(True)
        for prefix, path, count in parts:
            if prefix:
                out.send(prefix, more=True)
            out.sendfile(path, count)
        out.coalesce(False)
        if trailer:
            out.send(trailer, more=False)
    finally:
        out.close()


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
    parts: list[tuple[bytes, str | Path, int]] = message["parts"]
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
