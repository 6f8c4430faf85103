"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's line and headers (slowloris).

    uvicorn.Config(app, http=HeaderTimeoutProtocol.with_timeout(20.0))

uvicorn waits for a request's headers as long as the client keeps the connection open: its only
timer, timeout_keep_alive, runs between two requests of a kept-alive connection and stops at the
next request's first byte, so a client sending a header line now and then holds its connection for
ever. Here a timer runs from the connection's opening (and, on a kept-alive connection, from the
next request's first byte) until h11 has parsed the request line and headers; when it fires the
connection is closed, after a 408 in OpenAI's shape if part of a request had come. h11 already
bounds the head's size (16 KiB). The body's pace is body_limit.py's concern.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lora_serve.api.errors import APIError

log = logging.getLogger(__name__)


def _timeout_response(timeout_s: float) -> bytes:
    message = f"the request headers did not arrive within the server's header_timeout_s ({timeout_s} s)"
    body = json.dumps(APIError(HTTPStatus.REQUEST_TIMEOUT, message, code="header_timeout").to_dict()).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 20.0
    _header_timer: asyncio.TimerHandle | None = None
    _head_started = False  # some bytes of the awaited request head have come

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutProtocol]:
        """The protocol class to hand uvicorn (it builds one instance per connection)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request head
            if self._header_timer is None:
                self._arm()  # the next request on a kept-alive connection
            self._head_started = True
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._head_started = False

    def _on_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        log.debug("closing a connection from %s: no request head within %s s", self.client, self.header_timeout_s)
        if self._head_started:
            self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()
