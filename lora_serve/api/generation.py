"""Shared by chat and completions: check a request against the model, run it, stream it as SSE.

A request that loses its client is aborted at once, not at the next failed send:
generation is raced against the ASGI `http.disconnect` message, so the sequence's KV
blocks are freed even while it is queued or between streamed chunks. The same race
enforces request_timeout_s, and admission.py bounds the requests waiting for the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lora_serve.api.errors import SERVER_ERROR, APIError, from_adapter_error, invalid_param
from lora_serve.api.limits import check_limits
from lora_serve.api.protocol import SamplingRequest
from lora_serve.api.state import ServerState
from lora_serve.api.tenants import OPEN, Principal
from lora_serve.engine.outputs import RequestOutput, TokenLogprob
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.errors import AdapterError

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response
SAMPLING_EPS = 1e-6  # smaller than any top-token probability for vocabularies under a million


@dataclass
class PreparedRequest:
    request_id: str
    model: str  # echoed in responses
    lora_name: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Completion:
    """A whole non-streamed generation, gathered from the engine's deltas."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


def prepare(
    state: ServerState,
    req: SamplingRequest,
    *,
    id_prefix: str,
    prompt_token_ids: list[int],
    prompt_param: str,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: bool,
    top_logprobs: int,
    top_logprobs_param: str = "top_logprobs",
    viewer: Principal = OPEN,
) -> PreparedRequest:
    """Resolve the model and check lengths; raises APIError naming the param at fault."""
    if not state.engine.is_healthy:  # checked here, before a stream's 200 goes out
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine is not healthy", SERVER_ERROR)
    lora_name = state.models.resolve(req.model, viewer)
    max_len = state.engine.max_model_len
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise invalid_param(prompt_param, "the prompt is empty")
    vocab_size = len(state.engine.tokenizer)
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise invalid_param(prompt_param, f"token ids must be in [0, {vocab_size})")
    if num_prompt >= max_len:
        raise invalid_param(
            prompt_param,
            f"This model's maximum context length is {max_len} tokens; your {prompt_param} has "
            f"{num_prompt} tokens, leaving no room for a completion.",
            code="context_length_exceeded",
        )
    check_limits(
        state.config,
        num_prompt=num_prompt,
        prompt_param=prompt_param,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        stops=req.stop_list,
        top_logprobs=top_logprobs,
        top_logprobs_param=top_logprobs_param,
    )
    if max_tokens is None:
        max_tokens = min(max_len - num_prompt, state.config.max_tokens_limit or max_len)
    elif num_prompt + max_tokens > max_len:
        raise invalid_param(
            max_tokens_param,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the {prompt_param}, {max_tokens} for the "
            f"completion). Please reduce the length of the {prompt_param} or {max_tokens_param}.",
            code="context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        # Below SAMPLING_EPS a temperature overflows logits / T and a top_p rounds to 0 in float32,
        # either making NaN probabilities: treat them as greedy and as "the top token only".
        temperature=req.temperature if req.temperature >= SAMPLING_EPS else 0.0,
        top_p=max(req.top_p, SAMPLING_EPS),
        top_k=max(req.top_k, 0),
        seed=req.seed,
        stop=req.stop_list,
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return PreparedRequest(
        request_id=f"{id_prefix}-{uuid.uuid4().hex}",
        model=req.model or state.models.base_name,
        lora_name=lora_name,
        prompt_token_ids=prompt_token_ids,
        params=params,
    )


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or none, until the response ends).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, out.error or "generation failed", SERVER_ERROR)
    if out.finish_reason == "abort":
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, out.error or "request aborted by the server", SERVER_ERROR)


async def generate(request: Request, state: ServerState, prep: PreparedRequest) -> AsyncIterator[RequestOutput]:
    """The engine's deltas for one request, raced against the client's disconnect and the deadline.

    Admission comes first (429 when the wait queue is full). Each delta is awaited as a task
    beside a disconnect watcher; when the client goes first (499) or the deadline passes (504),
    that task is cancelled, which closes the engine's stream and so aborts the sequence.
    """
    request.state.model, request.state.adapter = prep.model, prep.lora_name  # for the access log
    start, first = time.perf_counter(), None
    with state.admission.admit(state.engine.num_running()) as deadline:
        outputs = state.engine.generate(prep.request_id, prep.prompt_token_ids, prep.params, lora_name=prep.lora_name)
        disconnected = asyncio.create_task(_wait_for_disconnect(request))
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
                request.state.usage = (out.num_prompt_tokens, out.num_output_tokens)
                first = first or time.perf_counter()
                if out.finished:
                    state.metrics.observe(prep.lora_name, start, first, time.perf_counter(), out)
                yield out
        finally:
            disconnected.cancel()
            if next_out is not None and not next_out.done():
                next_out.cancel()  # raises inside the engine's stream, whose cleanup aborts the sequence
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


async def generate_all(request: Request, state: ServerState, prep: PreparedRequest) -> Completion:
    done = Completion()
    texts: list[str] = []
    async with aclosing(generate(request, state, prep)) as outputs:
        async for out in outputs:
            texts.append(out.new_text)
            done.logprobs.extend(out.new_logprobs)
            done.finish_reason = out.finish_reason
            done.num_prompt_tokens = out.num_prompt_tokens
            done.num_output_tokens = out.num_output_tokens
    done.text = "".join(texts)
    return done


def _sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


async def sse_response(
    request: Request,
    state: ServerState,
    prep: PreparedRequest,
    first: list[BaseModel],
    chunk: Callable[[RequestOutput], BaseModel | None],
    usage_chunk: Callable[[RequestOutput], BaseModel] | None,
) -> StreamingResponse:
    """`first` chunks, then `chunk(out)` per engine delta (None: skip), then `usage_chunk`, then [DONE].

    The first delta is awaited before the response starts, so that a request the engine
    refuses (unknown adapter, no room) still gets a real HTTP error status.
    """
    outputs = generate(request, state, prep)
    first_out = await anext(outputs)

    async def events() -> AsyncIterator[str]:
        last = first_out
        try:
            for payload in first:
                yield _sse(payload)
            async with aclosing(outputs):
                payload = chunk(first_out)
                if payload is not None:
                    yield _sse(payload)
                async for last in outputs:
                    payload = chunk(last)
                    if payload is not None:
                        yield _sse(payload)
            if usage_chunk is not None:
                yield _sse(usage_chunk(last))
        except APIError as err:
            yield _sse(err.to_dict())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
