"""One request between the OpenAI wire format and the engine, for chat and completions alike.

    exchange = await ChatExchange.open(state, req, viewer)  # adapter synced with --adapter-dir, checks done
    exchange.prep                                           # what the engine runs: one sequence per choice
    exchange.response(dones) / exchange.first_chunks(), exchange.chunk(out), exchange.usage_chunk(counts)

A request fans out into choices: each of its prompts (a completions prompt list; a chat has one), n
times each, choice index prompt_index * n + j (OpenAI's order). Every choice is an engine request of its
own, `<response id>-<index>`, and all are added together, so they share steps. A seeded request gives
choice j the seed seed + j: the choices differ, yet come back the same (vLLM's rule). `choice()` turns
one finished choice into the response's, once per choice; usage counts each prompt once.

The FastAPI routes (chat.py, completions.py) and the Ray Serve replicas (deploy/ray_replica.py)
both serve through it, with generation.py running the engine and writing the SSE stream. The checks
and what the engine runs (PreparedRequest) are built in prepared_request.py.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel

from lora_serve.api.logprobs import prompt_logprobs
from lora_serve.api.prepared_request import PreparedRequest, RequestFields, check_before_tokenizing, compile_grammar, prepare
from lora_serve.api.protocol import SamplingRequest
from lora_serve.api.responses import PromptLogprobs, UsageInfo
from lora_serve.api.state import ServerState
from lora_serve.api.tenants import OPEN, Principal
from lora_serve.engine.grammar import GrammarSpec
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

E = TypeVar("E", bound="Exchange")
R = TypeVar("R", bound=BaseModel)  # an exchange's whole, non-streamed response


@dataclass
class Completion:
    """A whole non-streamed choice, gathered from the engine's deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # asked for by echo with logprobs, or prompt_logprobs
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt's, found in the prefix cache


class Exchange(ABC, Generic[R]):
    """A validated request, checked against the model and turned into `prep`; subclasses build
    the replies (a whole response, or stream chunks) from the engine's outputs."""

    prep: PreparedRequest  # set by open()

    def __init__(self, state: ServerState, req: SamplingRequest):
        self.state = state
        self.req = req

    @classmethod
    async def open(cls: type[E], state: ServerState, req: SamplingRequest, viewer: Principal = OPEN) -> E:
        """Sync the named adapter with --adapter-dir (another replica may have added, replaced or
        removed its folder; a stat, on a worker thread), check what needs no tokenizer, then template
        and tokenize the prompts on a worker thread (never on the event loop) and check their tokens, then
        compile the output's grammar, if any, on a worker thread too. APIError if the request is bad."""
        await state.models.sync(req.model)
        await state.models.sync_adapters(req.adapters)
        exchange = cls(state, req)
        fields = exchange.fields()
        lora_name = check_before_tokenizing(state, req, viewer, fields, *exchange.prompt_size())
        grammar = exchange.grammar_spec()
        prompts = await asyncio.to_thread(exchange.prompts_token_ids)
        exchange.prep = prepare(state, req, fields, lora_name, prompts, viewer.tenant)
        if grammar is not None:
            compiled = await compile_grammar(state, *grammar)  # once: each choice's sequence gets its own matcher
            for choice in exchange.prep.choices:
                choice.params.grammar = compiled
        return exchange

    def grammar_spec(self) -> tuple[GrammarSpec, str] | None:
        """What the output must match, and the param that asked (structured_outputs.py); None: free text."""
        return self.req.grammar_spec()

    @abstractmethod
    def fields(self) -> RequestFields: ...

    @abstractmethod
    def prompt_size(self) -> tuple[int, int]:
        """(characters, chat messages) of the largest prompt, measured without the tokenizer."""

    @abstractmethod
    def prompts_token_ids(self) -> list[list[int]]:
        """Each prompt as the engine runs it. Blocking (chat template, tokenizer): open() runs it on a worker thread."""

    @abstractmethod
    def choice(self, index: int, done: Completion) -> BaseModel:
        """Choice `index` of the whole, non-streamed response."""

    @abstractmethod
    def make_response(self, choices: list, usage: UsageInfo) -> R: ...

    @abstractmethod
    def make_chunk(self, choices: list, usage: UsageInfo | None = None) -> BaseModel: ...

    @abstractmethod
    def delta_chunk(self, index: int, out: RequestOutput) -> BaseModel | None:
        """The stream chunk of one engine delta of choice `index` (None: nothing to send yet)."""

    def response(self, dones: list[Completion]) -> R:
        """The whole, non-streamed response; dones: each choice, in index order."""
        choices = [self.choice(index, done) for index, done in enumerate(dones)]
        return self.make_response(choices, self.usage({i: (d.num_output_tokens, d.num_cached_tokens) for i, d in enumerate(dones)}))

    def usage(self, counts: Mapping[int, tuple[int, int]]) -> UsageInfo:
        """counts: choice index -> (its output tokens, its prompt tokens found in the prefix cache). Each prompt
        counted once, with the cached tokens its first choice found; the completion tokens of every choice."""
        cached = sum(counts.get(p * self.req.n, (0, 0))[1] for p in range(len(self.prep.prompts)))
        return UsageInfo.of(self.prep.num_prompt_tokens, sum(out for out, _ in counts.values()), cached)

    def first_chunks(self) -> Sequence[BaseModel]:
        """Sent before any generated text."""
        return []

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        if not (out.new_text or out.finished or out.new_logprobs):
            return None  # tokens held back mid-character or by a possible stop string
        return self.delta_chunk(self.prep.index_of[out.request_id], out)

    def prompt_logprobs(self, prompt_index: int, logprobs: list[TokenLogprob | None] | None) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs of one prompt, when the request asks for them."""
        if self.req.prompt_logprobs is None or logprobs is None:
            return None
        return prompt_logprobs(self.state.token_text, self.prep.prompts[prompt_index], logprobs, self.req.prompt_logprobs)

    def usage_chunk(self, counts: Mapping[int, tuple[int, int]]) -> BaseModel:
        """The last chunk, no choices, when the request asked for stream_options.include_usage (counts: as usage's)."""
        return self.make_chunk([], self.usage(counts))
