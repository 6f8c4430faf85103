"""Per-tenant upload quotas: how many adapters, and how many bytes of adapter files, a tenant may store.

    quota = UploadQuota(store, max_adapters=10, max_bytes=2**30)   # None: no limit
    quota.check(principal, declared_bytes)        # before the body is read: refused at once if surely over
    with quota.reserve(principal, upload_bytes):  # before the upload is stored; held until it is published
        store.save(...)

A refusal is 403 with code "quota_exceeded". Not 429: a quota is not a rate, and OpenAI's clients
retry a 429 on their own, which cannot help until the tenant deletes an adapter. Usage is what the
tenant's folders in adapter_dir hold (their `.tenant` file, see lora/store.py), so adapters stored
through other replicas sharing the folder count too. Check and reserve happen under one lock and a
reservation stands until its upload is stored or refused, so concurrent uploads of one tenant can
never pass the quota together (uploads running at the same moment on two replicas each see only the
other's stored adapters). Admins and callers of no tenant (--api-key, --admin-api-key) are not limited.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus

from fastapi import Request

from lora_serve.api.errors import INVALID_REQUEST, APIError
from lora_serve.api.tenants import Principal
from lora_serve.lora.store import AdapterStore


def quota_exceeded(message: str) -> APIError:
    return APIError(HTTPStatus.FORBIDDEN, message, INVALID_REQUEST, code="quota_exceeded")


class UploadQuota:
    def __init__(self, store: AdapterStore | None, max_adapters: int | None, max_bytes: int | None):
        self.store = store  # None: nothing is stored (an s3:// adapter_dir), so nothing counts
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reserved: dict[str, tuple[int, int]] = {}  # tenant -> (uploads, bytes) being stored now

    def limited_tenant(self, who: Principal) -> str | None:
        """The tenant whose quota `who`'s uploads count against; None: not limited."""
        limited = self.max_adapters is not None or self.max_bytes is not None
        return who.tenant if limited and not who.is_admin else None

    def check(self, who: Principal, num_bytes: int) -> None:
        """403 if storing one more adapter of num_bytes would take `who` past a quota. Blocking (reads adapter_dir)."""
        tenant = self.limited_tenant(who)
        if tenant is not None:
            with self._lock:
                self._check(tenant, num_bytes)

    @contextmanager
    def reserve(self, who: Principal, num_bytes: int) -> Iterator[None]:
        """check(), then count this upload against the quota until the block ends. Blocking."""
        tenant = self.limited_tenant(who)
        if tenant is None:
            yield
            return
        with self._lock:
            self._check(tenant, num_bytes)
            uploads, size = self._reserved.get(tenant, (0, 0))
            self._reserved[tenant] = (uploads + 1, size + num_bytes)
        try:
            yield  # stored meanwhile, it counts twice (on disk and here): never too little
        finally:
            with self._lock:
                uploads, size = self._reserved.pop(tenant)
                if uploads > 1:
                    self._reserved[tenant] = (uploads - 1, size - num_bytes)

    def _check(self, tenant: str, num_bytes: int) -> None:
        stored, stored_bytes = self.store.usage(tenant) if self.store is not None else (0, 0)
        uploads, upload_bytes = self._reserved.get(tenant, (0, 0))
        count, size = stored + uploads, stored_bytes + upload_bytes
        if self.max_adapters is not None and count + 1 > self.max_adapters:
            raise quota_exceeded(
                f"tenant {tenant!r} already stores {count} adapter(s), the server's max_adapters_per_tenant "
                f"({self.max_adapters}); delete one first"
            )
        if self.max_bytes is not None and size + num_bytes > self.max_bytes:
            raise quota_exceeded(
                f"this upload ({num_bytes} bytes) and the {size} bytes tenant {tenant!r} already stores pass the "
                f"server's max_adapter_bytes_per_tenant ({self.max_bytes} bytes)"
            )


def get_quota(request: Request) -> UploadQuota:
    return request.app.state.upload_quota
