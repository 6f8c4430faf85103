"""An ASGI middleware that refuses request bodies over a size limit (413) or too slow to arrive (408).

A declared Content-Length over the limit is refused at once; a chunked body is read up to the
limit and refused when it goes past. A body within the limit is replayed to the app, and
later messages (the client's `http.disconnect`) pass through, so disconnect detection still works.
Routes listed as exempt (adapter uploads, bounded by max_adapter_bytes as they stream) get the
body as it streams, with only the timeout applied.

Timeout: each read of the body must bring its next piece within timeout_s, or the request gets
408 (code "body_timeout") and the connection is closed. A client that stalls mid-body therefore
holds nothing for long: no worker thread is involved while a body streams in (an upload reaches a
worker thread only once whole, to be validated and stored), only its connection, which this frees.
Reads after the body (waiting for the client's disconnect) are not timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lora_serve.api.errors import APIError


def too_large(limit: int) -> APIError:
    message = f"the request body is larger than the server's max_body_bytes ({limit} bytes)"
    return APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, code="body_too_large")


def too_slow(timeout_s: float) -> APIError:
    message = f"the request body did not arrive: nothing came for the server's body_timeout_s ({timeout_s} s)"
    return APIError(HTTPStatus.REQUEST_TIMEOUT, message, code="body_timeout", headers={"Connection": "close"})


class BodyLimit:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        exempt: Collection[tuple[str, str]] = (),
        timeout_s: float | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = set(exempt)  # (method, path)
        self.timeout_s = timeout_s  # None: wait as long as the client keeps the connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.timeout_s is not None:
            receive = _timed(receive, self.timeout_s)  # raises too_slow(): a route answers it as any APIError
        if (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes).to_response()(scope, receive, send)
            return
        body = bytearray()
        while True:
            try:
                message = await receive()
            except APIError as exc:
                await exc.to_response()(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(self.max_bytes).to_response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _timed(receive: Receive, timeout_s: float) -> Receive:
    """`receive`, raising too_slow() when a piece of the body takes longer than timeout_s; untimed after the body."""
    body_done = False

    async def timed() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            body_done = True  # the 408's own reads of the request must not time out again
            raise too_slow(timeout_s) from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
