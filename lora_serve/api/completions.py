"""POST /v1/completions: raw text or token-id prompts, one or a list, legacy logprobs format, echo.

With echo, each choice's text starts with its prompt (as given; token ids decoded), and with logprobs
its logprobs start with the prompt tokens' (the engine's prompt_logprobs; the first token's is null),
as OpenAI and vLLM return them; a stream sends the prompt in each choice's first chunk. max_tokens 0
with echo returns the prompt alone (vLLM): the engine runs one token, which is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lora_serve.api.auth import principal_of
from lora_serve.api.errors import invalid_param
from lora_serve.api.exchange import Completion, Exchange
from lora_serve.api.generation import respond
from lora_serve.api.logprobs import completion_logprobs
from lora_serve.api.prepared_request import RequestFields
from lora_serve.api.protocol import CompletionRequest
from lora_serve.api.responses import CompletionChoice, CompletionLogprobs, CompletionResponse, UsageInfo
from lora_serve.api.state import ServerState, get_state
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

router = APIRouter()


class CompletionExchange(Exchange[CompletionResponse]):
    req: CompletionRequest

    def __init__(self, state: ServerState, req: CompletionRequest):
        super().__init__(state, req)
        self.prompt_texts: list[str] = []  # with echo: each prompt's text
        self.text_offsets: dict[int, int] = {}  # streamed: where each choice's next token starts in its text
        self.echoed: set[int] = set()  # streamed choices whose prompt went out
        self.prompt_only = req.echo and req.max_tokens == 0

    def fields(self) -> RequestFields:
        if self.req.max_tokens == 0 and not self.req.echo:
            raise invalid_param("max_tokens", "max_tokens may be 0 only with echo (the prompt alone)")
        return RequestFields(
            id_prefix="cmpl",
            prompt_param="prompt",
            max_tokens=self.req.max_tokens,
            max_tokens_param="max_tokens",
            logprobs=self.req.logprobs is not None,
            top_logprobs=self.req.logprobs or 0,
            top_logprobs_param="logprobs",
            num_prompts=len(self.req.prompts),
            prompt_logprobs=self.req.logprobs if self.req.echo else None,
        )

    def prompt_size(self) -> tuple[int, int]:
        # Token ids are counted after, before the vocabulary scan.
        return max((len(p) for p in self.req.prompts if isinstance(p, str)), default=0), 0

    def prompts_token_ids(self) -> list[list[int]]:
        tokenizer = self.state.engine.tokenizer
        prompts = [list(p) if isinstance(p, list) else tokenizer.encode(p) for p in self.req.prompts]
        if self.req.echo:
            self.prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in self.req.prompts]
        return prompts

    def _logprobs(
        self, logprobs: list[TokenLogprob], text_offset: int, prompt_index: int, prompt_logprobs: list[TokenLogprob | None] | None
    ) -> CompletionLogprobs | None:
        """prompt_logprobs: the echoed prompt's, put first (None: no echo here)."""
        if self.req.logprobs is None:
            return None
        echoed = self.prep.prompts[prompt_index] if prompt_logprobs is not None else []
        return completion_logprobs(self.state.token_text, logprobs, self.req.logprobs, text_offset, echoed, prompt_logprobs or [])

    def choice(self, index: int, done: Completion) -> CompletionChoice:
        prompt_index = self.prep.choices[index].prompt_index
        text, logprobs, finish_reason = done.text, done.logprobs, done.finish_reason
        if self.prompt_only:
            text, logprobs, finish_reason = "", [], "length"
        if self.req.echo:
            text = self.prompt_texts[prompt_index] + text
        lps = self._logprobs(logprobs, 0, prompt_index, done.prompt_logprobs if self.req.echo else None)
        prompt_lps = self.prompt_logprobs(prompt_index, done.prompt_logprobs)
        return CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=finish_reason, prompt_logprobs=prompt_lps)

    def usage(self, counts: Mapping[int, tuple[int, int]]) -> UsageInfo:
        return super().usage({i: (0, cached) for i, (_, cached) in counts.items()} if self.prompt_only else counts)

    def make_response(self, choices: list[CompletionChoice], usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def make_chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        index = self.prep.index_of[out.request_id]
        if self.req.echo and index not in self.echoed:
            return self.delta_chunk(index, out)  # the prompt goes out, even before any text
        return None if self.prompt_only else super().chunk(out)

    def delta_chunk(self, index: int, out: RequestOutput) -> CompletionResponse:
        prompt_index = self.prep.choices[index].prompt_index
        text, new_logprobs, finish_reason = out.new_text, out.new_logprobs, out.finish_reason
        if self.prompt_only:
            text, new_logprobs, finish_reason = "", [], "length"
        prompt_logprobs = None
        if self.req.echo and index not in self.echoed:
            self.echoed.add(index)
            text = self.prompt_texts[prompt_index] + text
            prompt_logprobs = out.prompt_logprobs
        logprobs = self._logprobs(new_logprobs, self.text_offsets.get(index, 0), prompt_index, prompt_logprobs)
        if logprobs is not None and logprobs.tokens:
            self.text_offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return self.make_chunk([CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)])


@router.post("/completions", response_model=None)
async def create_completion(
    req: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> CompletionResponse | StreamingResponse:
    return await respond(request, await CompletionExchange.open(state, req, principal_of(request)))
