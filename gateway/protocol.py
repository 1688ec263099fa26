"""The HTTP/1.1 protocol ``gateway serve`` runs: uvicorn's httptools protocol, with the limits
it lacks on its own.

uvicorn (httptools, llhttp) puts no bound on the size of a request's line and headers (ten
requests with 30 MB headers were all buffered) and no time limit on a request that is still
arriving: a connection that sends nothing, or a head or body one byte at a time, stays open for
ever. This protocol adds, per connection (values from ``[server]`` in the config):

- ``max_header_bytes``: a request line plus headers (the query string included) larger than this
  is answered 431 and the connection closed, at most one network read past the limit: nothing
  larger is ever buffered.
- ``header_timeout_seconds``: a request's line and headers must arrive within this time of its
  first byte, and a new connection (or one idle after a response) must start one within it;
  else 408 (or a plain close when nothing was sent).
- ``body_timeout_seconds``: the body must arrive within this time of the headers. The postback
  route answers 408 itself when its body is late (``gateway.app``); this is the backstop for
  every route, a few seconds later: 408 if nothing was answered yet, else the connection closes.

Refusals are JSON like every other error, ``Connection: close``; the connection then reads and
drops what the client still sends for a moment (a "lingering close", as nginx does), so the
client reads the answer instead of a connection reset. Malformed requests (llhttp is strict:
CR or LF alone, NUL or other control characters in a header, obsolete line folding) are answered
400 in the same way. Everything else is uvicorn's own behaviour.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.config import ConfigError, ServerConfig, load_config

log = logging.getLogger("gateway.http")

#: The protocol's backstop for a late body fires this long after the postback route's own.
BODY_BACKSTOP_GRACE_S = 2.0

#: After a refusal, what the client still sends is read and dropped for at most this long, or
#: this many bytes, before the connection closes (so it reads the answer, not a reset).
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024


@functools.cache
def server_limits() -> ServerConfig:
    """The ``[server]`` settings of this process's config, read once, at its first connection
    (each worker reads its own; changing them needs a restart, like the rest of ``[server]``).
    A config file broken since the start (the running gateway keeps its config) gives the
    defaults rather than a protocol that cannot serve."""
    try:
        return load_config().server
    except ConfigError as exc:
        log.warning("protocol limits: %s; using the defaults", exc)
        return ServerConfig()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; answered by :meth:`send_400_response`."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = server_limits()
        self.max_header_bytes = limits.max_header_bytes
        self.header_timeout = limits.header_timeout_seconds
        self.body_timeout = limits.body_timeout_seconds + BODY_BACKSTOP_GRACE_S
        self._deadline: asyncio.TimerHandle | None = None
        self._in_message = False  # from a request's first byte to the end of its body
        self._in_head = False  # from a request's first byte to the end of its headers
        self._head_bytes = 0
        self._begun = 0  # requests begun during the current data_received
        self._refusal: tuple[int, str, str] | None = None
        self._lingering = -1  # bytes dropped since a refusal; -1 until there is one

    # -- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:  # refused: drop what still arrives, for a while
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        idle, continuing = not self._in_message, self._in_head
        self._begun = 0
        super().data_received(data)
        if self.transport.is_closing() or self._lingering >= 0 or not self._in_head:
            return
        # The headers are still incomplete after this read: count what they took so far.
        if continuing and not self._begun:
            self._head_bytes += len(data)
        elif idle and self._begun == 1:
            self._head_bytes = len(data)
        # else a pipelined request began inside this read: its share is not known here; it is
        # at most one read, and on_headers_complete checks the exact size.
        if self._head_bytes > self.max_header_bytes:
            self._refuse(431, *self._too_large())

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_head = True
        self._head_bytes = 0
        self._begun += 1
        self._arm(self.header_timeout, self._head_late)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._refusal = (431, *self._too_large())
            raise _Refused
        self._in_head = False
        self._arm(self.body_timeout, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_message:
            # Waiting for the next request: uvicorn closes an idle connection after
            # timeout_keep_alive, but any byte (even a stray CRLF) resets that; this does not.
            self._arm(self.header_timeout, self._head_late)

    def _unsupported_upgrade_warning(self) -> None:
        """``Upgrade:`` requests (WebSocket, h2c) are served as plain HTTP/1.1: the gateway has
        no WebSocket route (uvicorn runs with ``ws="none"``), so no advice to install one."""
        log.debug("Upgrade header ignored: served as HTTP/1.1")

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for every request the parser refuses (and for ``_Refused``)."""
        status, error, reason = self._refusal or (400, "bad_request", "malformed HTTP request")
        self._refuse(status, error, reason)

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a response is on its way: close after it
        elif self._in_message:
            seconds = f"{self.header_timeout:g}"
            reason = f"request line and headers not received within {seconds} s"
            self._refuse(408, "request_timeout", reason)
        else:
            self.transport.close()  # idle: nothing to answer

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not self._in_message:
            return
        if not cycle.response_started:
            # The app is still waiting for the body: it gets a disconnect, the client a 408.
            seconds = f"{self.body_timeout:g}"
            self._refuse(408, "request_timeout", f"request body not received within {seconds} s")
        elif cycle.response_complete:
            self.transport.close()  # answered already; the rest of the body is not wanted
        else:
            cycle.keep_alive = False

    # -- refusing ---------------------------------------------------------------------------

    def _too_large(self) -> tuple[str, str]:
        return (
            "request_header_fields_too_large",
            f"request line and headers larger than {self.max_header_bytes} bytes",
        )

    def _refuse(self, status: int, error: str, reason: str) -> None:
        """Answer ``status`` with the JSON error shape, then close after a lingering read."""
        self._disarm()
        if self.transport.is_closing() or self._lingering >= 0:  # closed, or refused already
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app is still at work on this request (its body is refused or late), or on an
            # earlier one while this one's head is refused. Either way the app's answer is
            # dropped: it sees a disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started or self._in_head:
                # Part of a response is out, or an earlier request's answer is due first:
                # nothing can be written in between, so the connection just closes.
                self.transport.close()
                return
        log.info("refused request: %s %s", status, reason)
        body = b'{"status":"error","error":"%s","reason":"%s"}' % (
            error.encode("ascii"),
            reason.encode("ascii"),
        )
        lines = [f"HTTP/1.1 {status} {_PHRASES[status]}".encode("ascii")]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self._lingering = 0
        try:
            self.transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):  # TLS transports cannot half-close
            self.transport.close()
            return
        self.loop.call_later(LINGER_S, self.transport.close)


_PHRASES = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
