"""POST /v1/chat/completions: the tokenizer's chat template turns messages into a prompt."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from lora_serve.api.errors import invalid_param
from lora_serve.api.auth import principal_of
from lora_serve.api.generation import PreparedRequest, generate_all, prepare, sse_response
from lora_serve.api.logprobs import chat_logprobs
from lora_serve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    UsageInfo,
)
from lora_serve.api.state import ServerState, get_state
from lora_serve.api.tenants import Principal
from lora_serve.engine.outputs import RequestOutput

router = APIRouter()


def _prompt_token_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    tokenizer = state.engine.tokenizer
    messages = [m.for_template() for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:  # e.g. templates that demand alternating user/assistant turns
        raise invalid_param("messages", f"the model's chat template rejected the messages: {exc}") from exc
    # Encode without special tokens: the rendered template already holds BOS where the model wants it.
    return tokenizer.encode(text, add_special_tokens=False)


def _prepare(state: ServerState, req: ChatCompletionRequest, viewer: Principal) -> PreparedRequest:
    max_tokens, max_tokens_param = req.max_tokens_param
    return prepare(
        state,
        req,
        id_prefix="chatcmpl",
        prompt_token_ids=_prompt_token_ids(state, req),
        prompt_param="messages",
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        viewer=viewer,
    )


async def _stream(
    request: Request, state: ServerState, req: ChatCompletionRequest, prep: PreparedRequest
) -> StreamingResponse:
    def make(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=prep.request_id, model=prep.model, choices=choices, usage=usage)

    def chunk(out: RequestOutput) -> ChatCompletionChunk | None:
        if not (out.new_text or out.finished or (req.logprobs and out.new_logprobs)):
            return None  # tokens held back mid-character or by a possible stop string
        logprobs = chat_logprobs(state.token_text, out.new_logprobs, req.top_logprobs or 0) if req.logprobs else None
        delta = ChatDelta(content=out.new_text)
        return make([ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=out.finish_reason)])

    def usage(last: RequestOutput) -> ChatCompletionChunk:
        return make([], UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens))

    first = make([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    return await sse_response(request, state, prep, [first], chunk, usage if req.include_usage else None)


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> ChatCompletionResponse | StreamingResponse:
    prep = _prepare(state, req, principal_of(request))
    if req.stream:
        return await _stream(request, state, req, prep)
    done = await generate_all(request, state, prep)
    logprobs = chat_logprobs(state.token_text, done.logprobs, req.top_logprobs or 0) if req.logprobs else None
    message = AssistantMessage(content=done.text)
    choice = ChatChoice(message=message, logprobs=logprobs, finish_reason=done.finish_reason)
    return ChatCompletionResponse(
        id=prep.request_id,
        model=prep.model,
        choices=[choice],
        usage=UsageInfo.of(done.num_prompt_tokens, done.num_output_tokens),
    )
