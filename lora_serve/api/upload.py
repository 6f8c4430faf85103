"""Reading an adapter upload (multipart/form-data) without trusting its size or its files.

The body is never buffered past the limit: a Content-Length over it is refused before
anything is read, and a body without one (chunked) or with a false one is counted as it
streams and cut off at the limit. Files are spooled by Starlette's parser (memory, then
a temporary file), so a 500 MB adapter is not held in memory.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from lora_serve.api.errors import APIError, invalid_param
from lora_serve.lora.errors import AdapterTooLargeError, UnsupportedMediaError
from lora_serve.lora.lora_model import PICKLE_SUFFIXES

UPLOAD_ROUTE = ("POST", "/v1/adapters")  # its body streams in under max_adapter_bytes, not max_body_bytes
MULTIPART_OVERHEAD = 16 * 1024  # boundaries, part headers and the name field, on top of the files
PICKLE_PROTO = b"\x80"  # first byte of every pickle since protocol 2 (torch.save writes one inside a zip, too)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container around its pickle
SAFETENSORS_HEAD = 9  # u64 header length + the header's opening "{"


@dataclass
class AdapterUpload:
    name: str
    adapter_config: UploadFile  # adapter_config.json
    adapter_model: UploadFile  # adapter_model.safetensors

    @property
    def num_bytes(self) -> int:
        """Both files together, as stored (what max_adapter_bytes and the tenant's byte quota count)."""
        return (self.adapter_config.size or 0) + (self.adapter_model.size or 0)


def _too_large(limit: int) -> AdapterTooLargeError:
    return AdapterTooLargeError(f"the upload is larger than the server's max_adapter_bytes ({limit} bytes)")


async def _limited_body(request: Request, max_body: int, limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_body:
            raise _too_large(limit)
        yield chunk


def declared_file_bytes(request: Request) -> int:
    """At least how many bytes of files the body declares (its Content-Length less the multipart
    overhead); 0 without one."""
    declared = request.headers.get("content-length", "")
    return max(0, int(declared) - MULTIPART_OVERHEAD) if declared.isdigit() else 0


async def read_form(request: Request, max_adapter_bytes: int) -> FormData:
    """The parsed form; 413 past the limit, 415 for a body that is not multipart. Caller closes it."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "an adapter upload must be multipart/form-data")
    max_body = max_adapter_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_adapter_bytes)
    stream = _limited_body(request, max_body, max_adapter_bytes)
    # max_fields=3: a file sent as a plain field gets "must be a file", not "too many fields".
    parser = MultiPartParser(request.headers, stream, max_files=2, max_fields=3)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise invalid_param(None, f"malformed multipart body: {exc.message}") from None


def parse_upload(form: FormData, max_adapter_bytes: int) -> AdapterUpload:
    """Check the fields are all there and the weights are not pickled; the contents are checked on load."""
    missing = [f for f in ("name", "adapter_config", "adapter_model") if form.get(f) is None]
    if missing:
        raise invalid_param(missing[0], f"the upload is missing the form field(s): {', '.join(missing)}")
    name = form["name"]
    if not isinstance(name, str):
        raise invalid_param("name", "name must be a plain form field, not a file")
    config, model = _file(form, "adapter_config"), _file(form, "adapter_model")
    upload = AdapterUpload(name, config, model)
    if upload.num_bytes > max_adapter_bytes:
        raise _too_large(max_adapter_bytes)
    _refuse_pickle(model)
    return upload


def _file(form: FormData, field: str) -> UploadFile:
    value = form[field]
    if not isinstance(value, UploadFile):
        raise invalid_param(field, f"{field} must be a file")
    return value


def _refuse_pickle(model: UploadFile) -> None:
    filename = (model.filename or "").lower()
    head = model.file.read(SAFETENSORS_HEAD)
    model.file.seek(0)
    # A safetensors file starts with its header's length (8 bytes, little-endian), then "{": that length's
    # low byte is 0x80, pickle's first byte, for one header size in 256, so the JSON's "{" decides.
    safetensors = head[8:9] == b"{"
    if filename.endswith(PICKLE_SUFFIXES) or (not safetensors and head.startswith((PICKLE_PROTO, ZIP_MAGIC))):
        raise UnsupportedMediaError(
            "adapter_model must be a safetensors file; pickled weights (.bin/.pt/.pth/.pkl) are refused",
            param="adapter_model",
        )
