"""The field types and helpers the typed configs (config.py, lora_config.py) share: the choices of
"auto"-able settings, `resolved` for a field the engine fills in, and the strict base model whose
field docstrings become the CLI help."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LoRABackend = Literal["auto", "torch", "triton"]
CPUKernels = Literal["auto", "on", "off"]
Quantization = Literal["int8", "int4"]
T = TypeVar("T")


def resolved(value: T | None, field: str) -> T:
    """A field engine/resolve.py sets when it is unset; ValueError naming it in a config that was not resolved."""
    if value is None:
        raise ValueError(f"{field} is unset: the engine's config is resolved first (engine/resolve.py)")
    return value


# Unknown fields are refused, each field's docstring is its description, and assignment is validated.
class ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
