"""A Ray Serve replica: one engine behind the server's own FastAPI app, its adapters multiplexed by Ray.

    respond(request) -> (status, headers), then body chunks      streaming handle (ray_ingress.py calls it)

`request` is a ForwardedRequest; the app (api/server.py build_app) answers it in process, so
every route, limit, key, tenant rule, stream and error is the single-process server's, byte
for byte. Each response gets an `x-lora-serve-replica` header naming the replica.

A request whose adapter is the call's multiplexed model id is first placed in Ray's per-replica
LRU (`@serve.multiplexed`, at most max_adapters_per_replica): that registers the adapter here
from --adapter-dir if need be, and the replica reports it to Ray's routers, which send later
requests for it here. Past the limit, the least recently used adapter is unregistered here.
A name that is no adapter is not placed (it would evict a real one): the app answers it 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from lora_serve.api.server import build_app, freeze_startup_heap
from lora_serve.config import EngineConfig, ServerConfig
from lora_serve.deploy.forwarded_request import ForwardedRequest, ResponseStart, app_response
from lora_serve.deploy.replica_adapters import ReplicaAdapters
from lora_serve.engine.async_engine import AsyncEngine

REPLICA_HEADER = b"x-lora-serve-replica"


@serve.deployment
class AdapterReplica:
    def __init__(self, config: EngineConfig, server: ServerConfig, max_adapters: int):
        self.engine = AsyncEngine.from_config(config, server.served_model_name)
        self.adapters = ReplicaAdapters(self.engine)
        self.adapters.drop_stored()  # registered here = placed here by the multiplexer
        self.app = build_app(self.engine, server)
        freeze_startup_heap()  # as run_server does: the collector never walks the start-up heap while serving
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def hold(name: str) -> _Held:  # a function: Ray keeps its LRU as an attribute of it
            return _Held(self.adapters, name)

        self.hold = serve.multiplexed(max_num_models_per_replica=max_adapters)(hold)

    async def respond(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        if name := serve.get_multiplexed_model_id():
            if await asyncio.to_thread(self.adapters.register, name):
                await self.hold(name)
        async with aclosing(app_response(self.app, request)) as parts:  # closed early: cancels the app's task
            async for part in parts:
                if isinstance(part, tuple):
                    status, headers = part
                    part = status, [*headers, (REPLICA_HEADER, self.replica_id.encode())]
                yield part

    def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise RuntimeError("the engine is not healthy")


class _Held:
    """What the multiplexer caches per adapter; Ray calls __del__ when its LRU drops it."""

    def __init__(self, adapters: ReplicaAdapters, name: str):
        self.adapters, self.name = adapters, name
        self.dropped = False

    def __del__(self) -> None:
        # Once only: the garbage collector calls it again later, maybe after the adapter was placed here again.
        if not self.dropped:
            self.adapters.unregister(self.name)
        self.dropped = True
