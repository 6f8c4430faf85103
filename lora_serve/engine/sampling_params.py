"""What a request asks of generation: length, sampling, stops, logprobs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# A seed is a 64-bit signed integer, as in OpenAI's API and vLLM; torch.Generator.manual_seed
# takes [-2**63, 2**64) (a negative seed s seeds 2**64 + s), so every such seed is accepted.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: Iterable[int] = field(default_factory=frozenset)
    """Stored as a frozenset: it is looked up once per generated token."""
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # The API layer validates user input with param names first; these are the engine's own invariants.
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a 64-bit signed integer, in [{SEED_MIN}, {SEED_MAX}]")
        self.stop_token_ids = frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
