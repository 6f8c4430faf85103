"""Prefix-cache keys: a hash chain over full KV blocks, rooted in the weights that computed them.

    root      = sha256(tag, merged adapter identity, the sequence's adapter identity, its cache salt)
    block[i]  = sha256(block[i-1] or root, token ids of block i)

A block's K/V is a function of every token up to its end (the chain) and of the weights each row ran
on (the root). An adapter's identity is the digest of its weights and parsed config
(lora/lora_model.py `LoRAModel.identity`), never its name: a re-upload or re-load under the same
name, or its folder rewritten, roots a new chain, while two names for one set of weights share one.
The base is None. While an adapter is merged every row runs on the merged weights (its own rows with
no LoRA term, the others with its negated term), none bitwise equal to the unmerged run, so the
merged adapter's identity roots every chain computed meanwhile.

The cache salt (SamplingParams.cache_salt, vLLM's name) parts chains that would otherwise be shared:
the server salts each request with its tenant, so tenants never share blocks. Otherwise a prompt of
one tenant would change another's (its cached_tokens would tell that the same prefix ran before, and
prefilling from a block instead of computing it changes the last float bits of what follows).

sha256 rather than Python's hash(): keys are shared across requests, and a key crafted to collide
would hand one request another's K/V.
"""

from __future__ import annotations

import functools
import hashlib
import json
from array import array
from collections.abc import Sequence

ROOT_TAG = "lora-serve prefix cache v1"


@functools.lru_cache(maxsize=4096)  # asked for every scheduled sequence, every step: a few distinct triples
def root_hash(merged_identity: str | None, adapter_identity: str | None, cache_salt: str | None = None) -> bytes:
    return hashlib.sha256(json.dumps([ROOT_TAG, merged_identity, adapter_identity, cache_salt]).encode()).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block: its parent's key (or the root) and its token ids, 8 bytes each."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()
