"""POST /v1/completions: raw text or token-id prompts, legacy logprobs format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lora_serve.api.auth import principal_of
from lora_serve.api.generation import PreparedRequest, generate_all, prepare, sse_response
from lora_serve.api.logprobs import completion_logprobs
from lora_serve.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from lora_serve.api.state import ServerState, get_state
from lora_serve.api.tenants import Principal
from lora_serve.engine.outputs import RequestOutput

router = APIRouter()


def _prepare(state: ServerState, req: CompletionRequest, viewer: Principal) -> PreparedRequest:
    prompt = req.prompt
    token_ids = prompt if isinstance(prompt, list) else state.engine.tokenizer.encode(prompt)
    return prepare(
        state,
        req,
        id_prefix="cmpl",
        prompt_token_ids=list(token_ids),
        prompt_param="prompt",
        max_tokens=req.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
        top_logprobs_param="logprobs",
        viewer=viewer,
    )


async def _stream(
    request: Request, state: ServerState, req: CompletionRequest, prep: PreparedRequest
) -> StreamingResponse:
    text_offset = 0  # where the next token's text starts in the completion

    def make(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=prep.request_id, model=prep.model, choices=choices, usage=usage)

    def chunk(out: RequestOutput) -> CompletionResponse | None:
        nonlocal text_offset
        if not (out.new_text or out.finished or (req.logprobs is not None and out.new_logprobs)):
            return None  # tokens held back mid-character or by a possible stop string
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(state.token_text, out.new_logprobs, req.logprobs, text_offset)
            if logprobs.tokens:
                text_offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return make([CompletionChoice(text=out.new_text, logprobs=logprobs, finish_reason=out.finish_reason)])

    def usage(last: RequestOutput) -> CompletionResponse:
        return make([], UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens))

    return await sse_response(request, state, prep, [], chunk, usage if req.include_usage else None)


@router.post("/completions", response_model=None)
async def create_completion(
    req: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> CompletionResponse | StreamingResponse:
    prep = _prepare(state, req, principal_of(request))
    if req.stream:
        return await _stream(request, state, req, prep)
    done = await generate_all(request, state, prep)
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(state.token_text, done.logprobs, req.logprobs, 0)
    return CompletionResponse(
        id=prep.request_id,
        model=prep.model,
        choices=[CompletionChoice(text=done.text, logprobs=logprobs, finish_reason=done.finish_reason)],
        usage=UsageInfo.of(done.num_prompt_tokens, done.num_output_tokens),
    )
