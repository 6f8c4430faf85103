"""An engine over a random-weight model of a given shape, for benchmarks that need no checkpoint (gpu_check.py).

It is the real LLMEngine, built from a random model and no tokenizer (LLMEngine's constructor takes
parts). Its `step` returns the last-token logits of the scheduled requests by id, for comparing
backends, and takes the greedy argmax as each sequence's token (its `.tolist()` is the step's one
host sync, as in the real sampler); tokens are never detokenized.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from ..lora.lora_model import LoRAModel
from ..model.arch import ModelArch
from ..model.loader import random_model


class RandomEngine(LLMEngine):
    def __init__(self, arch: ModelArch, lora: LoRAConfig, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_len: int, seed: int = 0):  # fmt: skip
        bytes_per_token = 2 * arch.num_layers * arch.kv_size * dtype.itemsize
        kv_gb = 1.25 * max_num_seqs * (max_len + 16) * bytes_per_token / 2**30  # + a block of slack per sequence
        config = EngineConfig(
            cache=CacheConfig(kv_cache_memory_gb=kv_gb, enable_prefix_caching=False),  # rounds repeat the prompts: prefill runs cold
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_len, max_num_batched_tokens=max_num_seqs * max_len),
            lora=lora,
        )
        super().__init__(random_model(arch, dtype, device, max_len, seed), None, config)

    def add_adapter(self, model: LoRAModel) -> None:
        self.adapters.register(model.name, f"random:{model.name}", "random", model)

    def step(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """One engine step; the last-token logits [vocab] of each scheduled request, by id."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return {}
        ready, logits = self.run_batch(batch)
        for seq, token in zip(ready, logits.argmax(-1).tolist()):
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self._finish(seq, "length")
        return {seq.request_id: row for seq, row in zip(ready, logits)}
