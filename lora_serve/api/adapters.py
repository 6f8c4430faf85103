"""Adapter management (admin routes): upload, list, describe, delete, and vLLM's load/unload by path.

    POST   /v1/adapters                multipart: name, adapter_config, adapter_model  -> 201 AdapterInfo
    GET    /v1/adapters                -> {"object": "list", "data": [AdapterInfo]}
    GET    /v1/adapters/{name}         -> AdapterInfo
    DELETE /v1/adapters/{name}         unmerge if merged, then delete -> {"id", "object": "adapter", "deleted": true}
    PATCH  /v1/adapters/{name}         {"auto_merge": bool}: may --merge-policy auto merge it -> AdapterInfo
    POST   /v1/adapters/{name}/merge   fold into the base weights (between two engine steps) -> AdapterInfo
    POST   /v1/adapters/{name}/unmerge restore the base bit for bit -> AdapterInfo
    POST   /v1/load_lora_adapter       {"lora_name", "lora_path"} (inside --allowed-lora-dir; s3:// too)
    POST   /v1/unload_lora_adapter     {"lora_name"} (one in --adapter-dir comes back on its next request)

Upload, list, describe and delete take any tenant's key; an upload belongs to its tenant, and
another tenant's adapter answers 404 like an unknown name (tenants.py). An upload that would take
its tenant past --max-adapters-per-tenant or --max-adapter-bytes-per-tenant is 403 (quota.py).
Merge, unmerge, the auto_merge mark and load/unload by path change what everyone is served, so
they need an admin (`admin_router`); a tenant's upload starts without auto_merge, so its traffic
merges nothing. Merging and unregistering one adapter both run on the engine thread under the
adapter catalog's lock: a merge racing a delete ends either merged and registered, or deleted and
unmerged. Everything here goes through the engine's adapter catalog (engine.adapters) and its
engine-thread commands (merge_adapter, unmerge_adapter, remove_adapter). AdapterInfo.path is
the full server path (or s3:// location) for admins, only the folder's name for anyone else.
With an s3:// --adapter-dir nothing is stored by the server: uploads are refused (403, code
"uploads_disabled"), and DELETE unregisters an adapter without touching the bucket.
Refusals are lora.errors.AdapterError (status and param included), answered by errors.py.
Reading and validating weights is blocking, so it runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool

from lora_serve.api.auth import principal_of
from lora_serve.api.errors import APIError
from lora_serve.api.quota import UploadQuota, get_quota
from lora_serve.api.tenants import Principal
from lora_serve.api.upload import AdapterUpload, declared_file_bytes, parse_upload, read_form
from lora_serve.lora.errors import AdapterError, AdapterExistsError, AdapterNotFoundError
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
from lora_serve.lora.registry import AdapterRecord, check_name
from lora_serve.lora.store import OWNER_FILE, AdapterStore

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine

router = APIRouter()  # any tenant, on its own adapters
admin_router = APIRouter()  # admins only


class AdapterInfo(BaseModel):
    id: str
    object: str = "adapter"
    name: str
    origin: str  # "upload" | "load-api" | "adapter-dir" | "lora-modules"
    path: str  # its folder or s3:// location; only the last part for non-admins (Principal.shown_path)
    created: int
    ranks: list[int]  # every rank in use (rank_pattern may mix several)
    alpha: float
    targets: list[str]  # projection names, e.g. ["k_proj", "q_proj"]
    use_dora: bool  # a DoRA adapter (PEFT's use_dora): its magnitude vectors scale each output row
    num_params: int
    num_bytes: int  # size of adapter_model.safetensors
    params_ratio: float  # num_params / the base model's parameter count
    sha256: str  # of adapter_model.safetensors
    location: str  # "disk" | "cpu" | "device"
    merged: bool  # folded into the base weights (POST /v1/adapters/{name}/merge)
    auto_merge: bool  # --merge-policy auto may merge it: set for adapters of no tenant, or by an admin (PATCH)
    requests_served: int


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]


class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    lora_name: str


class AdapterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    auto_merge: StrictBool


class AdapterAdmin:
    """What the admin routes work on; held on `app.state.adapter_admin`."""

    def __init__(self, engine: AsyncEngine, base_name: str):
        self.engine = engine
        self.catalog = engine.adapters
        self.base_name = base_name  # the API's base id, which no adapter may take
        self.max_adapter_bytes = self.catalog.max_adapter_bytes
        # Removes crashed uploads' leftovers. None: adapter_dir is s3://, where the server stores nothing.
        self.store = AdapterStore(self.catalog.adapter_dir) if self.catalog.adapter_dir is not None else None
        self.base_params = self.catalog.base_params
        self.forget: Callable[[str], None] = lambda name: None  # what else drops an unregistered adapter's state

    def info(self, record: AdapterRecord, viewer: Principal) -> AdapterInfo:
        return AdapterInfo(
            id=record.name,
            name=record.name,
            origin=record.origin,
            path=viewer.shown_path(record.source or record.path),
            created=record.created,
            ranks=record.ranks,
            alpha=record.alpha,
            targets=record.targets,
            use_dora=record.use_dora,
            num_params=record.num_params,
            num_bytes=record.num_bytes,
            params_ratio=record.num_params / self.base_params,
            sha256=record.sha256,
            location=self.catalog.location(record.name),
            merged=self.catalog.merged_name == record.name,
            auto_merge=record.auto_merge,
            requests_served=record.requests_served,
        )

    def record(self, name: str, param: str, viewer: Principal) -> AdapterRecord:
        """The adapter, if it exists and `viewer` may see it; else the same 404 either way."""
        try:
            record = self.catalog.get(name)
        except AdapterNotFoundError as exc:
            exc.param = param
            raise
        if not viewer.can_see(self.owner(record.path)):
            raise AdapterNotFoundError(f"adapter {name!r} does not exist", param=param)
        return record

    def owner(self, path: Path) -> str | None:
        """The tenant that uploaded the adapter at `path`; None for one of no tenant."""
        return self.store.owner(path) if self.store is not None else None

    def owner_of(self, name: str) -> str | None:
        try:
            return self.owner(self.catalog.get(name).path)
        except AdapterNotFoundError:
            return None

    def uploads_store(self) -> AdapterStore:
        """Where uploads go; 403 when adapter_dir is s3:// (the server does not write to object storage)."""
        if self.store is None:
            raise APIError(
                HTTPStatus.FORBIDDEN,
                f"uploads are disabled: --adapter-dir is {self.catalog.remote_adapter_dir}, which this server only reads; "
                "copy the adapter's files under that prefix instead, and name it in `model`",
                code="uploads_disabled",
            )
        return self.store

    def check_new_name(self, name: str, param: str) -> None:
        try:
            check_name(name, self.base_name)
        except AdapterError as exc:
            exc.param = param
            raise
        if self.catalog.contains(name):
            raise AdapterExistsError(f"adapter {name!r} already exists", param=param)

    def store_upload(self, upload: AdapterUpload, tenant: str | None) -> AdapterRecord:
        """Write, validate, publish, register. Blocking."""
        files = {CONFIG_FILE: upload.adapter_config.file, WEIGHTS_FILE: upload.adapter_model.file}
        if tenant is not None:
            files[OWNER_FILE] = io.BytesIO(tenant.encode())
        validate = lambda tmp: self.catalog.read(upload.name, tmp, "upload")  # noqa: E731
        store = self.uploads_store()
        path, model = store.save(upload.name, files, validate)
        try:
            return self.catalog.register(upload.name, path, "upload", model)
        except BaseException:
            store.remove(path)  # registered meanwhile under this name from elsewhere
            raise

    async def unregister(self, record: AdapterRecord) -> None:
        """Unmerge it if merged and unregister it in one engine-thread command, so that no merge
        slips in between (running requests finish first). 404 if the name was registered anew.
        Its per-adapter metric series go with it (`forget`, set by the app to RequestMetrics.forget)."""
        await self.engine.remove_adapter(record)
        self.forget(record.name)


def get_admin(request: Request) -> AdapterAdmin:
    return request.app.state.adapter_admin


@router.post("/adapters", status_code=HTTPStatus.CREATED)
async def upload_adapter(
    request: Request, admin: AdapterAdmin = Depends(get_admin), quota: UploadQuota = Depends(get_quota)
) -> AdapterInfo:
    uploader = principal_of(request)
    admin.uploads_store()  # refused before the body is read
    await asyncio.to_thread(quota.check, uploader, declared_file_bytes(request))  # over quota: before the body
    form = await read_form(request, admin.max_adapter_bytes)
    try:
        upload = parse_upload(form, admin.max_adapter_bytes)
        admin.check_new_name(upload.name, "name")

        def store() -> AdapterRecord:
            with quota.reserve(uploader, upload.num_bytes):  # concurrent uploads of one tenant count together
                return admin.store_upload(upload, uploader.tenant)

        record = await admin.engine.run_blocking(store)  # validation's torch ops on one thread, as every adapter read
    finally:
        await form.close()
    return admin.info(record, principal_of(request))


@router.get("/adapters")
async def list_adapters(request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterList:
    viewer = principal_of(request)
    await asyncio.to_thread(admin.catalog.drop_removed)  # what other replicas deleted from --adapter-dir
    records = sorted(admin.catalog.list(), key=lambda r: r.name)
    return AdapterList(data=[admin.info(r, viewer) for r in records if viewer.can_see(admin.owner(r.path))])


@router.get("/adapters/{name}")
async def get_adapter(name: str, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterInfo:
    await admin.engine.run_blocking(admin.catalog.sync_with_adapter_dir, name)
    viewer = principal_of(request)
    return admin.info(admin.record(name, "name", viewer), viewer)


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> JSONResponse:
    viewer = principal_of(request)
    await admin.engine.run_blocking(admin.catalog.sync_with_adapter_dir, name)  # stored by another replica: deleted here too
    record = admin.record(name, "name", viewer)
    await admin.unregister(record)
    if admin.store is not None and admin.store.is_managed(record.path):
        await asyncio.to_thread(admin.store.remove, record.path)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


@admin_router.patch("/adapters/{name}")
async def update_adapter(name: str, req: AdapterUpdate, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterInfo:
    """Mark an adapter for --merge-policy auto, or unmark it (a merged one stays merged until unmerged)."""
    admin.record(name, "name", principal_of(request))
    return admin.info(admin.catalog.set_auto_merge(name, req.auto_merge), principal_of(request))


@admin_router.post("/adapters/{name}/merge")
async def merge_adapter(name: str, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterInfo:
    """Fold the adapter into the base weights (unmerging any other first), between two engine steps."""
    viewer = principal_of(request)
    record = admin.record(name, "name", viewer)
    return await admin.engine.merge_adapter(name, describe=lambda: admin.info(record, viewer))


@admin_router.post("/adapters/{name}/unmerge")
async def unmerge_adapter(name: str, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterInfo:
    """Restore the base weights bit for bit if this adapter is the merged one (else nothing changes)."""
    viewer = principal_of(request)
    record = admin.record(name, "name", viewer)
    await admin.engine.unmerge_adapter(name)
    return admin.info(record, viewer)


@admin_router.post("/load_lora_adapter")
async def load_lora_adapter(req: LoadLoRARequest, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> AdapterInfo:
    """vLLM's load by path: a local folder or an s3:// prefix under an --allowed-lora-dir entry (an s3:// one
    is downloaded, or found in the cache by its ETags, on a worker thread)."""
    admin.catalog.sources.check_allowed(req.lora_path)
    admin.check_new_name(req.lora_name, "lora_name")
    record = await admin.engine.run_blocking(admin.catalog.register_from, req.lora_name, req.lora_path, "load-api")
    return admin.info(record, principal_of(request))


@admin_router.post("/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoRARequest, request: Request, admin: AdapterAdmin = Depends(get_admin)) -> JSONResponse:
    """Unregister an adapter from this server (requests running on it finish first); its files stay.

    An adapter whose folder is in --adapter-dir comes back on the next request that names it, as
    with vLLM's filesystem resolver: that folder is what every replica sharing the directory
    serves, so one replica refusing a name the others serve would make answers depend on routing.
    Unloading frees this server's copy; DELETE /v1/adapters/{name} removes the folder for all.
    """
    await admin.unregister(admin.record(req.lora_name, "lora_name", principal_of(request)))
    return JSONResponse({"id": req.lora_name, "object": "adapter", "unloaded": True})
