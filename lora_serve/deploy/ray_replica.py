"""A Ray Serve replica: one lora-serve engine, whose adapters Ray multiplexes (per-replica LRU).

    complete(req) -> (status, body)                          unary: the whole JSON response, or the error
    stream(req)   -> (status, error or None), then events    streaming handle: SSE events, `data: [DONE]` last

`req` is a validated ChatCompletionRequest or CompletionRequest, its adapter the call's
multiplexed model id ("" = the base). The `@serve.multiplexed` loader registers
<adapter-dir>/<adapter> on first use; past `max_adapters` Ray's LRU drops the least recently
used one, which unregisters it. Requests then run through the single-process server's own
code (api/exchange.py, generation.py), so replies and chunks are the same to the byte.
Errors come back as plain (status, body) values: what Ray hands back to a caller is no APIError.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from http import HTTPStatus

from ray import serve

from lora_serve.api.chat import ChatExchange
from lora_serve.api.completions import CompletionExchange
from lora_serve.api.errors import APIError
from lora_serve.api.exchange import Completion, Exchange
from lora_serve.api.generation import generate_all, sse_events
from lora_serve.api.protocol import ChatCompletionRequest, SamplingRequest
from lora_serve.api.state import ServerState
from lora_serve.config import EngineConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.lora.catalog import AdapterCatalog
from lora_serve.lora.errors import AdapterError


@serve.deployment
class AdapterReplica:
    """One engine; Ray keeps at most `max_adapters` of its adapters registered (LRU)."""

    def __init__(self, config: EngineConfig, server: ServerConfig, max_adapters: int, num_threads: int | None = None):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.engine = AsyncEngine.from_config(config, server.served_model_name)
        self.state = ServerState.create(self.engine, server)
        self.adapters = self.engine.adapters
        # Registered here = loaded by the multiplexer: undo the engine's start-up scan of adapter_dir.
        for record in self.adapters.list():
            if record.origin == "adapter-dir" and record.name != self.adapters.merged_name:  # --merge keeps its own
                self.adapters.unregister(record.name)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.num_requests: Counter[str] = Counter()  # per adapter ("" = base), served by this replica
        self.num_adapter_loads = 0

        async def load_adapter(name: str) -> _Registered:  # a function: Ray keeps its LRU as an attribute of it
            return await self._load_adapter(name)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def _load_adapter(self, name: str) -> _Registered:
        found = await asyncio.to_thread(self.adapters.resolve_from_adapter_dir, name)
        if not found:
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        self.num_adapter_loads += 1
        return _Registered(self.adapters, name)

    async def _open(self, req: SamplingRequest) -> Exchange:
        """The request checked against this replica's engine, its adapter loaded first; APIError if refused."""
        name = serve.get_multiplexed_model_id()
        if name:
            await self.load_adapter(name)
        exchange_cls = ChatExchange if isinstance(req, ChatCompletionRequest) else CompletionExchange
        exchange = await exchange_cls.open(self.state, req)
        self.num_requests[name] += 1
        return exchange

    async def complete(self, req: SamplingRequest) -> tuple[int, dict]:
        try:
            exchange = await self._open(req)
            done = await generate_all(None, self.state, exchange.prep)
        except APIError as exc:
            return exc.status, exc.to_dict()
        return HTTPStatus.OK, {**exchange.response(done).model_dump(mode="json"), "lora_serve": self._report(done)}

    async def stream(self, req: SamplingRequest) -> AsyncIterator[tuple[int, dict | None] | str]:
        """(status, error body or None) first, as the ingress must pick the HTTP status before any event."""
        try:
            events = await sse_events(None, await self._open(req))
        except APIError as exc:
            yield exc.status, exc.to_dict()
            return
        yield HTTPStatus.OK, None
        async with aclosing(events):  # a cancelled call closes it, which aborts the sequence
            async for event in events:
                yield event

    def _report(self, done: Completion) -> dict:
        """Where a non-streamed request ran, beside its reply (for tests and debugging)."""
        return {
            "token_ids": done.token_ids,
            "replica": self.replica_id,
            "replica_requests": dict(self.num_requests),
            "registered": sorted(r.name for r in self.adapters.list()),
            "num_adapter_loads": self.num_adapter_loads,
        }

    def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise RuntimeError("the engine is not healthy")


class _Registered:
    """What the multiplexer caches per adapter; Ray calls __del__ when its LRU drops it."""

    def __init__(self, adapters: AdapterCatalog, name: str):
        self.adapters, self.name = adapters, name
        self.unloaded = False

    def __del__(self) -> None:
        # Once only: the garbage collector calls it again later, maybe after the adapter was reloaded.
        if not self.unloaded and self.adapters.contains(self.name):
            try:
                self.adapters.unregister(self.name)  # requests still running on it finish first
            except AdapterError:  # merged (it stays, part of the base weights now), or gone meanwhile
                pass
        self.unloaded = True
