"""The one resolve step: every "auto" and unset field of an EngineConfig made concrete for this machine and model.

    device                  auto: cuda when torch sees one, else cpu
    dtype                   auto: bfloat16 on CUDA, float32 on CPU
    quantization            None stays None (a model built quantized: its own); refused off CPU
    cpu_kernels             auto: on when the CPU kernels build here (model/cpu_kernels.py), else off; off on CUDA
    lora_dtype              auto: the base's dtype on CUDA (a decode step reads every adapter of the
                            batch; float32 doubles those bytes); on CPU float16 where the CPU kernels
                            run (they read it at half float32's bytes), else float32 (torch's small
                            bf16/fp16 matmuls are slower than float32's there)
    lora_backend            auto: triton on CUDA when it imports, else torch (triton on CPU tensors only
                            under TRITON_INTERPRET=1, and only when asked for)
    lora_memory_gb          unset: 10% of the GPU's memory on CUDA, 4 GiB on CPU
    adapter_dir             unset: <cache>/adapters (model/default_model.py's cache_root)
    adapter_cache_dir       unset: <cache>/s3-adapters
    max_model_len           unset: the model's context length
    max_num_batched_tokens  unset: 2048

A resolved config resolves to itself, so LLMEngine.from_config (before loading: device and dtype
from this machine) and LLMEngine.__init__ (a model in hand: device and dtype are the model's) both
run it. Below the engine (lora/manager.py, budget.py, slots, ops/selector.py, catalog.py) only
concrete values are read. The engine logs the result once at start (`describe`).
"""

from __future__ import annotations

import torch

from ..config import EngineConfig
from ..config_fields import CPUKernels, Device, Dtype, LoRABackend, Quantization, resolved
from ..lora.ops.interpreter import triton_interpreted
from ..lora.ops.selector import triton_batch_class
from ..model.arch import ModelArch
from ..model.cpu_kernels import cpu_kernels
from ..model.default_model import cache_root
from ..model.llama import LlamaModel
from ..model.loader import dtype_name, torch_dtype
from ..model.quantized_weight import KERNEL_MAX_ROWS

GIB = 1 << 30
CPU_LORA_MEMORY_GB = 4.0
CUDA_LORA_MEMORY_FRACTION = 0.10
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's default with chunked prefill


def resolve_config(config: EngineConfig, model: LlamaModel | ModelArch) -> EngineConfig:
    """`config` with every field above concrete; ValueError for what cannot run here.

    model: the base, built (its device, dtype and positions are the engine's: explicit values must
    agree, and max_model_len may not pass its positions), or its architecture before loading (device
    and dtype from this machine; max_model_len defaults to the architecture's context length)."""
    mc, sc, lc = config.model, config.scheduler, config.lora
    if isinstance(model, LlamaModel):
        _check_agrees("device", mc.device, model.device.type)
        _check_agrees("dtype", mc.dtype, dtype_name(model.dtype))
        device, dtype, context_len = model.device, model.dtype, model.max_len
    else:
        device = resolve_device(mc.device)
        dtype = resolve_dtype(mc.dtype, device)
        context_len = model.max_position_embeddings
    max_model_len = sc.max_model_len or context_len
    if isinstance(model, LlamaModel) and max_model_len > model.max_len:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the {model.max_len} positions the model was built for")
    max_num_batched_tokens = sc.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
    if max_num_batched_tokens < sc.max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({sc.max_num_seqs}): "
            "every running sequence decodes a token each step"
        )
    quantization = resolve_quantization(mc.quantization, model.quantization if isinstance(model, LlamaModel) else None, device)
    kernels = resolve_cpu_kernels(mc.cpu_kernels, device, dtype)[0]
    backend = resolve_lora_backend(lc.lora_backend, device)[0]
    lora = {
        "lora_dtype": dtype_name(resolve_lora_dtype(lc.lora_dtype, device, dtype, kernels == "on" and backend == "torch")),
        "lora_backend": backend,
        "lora_memory_gb": lc.lora_memory_gb if lc.lora_memory_gb is not None else default_lora_memory_gb(device),
        "adapter_dir": lc.adapter_dir if lc.adapter_dir is not None else cache_root() / "adapters",
        "adapter_cache_dir": lc.adapter_cache_dir if lc.adapter_cache_dir is not None else cache_root() / "s3-adapters",
    }
    return config.model_copy(
        update={
            "model": mc.model_copy(
                update={"device": device.type, "dtype": dtype_name(dtype), "cpu_kernels": kernels, "quantization": quantization}
            ),
            "scheduler": sc.model_copy(update={"max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens}),
            "lora": lc.model_copy(update=lora),
        }
    )


def describe(config: EngineConfig) -> str:
    """The resolved values in one line, the LoRA backend with why it is the one."""
    mc, sc, lc = config.model, config.scheduler, config.lora
    device = torch.device(mc.device)
    backend, why = resolve_lora_backend(lc.lora_backend, device)
    kernels, kernels_why = resolve_cpu_kernels(mc.cpu_kernels, device, torch_dtype(mc.dtype))
    return (
        f"device={device.type} dtype={mc.dtype} cpu_kernels={kernels} ({kernels_why}) "
        f"quantization={_describe_quantization(mc.quantization, kernels == 'on' and mc.dtype == 'float32')} "
        f"lora_dtype={lc.lora_dtype} lora_backend={backend} ({why}) "
        f"lora_memory_gb={resolved(lc.lora_memory_gb, 'lora_memory_gb'):.2f} adapter_dir={lc.adapter_dir} "
        f"max_model_len={sc.max_model_len} max_num_batched_tokens={sc.max_num_batched_tokens} "
        f"max_prefill_stall={sc.max_prefill_stall}"
    )


def resolve_device(name: Device) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: Dtype, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


def resolve_cpu_kernels(name: CPUKernels, device: torch.device, dtype: torch.dtype) -> tuple[CPUKernels, str]:
    """("on" or "off", why). The same pair for its own result, so `describe` can say why of a resolved config."""
    if device.type != "cpu" or dtype != torch.float32:
        if name == "on":
            raise ValueError(f"cpu_kernels=on needs device=cpu and dtype=float32 (this is {device.type}, {dtype_name(dtype)})")
        return "off", "not a float32 CPU model"
    kernels, why = cpu_kernels()  # built once per process, then cached
    if kernels is None:
        if name == "on":
            raise ValueError(f"cpu_kernels=on was asked for but {why}")
        return "off", f"{why}: torch's matmuls, slower for small batches"
    return ("off", "asked for") if name == "off" else ("on", "built")


def resolve_quantization(name: Quantization | None, built: Quantization | None, device: torch.device) -> Quantization | None:
    """The base's quantization: the configured one, or that of a model built quantized (they must agree)."""
    if name is not None and built is not None and name != built:
        raise ValueError(f"quantization={name} but the model was built with quantization {built}")
    quantization = name or built
    if quantization is not None and device.type != "cpu":
        raise ValueError(
            f"quantization={quantization} runs on CPU only (its matmuls are the CPU kernels' and torch's on "
            f"dequantized weights); on {device.type} serve the base unquantized (dtype bfloat16)"
        )
    return quantization


def _describe_quantization(quantization: Quantization | None, kernels: bool) -> str:
    if quantization is None:
        return "none"
    if not kernels:
        return f"{quantization} (no CPU kernels: every step dequantizes the weights for torch's matmul, slower than float32)"
    return f"{quantization} (CPU kernels up to {KERNEL_MAX_ROWS} rows, then torch's matmul on dequantized weights)"


def resolve_lora_dtype(name: Dtype, device: torch.device, base_dtype: torch.dtype, cpu_kernels_on: bool = False) -> torch.dtype:
    """The slots' dtype: auto is the base's dtype on CUDA; on CPU float16 where the CPU kernels read the
    adapters (cpu_kernels_on: they run, under the torch backend), else float32."""
    if name == "auto":
        if device.type == "cuda":
            return base_dtype
        return torch.float16 if cpu_kernels_on else torch.float32
    return torch_dtype(name)


def resolve_lora_backend(name: LoRABackend, device: torch.device) -> tuple[LoRABackend, str]:
    """(backend, why it is the one). The same pair for its own result: a torch backend on CUDA says
    why triton was not taken (it does not import, or torch was asked for) however it was reached."""
    if device.type != "cuda":
        if name != "triton":
            return "torch", "CPU"
        if not triton_interpreted():
            raise ValueError("lora_backend=triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
    cls, why = triton_batch_class()
    if name == "triton":
        if cls is None:
            raise ValueError(f"lora_backend=triton was asked for but {why}")
        return "triton", "CUDA" if device.type == "cuda" else "interpreter"
    if cls is None:
        return "torch", why
    return ("triton", "CUDA") if name == "auto" else ("torch", "asked for")


def default_lora_memory_gb(device: torch.device) -> float:
    """Exact in GiB: the bytes of 10% of the GPU's memory, divided by a power of two, round-trip."""
    if device.type == "cuda":
        return int(CUDA_LORA_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory) / GIB
    return CPU_LORA_MEMORY_GB


def _check_agrees(field: str, configured: str, built: str) -> None:
    if configured not in ("auto", built):
        raise ValueError(f"{field}={configured} but the model was built with {field} {built}")
