"""An ASGI middleware that refuses request bodies over a size limit with 413, before any route reads them.

A declared Content-Length over the limit is refused at once; a chunked body is read up to the
limit and refused when it goes past. A body within the limit is replayed to the app, and
later messages (the client's `http.disconnect`) pass through, so disconnect detection still works.
Routes listed as exempt (adapter uploads, bounded by max_adapter_bytes as they stream) pass untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lora_serve.api.errors import APIError

def too_large(limit: int) -> APIError:
    message = f"the request body is larger than the server's max_body_bytes ({limit} bytes)"
    return APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, code="body_too_large")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Collection[tuple[str, str]] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = set(exempt)  # (method, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes).to_response()(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(self.max_bytes).to_response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
