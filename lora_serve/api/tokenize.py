"""vLLM's POST /tokenize and POST /detokenize: a prompt as the model reads it, and token ids back to text.

    {"prompt": "...", "add_special_tokens": true}                -> {"count", "max_model_len", "tokens", "token_strs"}
    {"messages": [...], "add_generation_prompt": true}           -> the same, the prompt /v1/chat/completions builds
    {"tokens": [...]}                                            -> {"prompt": "..."}
`model` (optional) must name a model the caller may use, as on the generation routes (404 otherwise);
they all share the base's tokenizer. The routes take the same keys as /v1. Text is held to the
generation routes' prompt-size limits before it is tokenized, on a worker thread, as is decoding.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from lora_serve.api.auth import principal_of
from lora_serve.api.chat import chat_prompt_ids
from lora_serve.api.errors import invalid_param
from lora_serve.api.limits import check_prompt_size
from lora_serve.api.protocol import MAX_MESSAGES, ChatMessage, ChatMessages, RequestBody
from lora_serve.api.state import ServerState, get_state

router = APIRouter()


class TokenizeRequest(ChatMessages):
    """vLLM's TokenizeCompletionRequest (prompt) and TokenizeChatRequest (messages) in one body: exactly one of the two."""

    model: str | None = None
    prompt: str | None = None
    """Text, tokenized as /v1/completions tokenizes it."""

    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)  # type: ignore[assignment]
    add_special_tokens: bool | None = None
    """Add the tokenizer's special tokens (BOS): default true for a prompt; false for messages, whose template has them."""

    add_generation_prompt: bool | None = None
    """messages only: end with the assistant turn's header (default true, as the chat route does)."""

    continue_final_message: bool = False
    """messages only: leave the last (assistant) message open for the model to continue."""

    return_token_strs: bool = False
    """Also return each token as the tokenizer's vocabulary spells it."""


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def _check_model(state: ServerState, model: str | None, request: Request) -> None:
    await state.models.sync(model)
    state.models.resolve(model, principal_of(request))


def _prompt_ids(state: ServerState, req: TokenizeRequest) -> list[int]:
    """The checks of the body's shape and size, then the tokens (blocking: run on a worker thread)."""
    tokenizer, max_len = state.engine.tokenizer, state.engine.max_model_len
    if req.messages is None:
        if req.prompt is None:
            raise invalid_param("prompt", "give prompt or messages")
        if req.add_generation_prompt is not None:
            raise invalid_param("add_generation_prompt", "add_generation_prompt applies only to messages")
        if req.continue_final_message:
            raise invalid_param("continue_final_message", "continue_final_message applies only to messages")
        check_prompt_size(state.config, max_len, prompt_param="prompt", num_chars=len(req.prompt))
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    if req.prompt is not None:
        raise invalid_param("prompt", "give prompt or messages, not both")
    if req.continue_final_message and req.add_generation_prompt:
        raise invalid_param("continue_final_message", "continue_final_message and add_generation_prompt exclude each other")
    num_chars = sum(m.num_chars for m in req.messages)
    check_prompt_size(state.config, max_len, prompt_param="messages", num_chars=num_chars, num_messages=len(req.messages))
    add_generation_prompt = not req.continue_final_message if req.add_generation_prompt is None else req.add_generation_prompt
    return chat_prompt_ids(tokenizer, req.messages, add_generation_prompt, req.continue_final_message, bool(req.add_special_tokens))


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request, state: ServerState = Depends(get_state)) -> TokenizeResponse:
    await _check_model(state, req.model, request)
    ids = await asyncio.to_thread(_prompt_ids, state, req)
    convert = state.engine.tokenizer.convert_ids_to_tokens
    strs = await asyncio.to_thread(convert, ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs)


def _decode(tokenizer, ids: list[int]) -> str:
    vocab_size = len(tokenizer)
    if any(not 0 <= t < vocab_size for t in ids):
        raise invalid_param("tokens", f"token ids must be in [0, {vocab_size})")
    return tokenizer.decode(ids)  # special tokens included: the inverse of /tokenize, as in vLLM


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request, state: ServerState = Depends(get_state)) -> DetokenizeResponse:
    await _check_model(state, req.model, request)
    return DetokenizeResponse(prompt=await asyncio.to_thread(_decode, state.engine.tokenizer, req.tokens))
