"""app_response: a FastAPI app answering a ForwardedRequest in process (what a Ray replica does), no Ray needed.

httpx's own ASGI client is the reference for a whole reply; a stream must come chunk by chunk,
and a caller that stops reading must cancel the app's work.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lora_serve.deploy.forwarded_request import ForwardedRequest, app_response


def make_app(left: asyncio.Event) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request, x: int = 0) -> JSONResponse:
        body = {"body": (await request.body()).decode(), "x": x, "key": request.headers["authorization"]}
        return JSONResponse(body, status_code=201, headers={"x-extra": "1"})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                await asyncio.Event().wait()  # until cancelled
            finally:
                left.set()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def forwarded(method: str, path: str, query: bytes = b"", body: bytes = b"") -> ForwardedRequest:
    headers = [(b"host", b"test"), (b"authorization", b"Bearer k"), (b"content-length", str(len(body)).encode())]
    scope = {"method": method, "path": path, "raw_path": path.encode(), "query_string": query, "headers": headers}
    return ForwardedRequest.of({**scope, "http_version": "1.1", "scheme": "http", "root_path": "", "type": "http"}, body)


async def collect(parts: AsyncIterator) -> tuple[int, list, bytes]:
    (status, headers), *chunks = [part async for part in parts]
    return status, headers, b"".join(chunks)


def test_a_reply_is_what_an_asgi_client_gets() -> None:
    async def main() -> None:
        app = make_app(asyncio.Event())
        status, headers, body = await collect(app_response(app, forwarded("POST", "/echo", b"x=3", b"hello")))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            want = await client.post("/echo?x=3", content=b"hello", headers={"authorization": "Bearer k"})
        assert (status, body) == (want.status_code, want.content) == (201, b'{"body":"hello","x":3,"key":"Bearer k"}')
        assert headers == want.headers.raw

    asyncio.run(main())


def test_a_stream_comes_chunk_by_chunk_and_a_caller_that_stops_cancels_the_app() -> None:
    async def main() -> None:
        left = asyncio.Event()
        parts = app_response(make_app(left), forwarded("GET", "/stream"))
        assert (await anext(parts))[0] == 200
        assert await anext(parts) == b"first"  # while the app is still running
        await parts.aclose()
        await asyncio.wait_for(left.wait(), 5)

    asyncio.run(main())


def test_an_app_error_is_its_500_reply() -> None:
    # Starlette sends the 500, then re-raises the error for the server to log: the reply stands.
    status, _, body = asyncio.run(collect(app_response(make_app(asyncio.Event()), forwarded("GET", "/boom"))))
    assert (status, body) == (500, b"Internal Server Error")
