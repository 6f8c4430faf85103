"""The OpenAI-compatible ingress of the Ray Serve deployment (ray_serve.py builds the application).

    POST /v1/chat/completions, POST /v1/completions   streamed (SSE) or not, as the single-process server
    GET  /v1/models                                    the base, then every folder of --adapter-dir
    GET  /health

Bodies are validated with the single-process server's request models (api/protocol.py), and
every error has OpenAI's shape and status (api/errors.py). A request goes to a replica with the
adapter its `model` names as Ray's multiplexed model id, so Ray routes it to a replica that
holds that adapter already; a streamed one through a streaming handle, relayed event by event.
"""

# No `from __future__ import annotations`: FastAPI must see the route methods' real types
# through Ray's ingress wrapper (string annotations there turn the body into a query field).
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from lora_serve.api.errors import install_error_handlers
from lora_serve.api.generation import event_stream_response
from lora_serve.api.models import adapter_name
from lora_serve.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest


# Above the class: Ray serializes the ingress class while decorating it, so its methods see
# only the module's globals defined before it.
async def _relay(events: DeploymentResponseGenerator) -> AsyncIterator[str]:
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        if not finished:  # the client left: cancelling the replica's generator aborts its sequence
            events.cancel()


app = FastAPI(title="lora-serve (Ray Serve)")
install_error_handlers(app)


# Decorated here, not in build_app: each replica that imports this module must turn the
# routes into methods on its own `app` (Ray pickles the routes' functions by reference).
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, replicas: DeploymentHandle, base_name: str, adapter_dir: Path):
        self.replicas = replicas
        self.base_name = base_name
        self.adapter_dir = adapter_dir

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, req: ChatCompletionRequest) -> Response:
        return await self.forward(req)

    @app.post("/v1/completions", response_model=None)
    async def completions(self, req: CompletionRequest) -> Response:
        return await self.forward(req)

    async def forward(self, req: SamplingRequest) -> Response:
        """One replica call: unary, or streaming with the replica's status before its first event."""
        handle = self.replicas.options(multiplexed_model_id=adapter_name(req.model, self.base_name) or "")
        if not req.stream:
            status, body = await handle.complete.remote(req)
            return JSONResponse(body, status_code=status)
        events = cast(DeploymentResponseGenerator, handle.options(stream=True).stream.remote(req))  # stream=True: a generator
        status, error = await anext(events)
        if error is not None:
            return JSONResponse(error, status_code=status)
        return event_stream_response(_relay(events))

    @app.get("/v1/models")
    async def models(self) -> dict:
        folders = self.adapter_dir.iterdir() if self.adapter_dir.is_dir() else []
        names = [self.base_name] + sorted(p.name for p in folders if p.is_dir() and not p.name.startswith("."))
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lora-serve"} for n in names]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}
