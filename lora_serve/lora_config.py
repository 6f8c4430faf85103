"""LoRAConfig: adapter slots, memory, sources (local folders and s3://) and merging; and the adapter
locations it reads (`Location`, `is_remote`). One part of EngineConfig (config.py), which the engine's
lora/ package is built from; `lora-serve serve --help` prints its field docstrings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from .config_fields import ConfigBase, Dtype, LoRABackend

S3_SCHEME = "s3://"


def is_remote(location: str | Path) -> bool:
    """An object-store URL ("s3://bucket/prefix"), not a local path."""
    return isinstance(location, str) and "://" in location


def _location(value: object) -> object:
    # A Path would fold "s3://b/p" into "s3:/b/p": a URL stays the string it is.
    return value if isinstance(value, Path) or (isinstance(value, str) and is_remote(value)) else Path(str(value))


# A local folder (a Path), or an object-store URL such as s3://bucket/prefix (a str).
Location = Annotated[Path | str, BeforeValidator(_location)]


class LoRAConfig(ConfigBase):
    lora_memory_gb: float | None = Field(None, gt=0)
    """Memory for resident adapters, in GiB: each takes exactly its own rank's bytes, and as many as fit
    are mixed in one batch (least recently used unpinned ones are evicted for others). Default: 10% of
    the GPU's memory on CUDA; 4 GiB on CPU, where it bounds the CPU copies the matmuls read in place."""

    max_loras: int | None = Field(None, ge=1)
    """Optional cap on adapters resident at once, so one batch mixes at most this many (vLLM's flag).
    Default: no cap (lora_memory_gb decides)."""

    max_cpu_loras: int | None = Field(None, ge=1)
    """Optional cap on adapters kept in CPU memory (LRU) beside their byte bound. Must be >= max_loras."""

    max_lora_rank: int = Field(64, ge=1, le=1024)
    """Largest adapter rank accepted."""

    lora_backend: LoRABackend = "auto"
    """Mixed-adapter LoRA ops. auto: fused Triton kernels on CUDA when triton imports, else plain torch
    (logged at start). triton needs CUDA (or TRITON_INTERPRET=1 with CPU tensors, for tests)."""

    lora_dtype: Dtype = "auto"
    """Adapter weight dtype in the device slots. auto: float32 on CPU (small bfloat16 matmuls are slower
    there), the base model's dtype on CUDA (a decode step reads every adapter of the batch; float32 doubles
    those bytes). The low-rank intermediate x·Aᵀ stays float32 either way."""

    adapter_dir: Location | None = None
    """Folder of adapters: every sub-folder is a PEFT adapter named after the folder, registered at start,
    and one that appears later is registered when a request first names it. Uploads are stored here. An
    s3://bucket/prefix works the same way, read-only (uploads are refused; store adapters there with your
    S3 tools). Default: <cache>/adapters (cache: $LORA_SERVE_CACHE, else under $HF_HOME or ~/.cache)."""

    lora_modules: list[str] = Field(default_factory=list)
    """Adapters to register at start, as name=path (a local folder or s3://bucket/prefix)."""

    allowed_lora_dir: list[Location] = Field(default_factory=list)
    """Directories from which POST /v1/load_lora_adapter may load (repeatable): local folders, or
    s3://bucket/prefix for any lora_path under that prefix. Empty: that endpoint is refused."""

    adapter_cache_dir: Path | None = None
    """Where adapters read from s3:// are copied, one folder per version (keyed by the objects' ETags), so
    an unchanged adapter is never downloaded twice. boto3 reads the standard AWS environment
    (AWS_ENDPOINT_URL for an S3-compatible store such as MinIO). Default: <cache>/s3-adapters."""

    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    """Largest adapter accepted (bytes, both files together), uploaded or downloaded from s3://."""

    merge: str | None = None
    """Adapter to merge into the base weights at start: that fine-tune is served at base cost from the first request."""

    merge_policy: Literal["off", "auto"] = "off"
    """auto: merge an adapter that has most of the recent tokens, unmerge when it no longer has."""

    merge_threshold: float = Field(0.9, gt=0, le=1)
    """auto policy: merge an adapter once its share of the tokens in the window reaches this."""

    unmerge_threshold: float = Field(0.6, gt=0, lt=1)
    """auto policy: unmerge once the merged adapter's share falls below this (hysteresis)."""

    merge_window_steps: int = Field(64, ge=1)
    """auto policy: the window of recent engine steps whose tokens are counted."""

    merge_interval_steps: int = Field(256, ge=1)
    """auto policy: at most one merge or unmerge per this many engine steps."""

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        if self.unmerge_threshold >= self.merge_threshold:
            raise ValueError("unmerge_threshold must be below merge_threshold")
        if self.max_cpu_loras is not None and self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        for spec in self.lora_modules:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules entry {spec!r} must look like name=path")
        remote = [str(d) for d in [self.adapter_dir, *self.allowed_lora_dir] if d is not None and is_remote(d)]
        remote += [path for _, _, path in (spec.partition("=") for spec in self.lora_modules) if is_remote(path)]
        for url in remote:
            if not url.startswith(S3_SCHEME):
                raise ValueError(f"{url!r}: adapters are read from local folders or {S3_SCHEME}bucket/prefix")
        return self
