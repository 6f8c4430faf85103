"""The Ray Serve ingress: every HTTP request goes to a replica running the server's own app.

Why this shape, with what Ray Serve 2.60 offers:
- Ray's HTTP proxy routes by multiplexed model id only from a `serve_multiplexed_model_id`
  header, while OpenAI clients name the adapter in the JSON body's `model`. So this small
  deployment reads the body, takes the adapter from `model` (chat and completions only), and
  calls the replicas with it as the multiplexed model id: Ray's router then prefers a replica
  that holds that adapter (model multiplexing).
- A deployment cannot call another's FastAPI app over a handle (handles to a `@serve.ingress`
  deployment speak the proxy's internal protocol), so the ingress forwards the request's plain
  fields (forwarded_request.py) over a streaming handle, and the replica runs the server's app
  on them in process (ray_replica.py). Every route and behaviour is the single-process
  server's; none is re-implemented here.
- The ingress itself is a plain ASGI app (`@serve.ingress()` with `__serve_build_asgi_app__`,
  as it needs the replicas' handle): it relays the status, the raw headers and each body chunk
  as the replica sends them, and a client that leaves cancels the replica's call.

A handle call takes its arguments whole, so the ingress holds a request's body before
forwarding it, within the app's own limits, checked by the app's own middleware (BodyLimit:
max_body_bytes, 413; body_timeout_s, 408). An upload, exempt there, is read up to one byte past
max_adapter_bytes (plus multipart overhead) and forwarded as it is: past its limit, the app
refuses it with its own 413.
"""

from __future__ import annotations

import json
from typing import cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp, Receive, Scope, Send

from lora_serve.api.body_limit import BodyLimit
from lora_serve.api.errors import APIError
from lora_serve.api.models import adapter_name
from lora_serve.api.upload import MULTIPART_OVERHEAD, UPLOAD_ROUTE
from lora_serve.config import ServerConfig
from lora_serve.deploy.forwarded_request import ForwardedRequest

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # the routes whose body's `model` picks the replica


class Forwarder:
    """The ingress's ASGI app: one replica call per request, its response relayed as it comes."""

    def __init__(self, replicas: DeploymentHandle, base_name: str, max_body_bytes: int):
        self.replicas = replicas.options(stream=True)
        self.base_name = base_name
        self.max_body_bytes = max_body_bytes  # of any request, uploads included

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to start or stop
        try:
            body = await read_body(receive, self.max_body_bytes)
        except APIError as exc:  # body_timeout_s passed (BodyLimit times each read)
            await exc.to_response()(scope, receive, send)
            return
        if body is None:
            return  # the client left while sending
        request = ForwardedRequest.of(scope, body)
        call = self.replicas.options(multiplexed_model_id=self.adapter_of(request))
        parts = cast(DeploymentResponseGenerator, call.respond.remote(request))  # a stream=True handle's
        finished = False
        try:
            async for part in parts:
                if isinstance(part, tuple):
                    await send({"type": "http.response.start", "status": part[0], "headers": part[1]})
                else:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            finished = True
        finally:
            # The client left (Ray cancels this request and, with it, this call; said here too): the replica's
            # generator closes, which cancels the app's task, which aborts the sequence.
            if not finished:
                parts.cancel()

    def adapter_of(self, request: ForwardedRequest) -> str:
        """The adapter a generation request's `model` names; "" for the base, another route, or a body
        that is no JSON object (the replica's app answers those as it would anywhere)."""
        if request.method != "POST" or request.path not in GENERATION_PATHS:
            return ""
        try:
            model = json.loads(request.body).get("model")
        except (ValueError, AttributeError):
            return ""
        return (adapter_name(model, self.base_name) or "") if isinstance(model, str) else ""


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request's body, or its first limit + 1 bytes; None if the client left while sending it."""
    body = bytearray()
    while len(body) <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, replicas: DeploymentHandle, base_name: str, server: ServerConfig, max_adapter_bytes: int):
        max_upload_bytes = max_adapter_bytes + MULTIPART_OVERHEAD  # api/upload.py's own bound on an upload's body
        forwarder = Forwarder(replicas, base_name, max(server.max_body_bytes, max_upload_bytes))
        # The app's own body limits, at the edge, as the ingress holds each body. (Not `self.app`: Ray's ASGI wrapper has that.)
        self.asgi = BodyLimit(forwarder, server.max_body_bytes, exempt={UPLOAD_ROUTE}, timeout_s=server.body_timeout_s)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi
