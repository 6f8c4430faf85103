"""The embedded default model: converted once into a plain HF directory; bad model arguments refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lora_serve.model import default_model
from lora_serve.model.arch import UnsupportedModelError
from lora_serve.model.default_model import DEFAULT_MODEL_NAME, resolve_model_path

TEST_CACHE = Path(__file__).resolve().parents[2] / ".cache"


def test_default_model_is_a_plain_hf_directory(default_model_dir: Path) -> None:
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["vocab_size"] == 49152
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()
    assert (default_model_dir / "tokenizer_config.json").is_file()
    assert not list(default_model_dir.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"))


def test_default_model_tokenizer_has_chat_template(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_second_resolve_reuses_the_conversion(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = default_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setenv("LORA_SERVE_CACHE", str(TEST_CACHE))
    start = time.perf_counter()
    assert resolve_model_path(None) == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime


def test_local_directory_is_returned_as_is(tiny_llama_dir: Path) -> None:
    assert resolve_model_path(str(tiny_llama_dir)) == tiny_llama_dir


@pytest.mark.parametrize(
    "make_arg, expected",
    [
        (lambda tmp: str(tmp / "missing"), "not an existing directory"),
        (lambda tmp: "HuggingFaceTB/SmolLM2-135M-Instruct", "not an existing directory"),  # hub ids are not fetched
        (lambda tmp: str(tmp), "no config.json"),
        (lambda tmp: str(_touch(tmp / "config.json")), "not an existing directory"),  # a file, not a directory
    ],
    ids=["missing-path", "hub-id", "dir-without-config", "file"],
)
def test_bad_model_argument_is_refused(tmp_path: Path, make_arg, expected: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        resolve_model_path(make_arg(tmp_path))
    message = str(err.value)
    assert expected in message
    for hint in ("Hugging Face directory", "Llama", "Qwen2", "Mistral", DEFAULT_MODEL_NAME, "nothing is downloaded"):
        assert hint in message


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LORA_SERVE_CACHE": "/a", "HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/a/models"),
        ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/b/lora-serve/models"),
        ({"XDG_CACHE_HOME": "/c"}, "/c/lora-serve/models"),
        ({"HOME": "/h"}, "/h/.cache/lora-serve/models"),
    ],
)
def test_cache_location_precedence(env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORA_SERVE_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_model.default_model_dir() == Path(expected) / DEFAULT_MODEL_NAME


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file")
    monkeypatch.setenv("LORA_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "find_default_gguf", lambda: bad_gguf)
    with pytest.raises(Exception):  # noqa: B017 (whatever the GGUF reader raises on garbage; the cleanup is the point)
        resolve_model_path(None)
    models = tmp_path / "cache" / "models"
    assert not (models / DEFAULT_MODEL_NAME).exists()
    assert not list(models.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"))


def _touch(path: Path) -> Path:
    path.write_text("{}")
    return path
