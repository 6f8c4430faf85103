"""`lora-serve bench gpu-check`: what it measures, and the full or tiny plan its unset fields are filled from
(the run: gpu_check.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliImplicitFlag, CliVariadicArg


class BenchGPUCheck(BaseModel):
    """Fused LoRA kernels vs the torch path, then throughput vs the base, on random Llama-3.2-1B / Llama-3-8B shapes."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    tiny: CliImplicitFlag[bool] = False
    """The 2-layer tiny shape and a small plan: this code on a CPU in seconds. Fields given explicitly still win."""

    shapes: CliVariadicArg[list[str] | None] = None
    """Model shapes (lora_serve/bench/llama_shapes.py), random weights. Default: llama-3.2-1b llama-3-8b."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Base dtype. auto: bfloat16 on CUDA, float32 on CPU."""

    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Adapter weight dtype in the slots (serve's --lora-dtype). auto: the base dtype on CUDA, float32 on CPU."""

    backend: Literal["auto", "torch", "triton"] = "auto"
    """LoRA ops of the throughput runs (the kernel checks run every backend available)."""

    num_seqs: int | None = Field(None, ge=1)
    """Sequences per batch, at least the largest of --num-adapters-list. Default: 64."""

    num_adapters_list: CliVariadicArg[list[int] | None] = None
    """Distinct adapters in the mixed batches (one device slot each). Default: 8 32 64."""

    rank: int = Field(16, ge=1)
    """Adapter rank (all seven projections)."""

    prompt_len: int | None = Field(None, ge=1)
    """Prompt tokens per sequence (the prefill step runs num_seqs x prompt_len tokens). Default: 128."""

    decode_steps: int | None = Field(None, ge=1)
    """Decode steps timed after the prefill step. Default: 32."""

    repeats: int | None = Field(None, ge=1)
    """Rounds after the warm-up (medians reported). Default: 3."""

    profile_steps: int | None = Field(None, ge=0)
    """Decode steps timed, then as many profiled (torch.profiler), for the base and the largest mix: the
    step's wall time against the device's kernel time and launches (step_profile.py). 0: no profile. Default: 8."""

    seed: int = 0
    """Seed for weights, adapters and prompts."""

    def plan(self) -> BenchGPUCheck:
        """Every unset field filled from the full plan, or the tiny one with --tiny."""
        full = dict(
            shapes=["llama-3.2-1b", "llama-3-8b"],
            num_seqs=64,
            num_adapters_list=[8, 32, 64],
            prompt_len=128,
            decode_steps=32,
            repeats=3,
            profile_steps=8,
        )
        tiny = dict(shapes=["tiny"], num_seqs=8, num_adapters_list=[2, 4], prompt_len=16, decode_steps=4, repeats=1, profile_steps=2)
        defaults = tiny if self.tiny else full
        plan = self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})
        assert plan.num_seqs is not None and plan.num_adapters_list is not None  # filled from the defaults
        if plan.num_seqs < max(plan.num_adapters_list):
            raise ValueError(f"--num-seqs ({plan.num_seqs}) must be >= the largest of --num-adapters-list")
        return plan

    def cli_cmd(self) -> None:
        from lora_serve.bench import gpu_check

        gpu_check.run(self.plan())
