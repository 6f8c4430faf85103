"""A compact Llama-family decoder (Llama 2/3.x, SmolLM, Qwen2, Mistral) for continuous batching.

Every projection is a `Linear` the LoRA layer can reach: `qkv_proj` (slices q_proj,
k_proj, v_proj), `o_proj`, `gate_up_proj` (slices gate_proj, up_proj), `down_proj`.
Weights come from HF safetensors (see loader.py); logits match transformers' own
implementation (tests/model/test_llama.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelArch
from .attention import Attention, AttentionMetadata
from .cpu_kernels import CPUKernels
from .cpu_layer_ops import CPULayerOps
from .cpu_layers import CPUDecoderLayers
from .kernel_rows import ALL_BUCKETS
from .linear import Linear, LoRABatch, linear
from .quantized_weight import Quantization, QuantizedWeight, quantize_weight
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.ops: CPULayerOps | None = None  # set by LlamaModel.use_cpu_kernels

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, D] -> [T, D]; with `add`, x += add first, in place (the residual stream)
        if self.ops is not None and x.dtype is torch.float32 and x.is_cpu:
            return self.ops.rms_norm(x, self.weight, self.eps, add)
        if add is not None:
            x.add_(add)
        # Normalise in float32, as HF does, then scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.arch = arch
        self.rope = rope
        kv = arch.kv_size
        self.qkv_proj = Linear(arch.hidden_size, {"q_proj": arch.q_size, "k_proj": kv, "v_proj": kv}, arch.attention_bias, dtype, device)
        self.o_proj = Linear(arch.q_size, {"o_proj": arch.hidden_size}, False, dtype, device)
        self.attn = Attention(arch.num_heads, arch.num_kv_heads, arch.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None) -> torch.Tensor:
        a = self.arch
        qkv = self.qkv_proj(x, lora)  # [T, q + 2kv]
        if self.attn.takes_packed(qkv):  # the CPU layer ops: rotary, cache write and decode attention in three calls
            return self.o_proj(self.attn.forward_packed(qkv, meta, self.rope), lora)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        T = x.shape[0]
        q, k = self.rope(meta.positions, q.view(T, a.num_heads, a.head_dim), k.view(T, a.num_kv_heads, a.head_dim))
        out = self.attn(q, k, v.view(T, a.num_kv_heads, a.head_dim), meta)
        return self.o_proj(out, lora)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        n = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, {"gate_proj": n, "up_proj": n}, False, dtype, device)
        self.down_proj = Linear(n, {"down_proj": arch.hidden_size}, False, dtype, device)
        self.ops: CPULayerOps | None = None  # set by LlamaModel.use_cpu_kernels

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)  # [T, 2 * intermediate]
        if self.ops is not None and gate_up.dtype is torch.float32 and gate_up.is_cpu:
            return self.down_proj(self.ops.silu_mul(gate_up), lora)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = SelfAttention(arch, rope, dtype, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = MLP(arch, dtype, device)

    def linears(self) -> tuple[Linear, ...]:
        """The block's four projections; their slices carry the seven PEFT module names."""
        return (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)

    def linear_of(self, module: str) -> Linear:
        """The projection holding PEFT module `module` (e.g. "k_proj" -> qkv_proj) as one of its slices."""
        return next(linear for linear in self.linears() if module in linear.slice_names)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        # x: [T, hidden], the residual stream, updated in place (the model's own tensor from the embedding on).
        # pending: the layer before's MLP output, not yet in x; returned: x and this layer's. Each add goes
        # into the norm after it (x += add, then the norm: one call on the CPU ops, not a torch add of its own).
        h = self.self_attn(self.input_layernorm(x, add=pending), meta, lora)
        h = self.post_attention_layernorm(x, add=h)
        return x, self.mlp(h, lora)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.arch = arch
        self.max_len = max_len  # positions the rotary tables cover: the longest sequence it can run
        self.dtype = dtype
        self.device = device
        rope = RotaryEmbedding(arch, max_len, device)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        # An nn.ModuleList, which torch's stubs do not make generic: typed as the layers it holds.
        self.layers = cast("Sequence[DecoderLayer]", nn.ModuleList(DecoderLayer(arch, rope, dtype, device) for _ in range(arch.num_layers)))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.lm_head_weight: torch.Tensor | QuantizedWeight
        self.quantization: Quantization | None = None  # set by quantize()
        if arch.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        self.kernels: CPUKernels | None = None
        self.kernel_buckets = ALL_BUCKETS
        self.decoder_layers: CPUDecoderLayers | None = None  # every layer of a step in one call, where it can (cpu_layers.py)

    def use_cpu_kernels(self, kernels: CPUKernels | None, buckets: frozenset[int] = ALL_BUCKETS) -> None:
        """Run the projections and the LM head through the CPU kernels for steps whose rows fall in `buckets`
        (kernel_rows.py), and float32 norms, rotary, silu-and-multiply and attention through their layer ops at every row
        count; None: torch's ops. The LoRA slots read float16 adapters through the kernels either way."""
        self.kernels = kernels
        self.kernel_buckets = buckets
        self.decoder_layers = None if kernels is None else CPUDecoderLayers(kernels.lib, self)
        for m in self.linears().values():
            m.kernels = kernels
            m.kernel_buckets = buckets
        ops = None if kernels is None else kernels.layer_ops  # norms, rotary, silu-and-multiply, attention
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.ops = ops

    @torch.no_grad()
    def quantize(self, method: Quantization) -> None:
        """Replace every projection's weight and the LM head's by its `method` form (quantized_weight.py),
        dropping the float ones. The embedding lookup stays in full precision: a tied LM head gets a
        quantized copy of it."""
        if self.quantization is not None:
            raise ValueError(f"the model is already quantized ({self.quantization})")
        for m in self.linears().values():
            quantized = quantize_weight(m.weight, method)  # type: ignore[arg-type]  # a float model's
            del m.weight  # a registered parameter: nn.Module takes a module under its name only once it is gone
            m.weight = quantized
        lm_head = quantize_weight(self.lm_head_weight, method)  # type: ignore[arg-type]
        del self.lm_head_weight
        self.lm_head_weight = lm_head
        self.quantization = method

    def num_params(self) -> int:
        """The base's weights as its float checkpoint counts them: a quantized weight by its [out, in], a tied
        LM head once."""
        quantized = [m for m in self.modules() if isinstance(m, QuantizedWeight)]
        if self.arch.tie_word_embeddings and isinstance(self.lm_head_weight, QuantizedWeight):
            quantized.remove(self.lm_head_weight)  # the embedding's copy
        return sum(p.numel() for p in self.parameters()) + sum(q.shape[0] * q.shape[1] for q in quantized)

    def step_weights(self) -> list[torch.Tensor]:
        """Every projection's weight and the LM head's, in the order a step multiplies by them (a float model's)."""
        weights = [lin.weight for layer in self.layers for lin in layer.linears()] + [self.lm_head_weight]
        tensors = [w for w in weights if isinstance(w, torch.Tensor)]
        if len(tensors) != len(weights):
            raise ValueError(f"the model is quantized ({self.quantization}): its weights are no float tensors")
        return tensors

    def linears(self) -> dict[str, Linear]:
        """Every LoRA-capable projection by its path, e.g. 'layers.3.self_attn.qkv_proj'."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None = None) -> torch.Tensor:
        # input_ids: [T] -> logits of each sequence's last token: [B, vocab] float32
        first = self.layers[0].self_attn
        if first.attn.ops is not None:  # the CPU layer ops read meta's indexes unchecked: checked once here
            first.attn.check_bounds(meta, first.rope.cos.shape[0])
        x = self.embed_tokens(input_ids)
        pending = None if self.decoder_layers is None else self.decoder_layers.run(x, meta, lora)
        if pending is None:  # not a step the kernels cover whole: layer by layer
            for layer in self.layers:
                x, pending = layer(x, meta, lora, pending)
        x = self.norm(x[meta.logits_index], add=None if pending is None else pending[meta.logits_index])
        return linear(x, self.lm_head_weight, None, self.kernels, self.kernel_buckets).float()
