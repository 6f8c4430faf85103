"""Shared by the adapter API tests: an engine with its own adapter_dir, PEFT references, uploads.

PEFT adapters are random LoRAs on the tiny Llama (hidden 64, 2 layers), saved with
`save_pretrained`; the PeftModel that made them is the reference for their outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
from tests.api.live_server import LiveServer, live_server
from tests.lora.conftest import ATTN, MLP, make_peft_adapters
from tests.lora.peft_reference import reference

MAX_RANK = 16
B_STD = 0.05  # larger than the suite's default: on the tiny model this makes every adapter change greedy tokens
TINY_ADAPTERS: dict[str, dict] = {
    "r4-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "r8-all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "r2-mlp": dict(r=2, lora_alpha=4, target_modules=MLP),
}
ADMIN = "sk-admin"
# Names every route refuses (400 naming the name field). A leading dot would be the store's own
# dot-folders (.upload-*, .deleted-*), which the start-up scan skips and its clean-up removes.
BAD_NAMES: dict[str, str] = {
    "escapes": "../x",
    "has-slash": "a/b",
    "65-chars": "x" * 65,
    "empty": "",
    "dot": ".",
    "dotdot": "..",
    "upload-prefix": ".upload-x",
    "deleted-prefix": ".deleted-x",
    "leading-dot": ".hidden",
    "leading-dash": "-x",
    "leading-underscore": "_x",
    "has-space": "a b",
    "has-colon": "tiny:x",  # reads as "base:adapter"
    "non-ascii": "café",
    "trailing-newline": "x\n",
}
# Names every route accepts, vLLM's usual ones among them; all come back after a restart.
GOOD_NAMES = ["sql-lora", "my_adapter.v2", "9", "A.b-c_d", "x" * 64, "a..b", "lock"]


def make_tiny_adapters(tiny_dir: Path, out: Path, configs: dict[str, dict] = TINY_ADAPTERS, seed: int = 0):
    """(peft_model, {name: folder})."""
    return make_peft_adapters(tiny_dir, out, configs, seed=seed, b_std=B_STD)


@contextmanager
def tiny_engine_with(tiny_dir: Path, adapter_dir: Path | str, **lora: object) -> Iterator[AsyncEngine]:
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_dir), device="cpu", dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256),
        lora=LoRAConfig(adapter_dir=adapter_dir, max_lora_rank=MAX_RANK, **lora),
    )
    engine = AsyncEngine.from_config(config)
    try:
        yield engine
    finally:
        engine.shutdown()


@contextmanager
def modules_server(tiny_dir: Path, paths: dict[str, Path], store: Path, **lora: object) -> Iterator[LiveServer]:
    """A live server ("tiny") on its own engine, with `paths` registered as --lora-modules."""
    modules = [f"{name}={path}" for name, path in paths.items()]
    with tiny_engine_with(tiny_dir, store, lora_modules=modules, **lora) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny")) as live:
            yield live


def sha256_of(path: Path) -> str:
    """What AdapterInfo.sha256 must say of an adapter read from this weights file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_files(folder: Path) -> dict[str, bytes]:
    """The two files an upload carries, keyed by form field."""
    return {
        "adapter_config": (folder / CONFIG_FILE).read_bytes(),
        "adapter_model": (folder / WEIGHTS_FILE).read_bytes(),
    }


def upload_form(name: str | None, files: dict[str, bytes], filenames: dict[str, str] | None = None) -> dict:
    """httpx keyword arguments for a multipart upload (name None: the field is left out)."""
    names = {"adapter_config": CONFIG_FILE, "adapter_model": WEIGHTS_FILE, **(filenames or {})}
    return {
        "data": {} if name is None else {"name": name},
        "files": {field: (names[field], content) for field, content in files.items()},
    }


def upload(
    base_url: str,
    name: str | None,
    files: dict[str, bytes],
    api_key: str = ADMIN,
    filenames: dict[str, str] | None = None,
) -> httpx.Response:
    form = upload_form(name, files, filenames)
    return httpx.post(f"{base_url}/v1/adapters", headers=admin_headers(api_key), timeout=60, **form)


def admin_headers(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt the server builds for a chat request (template rendered, then encoded as is)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def peft_greedy(peft_model, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    """PEFT's greedy continuation (None: the base), recomputed in full per token."""
    return reference(peft_model, adapter, prompt, n)[0]


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """What the API's logprobs call each token (its text decoded alone)."""
    return [tokenizer.decode([i]) for i in ids]
