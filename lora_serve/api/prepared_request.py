"""What the engine runs for one API request (PreparedRequest: a sequence per choice), and the checks
that build it: those that need no tokenizer first (health, model and adapters, limits, the prompt's
size in characters), then each prompt's tokens against the context; and the grammar's compilation.
Chat and completions alike (exchange.py calls them in that order); each raises APIError naming the param.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

from lora_serve.api.errors import SERVER_ERROR, APIError, invalid_param
from lora_serve.api.limits import check_limits, check_prompt_size, check_prompt_tokens
from lora_serve.api.protocol import SamplingRequest
from lora_serve.api.state import ServerState
from lora_serve.api.tenants import Principal
from lora_serve.engine.async_engine import EngineRequest
from lora_serve.engine.grammar import Grammar, GrammarSpec
from lora_serve.engine.sampling_params import SEED_MIN, SamplingParams
from lora_serve.lora.composition import Composition

SAMPLING_EPS = 1e-6  # smaller than any top-token probability for vocabularies under a million


@dataclass
class ChoiceRequest:
    """One choice of a request, as the engine runs it."""

    request_id: str  # the engine's: <response id>-<index>
    index: int  # in the response: prompt_index * n + j
    prompt_index: int
    params: SamplingParams


@dataclass
class PreparedRequest:
    request_id: str  # the response's id
    model: str  # echoed in responses
    lora_name: str | Composition | None  # an adapter, or adapters composed with weights (None: the base)
    prompts: list[list[int]]  # the token ids of each prompt
    choices: list[ChoiceRequest]  # in index order
    index_of: dict[str, int] = field(init=False)  # engine request id -> choice index

    def __post_init__(self) -> None:
        self.index_of = {c.request_id: c.index for c in self.choices}

    @property
    def num_prompt_tokens(self) -> int:
        """Usage's prompt_tokens: each prompt once, however many choices share it."""
        return sum(len(p) for p in self.prompts)

    def counts_prompt(self, request_id: str) -> bool:
        """Whether this choice is the first of its prompt: the one whose prompt tokens /metrics counts, so
        that they count once per prompt as in usage, however many choices share it."""
        return self.index_of[request_id] % (len(self.choices) // len(self.prompts)) == 0

    def engine_requests(self) -> list[EngineRequest]:
        return [(c.request_id, self.prompts[c.prompt_index], c.params) for c in self.choices]


@dataclass(frozen=True)
class RequestFields:
    """What the shared checks read from a route's request, and the param names its errors give."""

    id_prefix: str  # of the response id
    prompt_param: str
    max_tokens: int | None
    max_tokens_param: str
    logprobs: bool
    top_logprobs: int
    top_logprobs_param: str = "top_logprobs"
    num_prompts: int = 1
    prompt_logprobs: int | None = None  # top alternatives per prompt token (None: no prompt logprobs)


def check_before_tokenizing(
    state: ServerState,
    req: SamplingRequest,
    viewer: Principal,
    fields: RequestFields,
    num_chars: int,
    num_messages: int,
) -> str | Composition | None:
    """Every check that needs no tokenizer, so that a refused request costs no tokenizer time: the
    engine's health, the model and adapters (404), the limits, the prompt's size in characters and messages,
    stop_token_ids and logit_bias. Returns the adapter's name or the composition (None: the base); raises
    APIError naming the param."""
    if not state.engine.is_healthy:  # checked here, before a stream's 200 goes out
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine is not healthy", SERVER_ERROR)
    lora_name: str | Composition | None
    if req.adapters is not None:
        lora_name = state.models.resolve_adapters(req.model, req.adapters, viewer)
    else:
        lora_name = state.models.resolve(req.model, viewer)
    check_limits(
        state.config,
        max_tokens=fields.max_tokens,
        max_tokens_param=fields.max_tokens_param,
        stops=req.stop_list,
        num_stop_token_ids=len(req.stop_token_ids),
        num_logit_bias=len(req.logit_bias or ()),
        top_logprobs=fields.top_logprobs,
        top_logprobs_param=fields.top_logprobs_param,
        n=req.n,
        num_prompts=fields.num_prompts,
        prompt_logprobs=req.prompt_logprobs,
    )
    vocab_size = len(state.engine.tokenizer)
    if any(not 0 <= t < vocab_size for t in req.stop_token_ids):
        raise invalid_param("stop_token_ids", f"token ids must be in [0, {vocab_size})")
    if any(t >= vocab_size for t in req.token_bias):  # keys are decimal, never negative (protocol.py)
        raise invalid_param("logit_bias", f"token ids must be in [0, {vocab_size})")
    check_prompt_size(
        state.config,
        state.engine.max_model_len,
        prompt_param=fields.prompt_param,
        num_chars=num_chars,
        num_messages=num_messages,
    )
    return lora_name


async def compile_grammar(state: ServerState, spec: GrammarSpec, param: str) -> Grammar:
    """Compile on a worker thread, never the event loop's or the engine's (the compiler caches it);
    a 400 naming `param` when it cannot compile."""
    compiler = state.engine.grammar_compiler
    if compiler is None:
        raise invalid_param(param, "structured outputs need the model's tokenizer, which this engine has not loaded")
    try:
        return await asyncio.to_thread(compiler.compile, spec)
    except ValueError as exc:
        raise invalid_param(param, f"invalid {spec.kind.replace('_', ' ')}: {exc}") from exc


def prepare(
    state: ServerState,
    req: SamplingRequest,
    fields: RequestFields,
    lora_name: str | Composition | None,
    prompts: list[list[int]],
    tenant: str | None = None,
) -> PreparedRequest:
    """Check each prompt's tokens against the context and limits, then build what the engine runs: n choices
    of each prompt, seeded seed + j (wrapped into the 64-bit signed range) when the request is. `tenant`
    salts the prefix cache: requests share cached KV blocks only within one tenant."""
    request_id = f"{fields.id_prefix}-{uuid.uuid4().hex}"
    choices = []
    for prompt_index, prompt_token_ids in enumerate(prompts):
        params = sampling_params(state, req, fields, prompt_token_ids, tenant)
        for j in range(req.n):
            index = prompt_index * req.n + j
            seed = None if req.seed is None else (req.seed + j - SEED_MIN) % 2**64 + SEED_MIN
            choice_params = params if j == 0 else dataclasses.replace(params, seed=seed)
            choices.append(ChoiceRequest(f"{request_id}-{index}", index, prompt_index, choice_params))
    return PreparedRequest(request_id, req.model or state.models.base_name, lora_name, prompts, choices)


def sampling_params(
    state: ServerState, req: SamplingRequest, fields: RequestFields, prompt_token_ids: list[int], cache_salt: str | None = None
) -> SamplingParams:
    """Check one prompt's tokens against the context and limits; the SamplingParams of its first choice.
    max_tokens 0 (echo alone) runs one token, which the exchange drops."""
    prompt_param, max_tokens, max_tokens_param = fields.prompt_param, fields.max_tokens, fields.max_tokens_param
    max_len = state.engine.max_model_len
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise invalid_param(prompt_param, "the prompt is empty")
    if num_prompt >= max_len:
        raise invalid_param(
            prompt_param,
            f"This model's maximum context length is {max_len} tokens; your {prompt_param} has "
            f"{num_prompt} tokens, leaving no room for a completion.",
            code="context_length_exceeded",
        )
    check_prompt_tokens(state.config, num_prompt=num_prompt, prompt_param=prompt_param)
    vocab_size = len(state.engine.tokenizer)  # scanned once the length is known to be bounded
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise invalid_param(prompt_param, f"token ids must be in [0, {vocab_size})")
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
    if req.min_tokens > max_tokens:
        raise invalid_param("min_tokens", f"min_tokens is {req.min_tokens}; this completion has room for {max_tokens} tokens at most")
    return SamplingParams(
        max_tokens=max(max_tokens, 1),
        min_tokens=req.min_tokens,
        # Below SAMPLING_EPS a temperature overflows logits / T and a top_p rounds to 0 in float32,
        # either making NaN probabilities: treat them as greedy and as "the top token only".
        temperature=req.temperature if req.temperature >= SAMPLING_EPS else 0.0,
        top_p=max(req.top_p, SAMPLING_EPS),
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=req.token_bias,
        seed=req.seed,
        cache_salt=cache_salt,
        stop=req.stop_list,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=fields.logprobs,
        top_logprobs=fields.top_logprobs,
        prompt_logprobs=_most(fields.prompt_logprobs, req.prompt_logprobs),
    )


def _most(a: int | None, b: int | None) -> int | None:
    """Enough top alternatives for both asks (None: neither asks)."""
    return b if a is None else a if b is None else max(a, b)
