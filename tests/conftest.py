"""Session fixtures: model directories shared by the whole suite.

- default_model_dir: the embedded SmolLM2-135M-Instruct, converted once per machine into
  <repo>/.cache (about 30 s the first time, instant afterwards).
- s3: a local S3 API (moto's server) for the s3:// adapter sources (tests/lora/s3_helpers.py).
- tiny_llama_dir / tiny_qwen2_dir: random 2-layer models (hidden 64) that reuse the
  SmolLM2 tokenizer and chat template, so they are complete HF directories that load in
  well under a second. Their outputs are noise; use them for shape and equivalence checks.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from lora_serve.model.cpu_kernels import CPUKernels, cpu_kernels
from lora_serve.model.default_model import resolve_model_path

if TYPE_CHECKING:
    from tests.lora.s3_helpers import LocalS3

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = REPO_ROOT / ".cache"  # gitignored; survives between runs on one machine
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Small but not degenerate: GQA (4 query heads share 2 KV heads), head_dim 16.
# vocab_size matches the SmolLM2 tokenizer so it can be reused as is.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_SERVE_CACHE", str(TEST_CACHE))
        return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    config = LlamaConfig(
        **TINY_SHAPE,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return _save_tiny(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    config = Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True, rope_theta=1000000.0)
    return _save_tiny(Qwen2ForCausalLM, config, tmp_path_factory.mktemp("tiny-qwen2"), default_model_dir)


def _save_tiny(model_cls: type[PreTrainedModel], config: PretrainedConfig, out: Path, tokenizer_src: Path) -> Path:
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        # HF initialises biases to zero, which would hide a dropped q/k/v bias (Qwen2).
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, out / name)
    return out


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache() -> Iterator[None]:
    """Everything the suite caches or stores by default (model, adapters) goes under <repo>/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_SERVE_CACHE", str(TEST_CACHE))
        yield


@pytest.fixture(scope="session")
def kernels() -> CPUKernels:
    """The CPU kernels (lora_serve/model/cpu_kernels.py), built once; a test that needs them skips where they cannot build."""
    k, why = cpu_kernels()
    if k is None:
        pytest.skip(f"CPU kernels unavailable here: {why}")
    return k


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    """A real S3 API (moto's server) on 127.0.0.1, with AWS_ENDPOINT_URL and fake credentials set; a bucket per test."""
    from tests.lora.s3_helpers import local_s3  # moto loads only for the tests that use it

    with local_s3() as store:
        yield store
