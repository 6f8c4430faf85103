"""An engine over a random-weight model of a given shape, for benchmarks that need no checkpoint (gpu_check.py).

It runs the real scheduler, KV cache, model runner and LoRA manager; what it leaves out is what
needs a tokenizer: tokens are the greedy argmax (its `.tolist()` is the step's one host sync, as
in the real sampler) and are never detokenized. It answers what runners.engine_phases and
mixed_lora.interleave call: add_request, step, has_unfinished, merge_adapter, unmerge_adapter.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig, LoRAConfig
from ..engine.kv_cache import KVCache
from ..engine.model_runner import ModelRunner
from ..engine.sampling_params import SamplingParams
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence
from ..lora.lora_model import LoRAModel
from ..lora.manager import LoRAManager
from ..model.arch import ModelArch
from ..model.loader import random_model


class RandomEngine:
    def __init__(self, arch: ModelArch, lora: LoRAConfig, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_len: int, seed: int = 0):  # fmt: skip
        self.arch = arch
        self.max_num_batched_tokens = max_num_seqs * max_len
        self.model = random_model(arch, dtype, device, max_len, seed)
        bytes_per_token = 2 * arch.num_layers * arch.kv_size * dtype.itemsize
        kv_gb = 1.25 * max_num_seqs * (max_len + 16) * bytes_per_token / 2**30  # + a block of slack per sequence
        self.kv_cache = KVCache(arch, CacheConfig(kv_cache_memory_gb=kv_gb), dtype, device, max_len)
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.lora = LoRAManager(self.model, lora, "base")
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs, self.max_num_batched_tokens, self.lora)
        self._seqs: dict[str, Sequence] = {}

    def add_adapter(self, model: LoRAModel) -> None:
        self.lora.register(model.name, f"random:{model.name}", "random", model)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora_name: str | None = None) -> None:
        if lora_name is not None:
            self.lora.acquire(lora_name)
        seq = Sequence(request_id, list(prompt_token_ids), params, torch.Generator(), lora_name)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> dict[str, torch.Tensor]:
        """One engine step; the last-token logits [vocab] of each scheduled request, by id."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return {}
        lora = self.lora.prepare(batch.seqs, batch.num_new_tokens)
        logits = self.runner.run(batch.seqs, batch.num_new_tokens, lora)  # [ready, vocab]
        ready = [seq for seq in batch.seqs if seq.num_new_tokens == 0]
        for seq, token in zip(ready, logits.argmax(-1).tolist()):
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.scheduler.finish(seq, "length")
                del self._seqs[seq.request_id]
                if seq.lora_name is not None:
                    self.lora.release(seq.lora_name)
        return {seq.request_id: row for seq, row in zip(ready, logits)}

    # As LLMEngine's own (they only touch self.lora).
    def merge_adapter(self, name: str) -> None:
        self.lora.acquire(name)
        try:
            self.lora.merge(name)
        finally:
            self.lora.release(name)

    def unmerge_adapter(self) -> None:
        self.lora.unmerge()
