"""The synchronous engine: requests in, one `step()` at a time, output deltas out."""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..config import EngineConfig
from ..config_fields import resolved
from ..lora.catalog import AdapterLease
from ..lora.composition import ComposedLeases, Composition, open_composed
from ..lora.manager import LoRAManager
from ..lora.merge_policy import MergePolicy
from ..lora.registry import AdapterRecord
from ..model.arch import ModelArch
from ..model.cpu_kernels import cpu_kernels
from ..model.huge_pages import move_to_huge_pages, thp_mode
from ..model.kernel_rows import ALL_BUCKETS, kernel_buckets
from ..model.llama import LlamaModel
from ..model.loader import load_model, torch_dtype
from .grammar import GrammarCompiler
from .grammar_bitmask import GrammarBitmask
from .intra_op import default_num_threads, run_at_threads
from .kv_cache import KVCache
from .merging import Merging
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .resolve import describe, resolve_config
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


def _eos_token_ids(path: Path, arch: ModelArch, tokenizer) -> set[int]:
    ids = set(arch.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    """Built from parts (nano-vllm's shape): a loaded model, its tokenizer and the config. `from_config`
    loads them from a checkpoint; a benchmark hands in a random-weight model instead (bench/random_engine.py).
    tokenizer None: no detokenization (outputs carry token ids only, and stop strings are not looked for).
    config is resolved against the model (engine/resolve.py; a resolved one resolves to itself) and logged."""

    def __init__(self, model: LlamaModel, tokenizer, config: EngineConfig, base_name: str = "base",
                 eos_token_ids: set[int] | None = None, model_path: Path | None = None,
                 kernels_asked: str | None = None):  # fmt: skip
        """kernels_asked: the cpu_kernels setting before resolution, when `config` is already resolved."""
        kernels_asked = kernels_asked or config.model.cpu_kernels
        config = resolve_config(config, model)
        log.info("resolved config: %s", describe(config))
        sc = config.scheduler
        self.config = config
        self.model = model
        self.arch = model.arch
        self.device, self.dtype = model.device, model.dtype
        self.model_path = model_path
        self.base_name = base_name
        self.max_model_len = resolved(sc.max_model_len, "max_model_len")
        self.max_num_batched_tokens = resolved(sc.max_num_batched_tokens, "max_num_batched_tokens")
        self.tokenizer = tokenizer
        self.num_threads = config.model.num_threads or default_num_threads()  # of CPU ops, on the thread that steps
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else set(self.arch.eos_token_ids)
        self.kv_cache = KVCache(self.arch, config.cache, self.dtype, self.device, self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv_cache)
        if config.model.quantization is not None and model.quantization is None:
            model.quantize(config.model.quantization)  # its weights are float until here, as loaded
        if self.device.type == "cpu":  # before anything holds the weights (model/huge_pages.py)
            moved = move_to_huge_pages(model)
            log.info("base weights in transparent huge pages: %.0f MB (transparent_hugepage: %s)", moved / 1e6, thp_mode())
        kernels = cpu_kernels()[0] if config.model.cpu_kernels == "on" else None
        # auto: the base's float matmuls go to the kernels at the step sizes where they win on this machine
        # (measured once per machine and model shape, model/kernel_rows.py); on: at every size up to 64 rows.
        # Quantized weights choose their own path (model/quantized_weight.py).
        measure = kernels_asked == "auto" and model.quantization is None
        buckets = ALL_BUCKETS
        if kernels is not None and measure:  # at the steps' thread count, which this thread may not have
            buckets = run_at_threads(self.num_threads, lambda: kernel_buckets(model.step_weights(), kernels), "lora-serve-kernel-rows")
        model.use_cpu_kernels(kernels, buckets)  # before the LoRA slots read it
        self.lora = LoRAManager(self.model, config.lora, self.base_name)  # residency: engine thread only
        self.adapters = self.lora.catalog  # the door for every other thread
        self.adapters.register_startup_adapters()
        lc = config.lora
        self.merge_policy = None
        if lc.merge_policy == "auto":
            self.merge_policy = MergePolicy(lc.merge_threshold, lc.unmerge_threshold, lc.merge_window_steps, lc.merge_interval_steps)
        self.merging = Merging(self.lora, self.adapters, self.kv_cache, self.merge_policy)
        if lc.merge:
            self.merge_adapter(lc.merge)
        self.scheduler = Scheduler(
            self.kv_cache,
            sc.max_num_seqs,
            self.max_num_batched_tokens,
            self.lora,
            max_lora_bypass=sc.max_lora_bypass,
            long_prefill_token_threshold=sc.long_prefill_token_threshold,
            merged_identity=lambda: self.lora.merged.identity,
            max_prefill_stall=sc.max_prefill_stall,
        )
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)
        # Structured outputs: the API compiles a request's grammar with this (off the engine thread); the
        # step fills the constrained rows' masks on a worker while the model runs (grammar_bitmask.py).
        self.grammar_compiler = GrammarCompiler(tokenizer, self.arch.vocab_size, self.eos_token_ids) if tokenizer is not None else None
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._rng = random.Random(config.model.seed)
        self._seqs: dict[str, Sequence] = {}
        log.info(
            "engine: %s (%s) on %s, %s, max_model_len=%d, KV cache %d blocks x %d tokens, prefix caching %s",
            model_path or "a model built in memory",
            self.arch.architecture,
            self.device,
            self.dtype,
            self.max_model_len,
            self.kv_cache.num_usable_blocks,
            self.kv_cache.block_size,
            "on" if config.cache.enable_prefix_caching else "off",
        )

    @classmethod
    def from_config(cls, config: EngineConfig, model_path: Path, base_name: str | None = None) -> LLMEngine:
        """Load the checkpoint at model_path on the device, in the dtype, the config resolves to here, and build the engine."""
        path = Path(model_path)
        if config.model.num_threads:
            torch.set_num_threads(config.model.num_threads)
        kernels_asked = config.model.cpu_kernels
        config = resolve_config(config, ModelArch.from_dir(path))
        mc, max_len = config.model, resolved(config.scheduler.max_model_len, "max_model_len")
        model = load_model(path, torch_dtype(mc.dtype), torch.device(mc.device), max_len)
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = _eos_token_ids(path, model.arch, tokenizer)
        return cls(model, tokenizer, config, base_name or path.name, eos, path, kernels_asked)

    # --- requests -------------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never run."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context length {self.max_model_len}")
        vocab_size = self.arch.vocab_size
        if not all(0 <= t < vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
        # Both index the logits (logit_bias; stop_token_ids under min_tokens).
        if not all(0 <= t < vocab_size for t in (*params.logit_bias, *params.stop_token_ids)):
            raise ValueError(f"logit_bias and stop_token_ids token ids must lie in [0, {vocab_size})")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | AdapterLease | Composition | ComposedLeases | None = None,
    ) -> None:
        """Queue a request on the base (None), an adapter or a weighted composition of adapters: a name or
        a Composition, opened here (blocking I/O if not in CPU memory), or the lease(s) the caller opened
        off this thread (as AsyncEngine does). The leases are the engine's from here: closed at once if the
        request is refused or anything fails before it is queued, else when it ends."""
        lease = lora if isinstance(lora, AdapterLease) else None
        composed = lora if isinstance(lora, ComposedLeases) else None
        try:
            if isinstance(lora, Composition):
                lora = lora.plain_name or lora  # one adapter at weight 1.0 is that adapter
            if isinstance(lora, str):
                lease = self.adapters.open(lora)  # AdapterNotFoundError for an unknown name
            elif isinstance(lora, Composition):
                composed = open_composed(lora, self.adapters.open)
            if request_id in self._seqs:
                raise ValueError(f"request id {request_id!r} is already running")
            self.check_request(prompt_token_ids, params)
            if composed is not None:
                self.check_composition(composed.composition)
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator().manual_seed(seed)
            seq = Sequence(request_id, list(prompt_token_ids), params, gen, lease.name if lease else None, lease=lease, composed=composed)
            if params.grammar is not None:
                seq.matcher = params.grammar.matcher()
            self.scheduler.add(seq)
        except BaseException:
            for held in (lease, composed):
                if held is not None:
                    held.close()
            raise
        self._seqs[request_id] = seq

    def check_composition(self, composition: Composition) -> None:
        """Raise AdapterError (a ValueError) for a composition that can never run: more adapters than max_loras,
        an unknown one, or weights that can overflow (AdapterCatalog.check_composition)."""
        self.adapters.check_composition(composition)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; returns its last delta (finish_reason "abort"), None if it was not running."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self.output.delta(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        del self._seqs[seq.request_id]
        for held in (seq.lease, seq.composed):
            if held is not None:
                held.close()

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after a failed step) and free what they held."""
        outputs = [self._fail(seq, message) for seq in list(self._seqs.values())]
        self.kv_cache.reset_prefix_cache()
        return outputs

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        self._finish(seq, "error")
        out = self.output.delta(seq)
        out.error = message
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def adapters_in_flight(self) -> tuple[set[str], set[str]]:
        """Adapter names of the running and of the waiting requests (read from any thread, for metrics)."""
        running = {name for s in list(self.scheduler.running) for name in s.adapter_names}
        waiting = {name for s in list(self.scheduler.waiting) for name in s.adapter_names}
        return running, waiting

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampling = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if n == s.num_new_tokens]  # not mid-prefill
        grammar = GrammarBitmask.fill(sampling, self.arch.vocab_size, self._grammar_pool)  # during the forward pass
        try:
            ready, logits = self.run_batch(batch)
        except BaseException:
            self.kv_cache.reset_prefix_cache()  # blocks cached in this step may hold partial K/V
            raise
        failed, ready, logits = self.fail_non_finite(ready, logits)
        tokens, logprobs = sample(logits, ready, self.eos_token_ids, grammar)
        outputs = failed + self.postprocess(ready, tokens, logprobs)
        self.scheduler.observe(batch, time.perf_counter() - started)  # the streams' inter-token latency
        if self.merge_policy is not None:
            self.merging.apply_policy(batch)
        return outputs

    def run_batch(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """One forward pass over the scheduled batch: the sequences with a token to sample now (the rest
        are mid-prefill) and their last-token logits [len(ready), vocab] float32."""
        lora = self.lora.prepare(batch.seqs, batch.num_new_tokens)
        logits = self.runner.run(batch.seqs, batch.num_new_tokens, lora)
        return [seq for seq in batch.seqs if seq.num_new_tokens == 0], logits

    def fail_non_finite(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[RequestOutput], list[Sequence], torch.Tensor]:
        """Fail the sequences whose logits hold NaN or Inf; the rest of the batch, and its logits, go on.

        Rows never mix (projections are row-wise, attention reads only a sequence's own KV blocks,
        see kv_cache.py), so non-finite values stay in the request that produced them: e.g. one whose
        adapter's delta overflows the dtype on this prompt. Its blocks are cleared when freed."""
        # logits: [len(seqs), vocab]. A NaN or Inf anywhere in a row makes its sum non-finite, so one
        # reduction clears the usual batch (4 ms of isfinite over 32 x 49152 logits, 0.2 ms of sum).
        if bool(torch.isfinite(logits.sum(dim=-1)).all()):
            return [], seqs, logits
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # a finite row can still sum past float32's range
        if all(finite):
            return [], seqs, logits
        failed = []
        for seq in (s for s, ok in zip(seqs, finite) if not ok):
            adapter = f"adapter {seq.adapter_key!r}" if seq.adapter_key else "the base model"
            log.warning("request %s: non-finite logits with %s; failing it", seq.request_id, adapter)
            failed.append(self._fail(seq, f"the model's output for this request is not finite (NaN or Inf) with {adapter}"))
        keep = [i for i, ok in enumerate(finite) if ok]
        return failed, [seqs[i] for i in keep], logits[keep]

    # --- merged mode (between steps: merging.py) -----------------------------------------------

    def merge_adapter(self, name: str, auto: bool = False) -> None:
        """Fold `name` into the base weights now (Merging.merge)."""
        self.merging.merge(name, auto)

    def unmerge_adapter(self, name: str | None = None) -> None:
        """Restore the base weights bit for bit, if `name` (None: any adapter) is the merged one."""
        self.merging.unmerge(name)

    def remove_adapter(self, record: AdapterRecord) -> None:
        """Unregister that registration of an adapter, unmerging it first if merged (Merging.remove)."""
        self.merging.remove(record)

    def postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> list[RequestOutput]:
        outputs = []
        for seq, token, lp in zip(seqs, tokens, logprobs):
            reason = self.output.append(seq, token, lp)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self.output.delta(seq))
        return outputs
