"""Run an Exchange on the engine: gathered into one response, or streamed as server-sent events.

A request that loses its client is aborted at once, not at the next failed send:
generation is raced against the ASGI `http.disconnect` message, so the sequence's KV
blocks are freed even while it is queued or between streamed chunks. The same race
enforces request_timeout_s, and admission.py bounds the requests waiting for the engine.
Without an HTTP request (a Ray Serve replica) there is no disconnect to watch: the caller
cancels instead, which aborts the sequence the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lora_serve.api.errors import SERVER_ERROR, APIError, from_adapter_error, invalid_param
from lora_serve.api.exchange import Completion, Exchange, R
from lora_serve.api.prepared_request import PreparedRequest
from lora_serve.api.state import ServerState
from lora_serve.engine.outputs import RequestOutput
from lora_serve.lora.composition import COMPOSED_LABEL, Composition
from lora_serve.lora.errors import AdapterError

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or none, until the response ends).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, out.error or "generation failed", SERVER_ERROR)
    if out.finish_reason == "abort":
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, out.error or "request aborted by the server", SERVER_ERROR)


async def generate(request: Request | None, state: ServerState, prep: PreparedRequest) -> AsyncGenerator[RequestOutput, None]:
    """The engine's deltas for every choice of one request, interleaved, raced against the client's disconnect
    and the deadline.

    Admission comes first (429 when the wait queue is full; the choices count as that many requests). Each
    delta is awaited as a task beside a disconnect watcher; when the client goes first (499) or the deadline
    passes (504), that task is cancelled, which closes the engine's stream and so aborts every choice.
    """
    if request is not None:  # for the access log: a composition as 'a*0.7+b*0.5'
        request.state.model = prep.model
        request.state.adapter = prep.lora_name.label if isinstance(prep.lora_name, Composition) else prep.lora_name
    metrics_label = COMPOSED_LABEL if isinstance(prep.lora_name, Composition) else prep.lora_name  # one series for all compositions
    start = time.perf_counter()
    first: dict[str, float] = {}  # engine request id -> when its first token came
    num_output: dict[str, int] = {}  # engine request id -> tokens generated so far
    with state.admission.admit(state.engine.num_running(), len(prep.choices)) as deadline:
        outputs = state.engine.generate_many(prep.engine_requests(), lora_name=prep.lora_name)
        loop = asyncio.get_running_loop()
        disconnected = loop.create_task(_wait_for_disconnect(request)) if request else loop.create_future()
        next_out: asyncio.Future[RequestOutput] | None = None
        try:
            while True:
                next_out = asyncio.ensure_future(anext(outputs))
                waiting = {next_out, disconnected}
                await asyncio.wait(waiting, timeout=deadline.remaining(), return_when=asyncio.FIRST_COMPLETED)
                if not next_out.done() and disconnected.done():
                    raise APIError(CLIENT_CLOSED_REQUEST, "client disconnected")
                if not next_out.done():
                    raise deadline.expired()
                out = _result(next_out)
                if out is None:
                    return
                num_output[out.request_id] = out.num_output_tokens
                if request is not None:
                    request.state.usage = (prep.num_prompt_tokens, sum(num_output.values()))
                now = time.perf_counter()
                first.setdefault(out.request_id, now)
                if out.finished:
                    state.metrics.observe(metrics_label, start, first[out.request_id], now, out, prep.counts_prompt(out.request_id))
                yield out
        finally:
            disconnected.cancel()
            if next_out is not None and not next_out.done():
                next_out.cancel()  # raises inside the engine's stream, whose cleanup aborts every choice
                await asyncio.wait({next_out})
            await outputs.aclose()


def _result(next_out: asyncio.Future[RequestOutput]) -> RequestOutput | None:
    """The delta, None at the end of the stream; engine refusals and failures become APIErrors."""
    try:
        out = next_out.result()
    except StopAsyncIteration:
        return None
    except AdapterError as exc:  # unknown, deleted meanwhile, or unreadable adapter
        raise from_adapter_error(exc) from exc
    except ValueError as exc:  # refused by the engine
        raise invalid_param(None, str(exc)) from exc
    except RuntimeError as exc:
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), SERVER_ERROR) from exc
    _raise_if_failed(out)
    return out


async def generate_all(request: Request | None, state: ServerState, prep: PreparedRequest) -> list[Completion]:
    """Every choice, whole, in index order."""
    dones = [Completion() for _ in prep.choices]
    texts: list[list[str]] = [[] for _ in prep.choices]
    async with aclosing(generate(request, state, prep)) as outputs:
        async for out in outputs:
            index = prep.index_of[out.request_id]
            done = dones[index]
            texts[index].append(out.new_text)
            done.token_ids.extend(out.new_token_ids)
            done.logprobs.extend(out.new_logprobs)
            if out.prompt_logprobs is not None:
                done.prompt_logprobs = out.prompt_logprobs
            done.finish_reason = out.finish_reason
            done.num_prompt_tokens = out.num_prompt_tokens
            done.num_output_tokens = out.num_output_tokens
            done.num_cached_tokens = out.num_cached_tokens
    for done, parts in zip(dones, texts):
        done.text = "".join(parts)
    return dones


async def respond(request: Request, exchange: Exchange[R]) -> R | StreamingResponse:
    """The HTTP response of a chat or completions route: the whole JSON body, or the SSE stream."""
    if exchange.req.stream:
        return event_stream_response(await sse_events(request, exchange))
    return exchange.response(await generate_all(request, exchange.state, exchange.prep))


def event_stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def sse_events(request: Request | None, exchange: Exchange) -> AsyncGenerator[str, None]:
    """The stream's events: `first_chunks`, a chunk per engine delta of any choice (None: none), the usage
    chunk once, if asked for, then `data: [DONE]`.

    Awaits the engine's first delta before returning, so that a request the engine refuses
    (unknown adapter, no room) raises APIError here and still gets a real HTTP error status;
    a failure after that is sent as an error event, then [DONE].
    """
    outputs = generate(request, exchange.state, exchange.prep)
    first = await anext(outputs)
    return _events(exchange, outputs, first)


async def _events(exchange: Exchange, outputs: AsyncGenerator[RequestOutput, None], first: RequestOutput) -> AsyncGenerator[str, None]:
    counts: dict[int, tuple[int, int]] = {}  # choice index -> (tokens generated so far, prompt tokens cached)

    def count(out: RequestOutput) -> RequestOutput:
        counts[exchange.prep.index_of[out.request_id]] = (out.num_output_tokens, out.num_cached_tokens)
        return out

    def event(payload: BaseModel) -> str:
        if exchange.req.continuous_usage:  # vLLM's continuous_usage_stats: every chunk carries the usage so far
            payload = payload.model_copy(update={"usage": exchange.usage(counts)})
        return _sse(payload)

    async with aclosing(outputs):
        try:
            for head in exchange.first_chunks():
                yield event(head)
            out: RequestOutput | None = first
            while out is not None:
                payload = exchange.chunk(count(out))
                if payload is not None:
                    yield event(payload)
                out = await anext(outputs, None)
            if exchange.req.include_usage:
                yield _sse(exchange.usage_chunk(counts))
        except APIError as err:
            yield _sse(err.to_dict())
    yield "data: [DONE]\n\n"


def _sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"
