"""The threads that read adapters for AsyncEngine: leases on the catalog (disk -> CPU) and other blocking
adapter calls (registering, resolving), off the event loop and off the engine thread.

They are a pool apart from asyncio's default one: a request waiting here for a CPU place must not hold
up the short blocking calls every adapter request and upload makes in the default pool. Their torch
ops run on one thread each (intra_op.use_one_thread): the engine thread owns torch's CPU threads.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..lora.catalog import AdapterCatalog, AdapterLease
from ..lora.composition import ComposedLeases, Composition
from .intra_op import use_one_thread

T = TypeVar("T")

# Created as needed; past this many waiting at once, further acquires queue until one is done.
MAX_ACQUIRE_THREADS = 256


class AdapterThreads:
    def __init__(self, catalog: AdapterCatalog):
        self.catalog = catalog
        self._pool = ThreadPoolExecutor(MAX_ACQUIRE_THREADS, thread_name_prefix="lora-serve-acquire", initializer=use_one_thread)

    async def open(self, lora_name: str) -> AdapterLease:
        """A lease on the adapter (AdapterCatalog.open) from an acquire thread, waiting as long as it takes
        for a CPU place. Cancelled (the client left, or the deadline passed), the wait is given up; a lease
        the thread got anyway (it was reading the weights) is closed, so no reference outlives the request."""
        abandoned = threading.Event()
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._pool, self.catalog.open, lora_name, None, abandoned)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            self.catalog.abandon(abandoned)

            def close_if_opened(done: asyncio.Future) -> None:
                if not (done.cancelled() or done.exception()):
                    done.result().close()

            opening.add_done_callback(close_if_opened)
            raise

    async def open_composed(self, composition: Composition) -> ComposedLeases:
        """A lease on each of the composition's adapters, as open; those opened are closed if one fails."""
        leases: list[AdapterLease] = []
        try:
            for name in composition.names:
                leases.append(await self.open(name))
        except BaseException:
            for lease in leases:
                lease.close()
            raise
        return ComposedLeases(composition, leases)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on an adapter thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
