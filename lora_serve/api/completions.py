"""POST /v1/completions: raw text or token-id prompts, legacy logprobs format."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lora_serve.api.auth import principal_of
from lora_serve.api.exchange import Completion, Exchange, RequestFields
from lora_serve.api.generation import respond
from lora_serve.api.logprobs import completion_logprobs
from lora_serve.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from lora_serve.api.state import ServerState, get_state
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

router = APIRouter()


class CompletionExchange(Exchange[CompletionResponse]):
    req: CompletionRequest

    def __init__(self, state: ServerState, req: CompletionRequest):
        super().__init__(state, req)
        self.text_offset = 0  # streamed: where the next token's text starts in the completion

    def fields(self) -> RequestFields:
        return RequestFields(
            id_prefix="cmpl",
            prompt_param="prompt",
            max_tokens=self.req.max_tokens,
            max_tokens_param="max_tokens",
            logprobs=self.req.logprobs is not None,
            top_logprobs=self.req.logprobs or 0,
            top_logprobs_param="logprobs",
        )

    def prompt_size(self) -> tuple[int, int]:
        prompt = self.req.prompt
        return (0 if isinstance(prompt, list) else len(prompt)), 0  # token ids: counted after, before the vocab scan

    def prompt_token_ids(self) -> list[int]:
        prompt = self.req.prompt
        # A list is token ids: _single_prompt turned a list of one string into that string.
        return list(cast("list[int]", prompt)) if isinstance(prompt, list) else self.state.engine.tokenizer.encode(prompt)

    def _logprobs(self, logprobs: list[TokenLogprob], text_offset: int) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return completion_logprobs(self.state.token_text, logprobs, self.req.logprobs, text_offset)

    def response(self, done: Completion) -> CompletionResponse:
        choice = CompletionChoice(text=done.text, logprobs=self._logprobs(done.logprobs, 0), finish_reason=done.finish_reason)
        usage = UsageInfo.of(done.num_prompt_tokens, done.num_output_tokens, done.num_cached_tokens)
        return CompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=[choice], usage=usage)

    def make_chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def delta_chunk(self, out: RequestOutput) -> CompletionResponse:
        logprobs = self._logprobs(out.new_logprobs, self.text_offset)
        if logprobs is not None and logprobs.tokens:
            self.text_offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return self.make_chunk([CompletionChoice(text=out.new_text, logprobs=logprobs, finish_reason=out.finish_reason)])


@router.post("/completions", response_model=None)
async def create_completion(
    req: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> CompletionResponse | StreamingResponse:
    return await respond(request, await CompletionExchange.open(state, req, principal_of(request)))
