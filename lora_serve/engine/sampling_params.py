"""What a request asks of generation: length, sampling, penalties, stops, logprobs, a grammar."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grammar import Grammar

# A seed is a 64-bit signed integer, as in OpenAI's API and vLLM; torch.Generator.manual_seed
# takes [-2**63, 2**64) (a negative seed s seeds 2**64 + s), so every such seed is accepted.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    """EOS and stop_token_ids are masked, and stop strings not looked for, until this many tokens are out (vLLM)."""
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    min_p: float = 0.0
    """Keep only tokens at least min_p times as likely as the most likely one, after temperature (vLLM; 0: off)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output holds (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output holds it (OpenAI)."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output: a positive logit is divided by it, a negative one multiplied (vLLM, HF; 1: off)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> added to its logit before the choice (OpenAI)."""
    seed: int | None = None
    cache_salt: str | None = None
    """Prefix-cache blocks are shared only among requests with the same salt (vLLM's name); the server
    gives each request its tenant's, so tenants never share blocks (block_hash.py)."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: Iterable[int] = field(default_factory=frozenset)
    """Stored as a frozenset: it is looked up once per generated token."""
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    """The logprob of every prompt token after the first, with this many top alternatives each (vLLM's
    name; None: none). Needs the logits of every prompt position, so no cached prefix may skip one."""
    grammar: Grammar | None = None
    """The output must match it (structured outputs): other tokens are masked out; once it is complete
    only EOS is allowed, which ends the output even with ignore_eos or before min_tokens."""

    def __post_init__(self) -> None:
        # The API layer validates user input with param names first; these are the engine's own invariants.
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [{-MAX_PENALTY}, {MAX_PENALTY}]")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be a finite number > 0")
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias.items()):
            raise ValueError(f"logit_bias maps token ids >= 0 to biases in [{-MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be >= 0 (or None)")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a 64-bit signed integer, in [{SEED_MIN}, {SEED_MAX}]")
        self.stop_token_ids = frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
