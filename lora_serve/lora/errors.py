"""Why an adapter was refused, with the HTTP status the API answers with.

Every error is a `ValueError` carrying `message`, `param` (the config field, tensor or
request field at fault, or None), `status` and `code` (OpenAI's machine-readable reason, or
None); the API layer only translates them.
"""

from __future__ import annotations


class AdapterError(ValueError):
    status: int = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidAdapterError(AdapterError):
    """The folder, config or weights are not a well-formed LoRA adapter for this base model."""

    status = 400


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT feature that lora-serve does not implement (DoRA, modules_to_save, ...)."""

    status = 400


class ForbiddenPathError(AdapterError):
    """The adapter path lies outside the directories the server may read."""

    status = 403


class AdapterNotFoundError(AdapterError):
    status = 404


class AdapterExistsError(AdapterError):
    status = 409


class AdapterMergedError(AdapterError):
    """The adapter is folded into the base weights: it cannot be unregistered until it is unmerged."""

    status = 409
    code = "adapter_merged"


class QuantizedBaseError(AdapterError):
    """A merge was asked of a server whose base is quantized (--quantization): merging cannot be exact there."""

    status = 409
    code = "base_quantized"


class AdapterChangedError(AdapterError):
    """Its files changed in place since it was registered: read again, they are other weights than those
    its name stands for (and its cached K/V is keyed by: engine/block_hash.py)."""

    status = 409
    code = "adapter_changed"


class AdapterBusyError(AdapterError):
    """Every CPU place (max_cpu_loras) holds an adapter in use, and the caller would not wait for one."""

    status = 503


class AdapterTooLargeError(AdapterError):
    status = 413


class UnsupportedMediaError(AdapterError):
    """Weights in a format we refuse to read, e.g. pickled `.bin` / `.pt` (arbitrary code on load)."""

    status = 415


class SourceUnavailableError(AdapterError):
    """The store an adapter is read from (s3://) could not be reached or failed to answer."""

    status = 502
    code = "source_unavailable"
