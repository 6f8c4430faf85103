"""One request's state as it moves through the engine: tokens, KV blocks, sampling state, text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..lora.composition import COMPOSED_LABEL
from .outputs import TokenLogprob
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar as xgr

    from ..lora.catalog import AdapterLease
    from ..lora.composition import ComposedLeases


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    lora_name: str | None = None
    lora_slot: int | None = None  # its adapter's slot, pinned while running (see lora/residency.py)
    lease: AdapterLease | None = None  # its hold on lora_name's CPU copy, closed when it ends (lora/catalog.py)
    composed: ComposedLeases | None = None  # weighted adapters instead of lora_name (lora/composition.py)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V are in the cache
    # Prefix caching (kv_cache.py): the chain's root (None: none yet, or it stopped caching), the keys
    # of its full blocks, and the prompt tokens found cached at its first admission (usage's cached_tokens).
    hash_root: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_prefix_cached_tokens: int | None = None
    num_bypassed: int = 0  # later arrivals admitted while it waited (bounded: see scheduler.py)
    matcher: xgr.GrammarMatcher | None = None  # params.grammar's state: the tokens accepted so far (grammar_bitmask.py)
    prompt_tokens: torch.Tensor | None = None  # the prompt's distinct token ids: repetition_penalty (logits_processors.py)
    finish_reason: str | None = None
    # Detokenizer state (see detokenizer.py).
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.. (engine/logprobs.py)
    prompt_logprobs_sent: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens this step must run through the model: the uncached tail (whole prompt at first, then 1)."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def adapter_identity(self) -> str | None:
        """Its adapter's identity (lora/lora_model.py LoRAModel.identity) as its lease opened it, or its
        composition's (each component's identity and weight); None: the base."""
        if self.composed is not None:
            return self.composed.identity
        return self.lease.record.identity if self.lease is not None else None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters its rows read: none for the base, one, or a composition's."""
        if self.composed is not None:
            return self.composed.composition.names
        return (self.lora_name,) if self.lora_name is not None else ()

    @property
    def metrics_label(self) -> str:
        """Its adapter label in metrics: the adapter, "" for the base, one label for every composition
        (weights are any float: a label each would grow without bound)."""
        return COMPOSED_LABEL if self.composed is not None else self.lora_name or ""

    @property
    def adapter_key(self) -> str | None:
        """What it runs on, as one name: its adapter, its composition's label, or None for the base."""
        return self.composed.composition.label if self.composed is not None else self.lora_name

    @property
    def is_prefix_cacheable(self) -> bool:
        """Known weights compute its K/V, so its blocks may be keyed and shared: the base, or an adapter
        it holds a lease on (an adapter named without one has no known identity)."""
        return self.lora_name is None or self.lease is not None

    @property
    def may_reuse_cached_prefix(self) -> bool:
        """It may start from cached blocks instead of computing its prompt: not when it asks for prompt
        logprobs, which need the logits of every prompt position (its blocks are still cached for others)."""
        return self.params.prompt_logprobs is None

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
