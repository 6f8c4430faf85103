"""Model names the API accepts, and `GET /v1/models` and `GET /v1/models/{model}`.

A request's `model` names what it runs on (vLLM's convention):
    "<base id>"            the base model, no adapter
    "<adapter>"            that adapter on the base
    "<base id>:<adapter>"  the same, spelled out
Adapters come and go at run time, so names are looked up in the adapter catalog per request
(after AdapterCatalog.sync_with_adapter_dir has brought the name in line with --adapter-dir,
which replicas share). An adapter the caller may not see (another tenant's upload) is
reported exactly as an unknown one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lora_serve.api.errors import APIError, from_adapter_error, invalid_param
from lora_serve.api.tenants import OPEN, Principal
from lora_serve.lora.catalog import AdapterCatalog
from lora_serve.lora.composition import Composition
from lora_serve.lora.errors import AdapterError
from lora_serve.lora.registry import AdapterRecord


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lora-serve"
    root: str  # the model's folder (or s3:// location); only its last part for non-admins (Principal.shown_path)
    parent: str | None = None
    max_model_len: int
    merged: bool | None = None  # adapters: folded into the base weights now (served at base cost)


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def adapter_name(model: str | None, base_name: str) -> str | None:
    """The adapter a request's `model` names, None for the base; whether it exists is not checked."""
    if model is None or model == base_name:
        return None
    base, _, adapter = model.rpartition(":")  # adapter names hold no ':'; a base id may
    return adapter if base == base_name else model


class ModelRegistry:
    def __init__(
        self,
        base_name: str,
        model_path: Path,
        max_model_len: int,
        adapters: AdapterCatalog,
        merged_name: Callable[[], str | None] = lambda: None,
        owner_of: Callable[[str], str | None] = lambda name: None,
        run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> None:
        self.merged_name = merged_name
        self.run_blocking = run_blocking  # where sync() does its I/O (AsyncEngine.run_blocking: an adapter thread)
        self.owner_of = owner_of  # adapter name -> the tenant that uploaded it
        self.base_name = base_name
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.adapters = adapters
        self.created = int(time.time())

    def adapter_name(self, model: str | None) -> str | None:
        return adapter_name(model, self.base_name)

    async def sync(self, name: str | None) -> None:
        """Bring the adapter `name` names (if any) in line with --adapter-dir, which another replica may
        have added, replaced or removed, before resolve(): a stat (with an s3:// --adapter-dir, for a name not
        registered, a listing and maybe a download), on a worker thread (none for the base)."""
        adapter = adapter_name(name, self.base_name)
        if adapter is not None:
            await self.run_blocking(self.adapters.sync_with_adapter_dir, adapter)

    async def sync_adapters(self, weights: Mapping[str, float] | None) -> None:
        """As sync, for each adapter a request's `adapters` names."""
        for name in weights or ():
            await asyncio.to_thread(self.adapters.sync_with_adapter_dir, name)

    def resolve_adapters(self, model: str | None, weights: Mapping[str, float], viewer: Principal = OPEN) -> str | Composition:
        """The composition a request's `adapters` names (one adapter at weight 1.0: its name, as if named in
        `model`): 400 unless `model` is the base (or absent), the adapters fit max_loras and their weights
        cannot overflow (AdapterCatalog.check_composition); 404 for a name that is no adapter the viewer
        can see (as resolve)."""
        if model is not None and model != self.base_name:
            raise invalid_param(
                "adapters", f"adapters composes adapters on the base model: model must be {self.base_name!r}, not {model!r}"
            )
        for name in weights:
            if not (self.adapters.contains(name) and viewer.can_see(self.owner_of(name))):
                raise APIError(HTTPStatus.NOT_FOUND, f"The adapter `{name}` does not exist.", param="adapters", code="model_not_found")
        try:
            composition = Composition.of(weights)
        except ValueError as exc:  # the request body's own checks come first: a second line of defence
            raise invalid_param("adapters", str(exc)) from exc
        try:
            self.adapters.check_composition(composition)  # max_loras, and weights that could overflow
        except AdapterError as exc:
            raise from_adapter_error(exc) from exc
        return composition.plain_name or composition

    def resolve(self, name: str | None, viewer: Principal = OPEN) -> str | None:
        """The lora_name a request's `model` field selects (None: the base model); 404 if unknown or not visible."""
        adapter = adapter_name(name, self.base_name)
        if adapter is None:
            return None
        if self.adapters.contains(adapter) and viewer.can_see(self.owner_of(adapter)):
            return adapter
        raise APIError(
            HTTPStatus.NOT_FOUND,
            f"The model `{name}` does not exist.",
            param="model",
            code="model_not_found",
        )

    def model_list(self, viewer: Principal = OPEN) -> ModelList:
        merged = self.merged_name()
        adapters = [
            self._adapter_card(record, viewer, merged)
            for record in sorted(self.adapters.list(), key=lambda r: r.name)
            if viewer.can_see(self.owner_of(record.name))
        ]
        return ModelList(data=[self._base_card(viewer), *adapters])

    def card(self, name: str, viewer: Principal = OPEN) -> ModelCard:
        """The card of what `name` selects, in any spelling a request's `model` may use; 404 as resolve()."""
        adapter = self.resolve(name, viewer)
        if adapter is None:
            return self._base_card(viewer)
        return self._adapter_card(self.adapters.get(adapter), viewer, self.merged_name())

    def _base_card(self, viewer: Principal) -> ModelCard:
        return ModelCard(id=self.base_name, created=self.created, root=viewer.shown_path(self.model_path), max_model_len=self.max_model_len)

    def _adapter_card(self, record: AdapterRecord, viewer: Principal, merged: str | None) -> ModelCard:
        return ModelCard(
            id=record.name,
            created=record.created,
            root=viewer.shown_path(record.source or record.path),
            parent=self.base_name,
            max_model_len=self.max_model_len,
            merged=record.name == merged,
        )
