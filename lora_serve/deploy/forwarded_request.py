"""An HTTP request carried from the Ray ingress to a replica, and its response from an ASGI app there.

    request = ForwardedRequest.of(scope, body)      # ingress: the request's plain fields (picklable)
    async for part in app_response(app, request):   # replica: (status, headers) first, then body chunks
        ...

The replica runs the server's own app (api/server.py) on it as uvicorn would, but in process:
one `http.request` message with the whole body, the response's messages relayed as they are
sent (a stream event by event). A caller that stops reading (the ingress cancels the call when
its client leaves) closes the generator, which cancels the app's task: generation.py aborts the
sequence on that cancellation as on a disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Scope

Headers = list[tuple[bytes, bytes]]
ResponseStart = tuple[int, Headers]  # status, headers

# What a replica needs of the ingress's HTTP scope: plain values, none of Ray's or the proxy's objects.
SCOPE_FIELDS = ("http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string", "headers", "client", "server")


@dataclass(frozen=True)
class ForwardedRequest:
    fields: dict[str, Any]  # SCOPE_FIELDS of the scope the ingress got
    body: bytes

    @classmethod
    def of(cls, scope: Scope, body: bytes) -> ForwardedRequest:
        return cls({key: scope[key] for key in SCOPE_FIELDS if key in scope}, body)

    @property
    def method(self) -> str:
        return self.fields["method"]

    @property
    def path(self) -> str:
        return self.fields["path"]

    def scope(self) -> Scope:
        return {"type": "http", "asgi": {"version": "3.0"}, **self.fields}


async def app_response(app: ASGIApp, request: ForwardedRequest) -> AsyncGenerator[ResponseStart | bytes, None]:
    """The app's response to `request`: its status and headers, then each non-empty body chunk."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()  # None: the app returned
    unread: list[Message] = [{"type": "http.request", "body": request.body, "more_body": False}]
    closed = asyncio.Event()

    async def receive() -> Message:
        if unread:
            return unread.pop()
        await closed.wait()  # after the body the app only listens for the client leaving
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, sent.put)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    complete = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                complete = not message.get("more_body", False)
        try:
            await task
        except Exception:
            if not complete:
                raise
            # Starlette re-raises an error once its 500 is sent (errors.py logged it); that response stands.
    finally:
        closed.set()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
