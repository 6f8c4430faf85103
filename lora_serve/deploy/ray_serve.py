"""Ray Serve: lora-serve engines as replicas, adapters multiplexed per replica.

    pip install -e ".[ray]"
    python -m lora_serve.deploy.ray_serve --adapter-dir adapters --num-replicas 2 --port 8000

An OpenAI-style ingress reads the adapter from a request's `model` and calls the replicas
with `multiplexed_model_id=<adapter>`, so Ray routes it to a replica that already holds that
adapter (Ray Serve model multiplexing). Each replica runs one AsyncEngine. Its
`@serve.multiplexed` loader registers <adapter-dir>/<adapter> on first use, and Ray's per-replica
LRU unregisters the least recently used one past --max-adapters-per-replica. Replicas share
--adapter-dir, as the Kubernetes replicas do. Inside a replica, the engine's own tiers
(--max-loras device slots, CPU copies) work as in a single process.

Reference: https://docs.ray.io/en/latest/serve/model-multiplexing.html
"""

# No `from __future__ import annotations`: FastAPI must see the route methods' real types
# through Ray's ingress wrapper (string annotations there turn `request: Request` into a query field).
import argparse
import asyncio
import uuid
from collections import Counter
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from lora_serve.api.errors import APIError, from_adapter_error, invalid_param, param_from_loc
from lora_serve.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.errors import AdapterError


@serve.deployment
class AdapterReplica:
    """One engine; Ray keeps at most `max_adapters` of its adapters registered (LRU)."""

    def __init__(self, config: EngineConfig, max_adapters: int, num_threads: int | None = None):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.engine = AsyncEngine.from_config(config)
        self.lora = self.engine.lora
        # Registered here = loaded by the multiplexer: undo the engine's start-up scan of adapter_dir.
        for record in self.lora.registry.list():
            if record.origin == "adapter-dir":
                self.lora.unregister(record.name)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.num_requests: Counter[str] = Counter()  # per adapter ("" = base), served by this replica
        self.num_adapter_loads = 0

        async def load_adapter(name: str) -> _Registered:  # a function: Ray keeps its LRU as an attribute of it
            return await self._load_adapter(name)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def _load_adapter(self, name: str) -> "_Registered":
        found = await asyncio.to_thread(self.lora.resolve_from_adapter_dir, name)
        if not found:
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        self.num_adapter_loads += 1
        return _Registered(self.lora, name)

    async def complete(self, prompt: str | list[int], params: SamplingParams) -> dict:
        """Token ids and text for one request; the adapter is the request's multiplexed model id.
        An error comes back as {"error": {...}} (APIError does not survive Ray's pickling)."""
        name = serve.get_multiplexed_model_id() or None
        token_ids = prompt if isinstance(prompt, list) else self.engine.tokenizer.encode(prompt)
        output_ids: list[int] = []
        text, finish_reason = "", None
        try:
            if name is not None:
                await self.load_adapter(name)
            async for out in self.engine.generate(uuid.uuid4().hex, token_ids, params, lora_name=name):
                output_ids += out.new_token_ids
                text += out.new_text
                finish_reason = out.finish_reason
        except APIError as exc:
            return _error(exc)
        except AdapterError as exc:
            return _error(from_adapter_error(exc))
        except ValueError as exc:
            return _error(invalid_param("prompt", str(exc)))
        self.num_requests[name or ""] += 1
        return {
            "prompt_token_ids": token_ids,
            "token_ids": output_ids,
            "text": text,
            "finish_reason": finish_reason,
            "replica": self.replica_id,
            "replica_requests": dict(self.num_requests),
            "registered": sorted(r.name for r in self.lora.registry.list()),
            "num_adapter_loads": self.num_adapter_loads,
        }

    def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise RuntimeError("the engine is not healthy")


def _error(exc: APIError) -> dict:
    return {"error": {**exc.to_dict()["error"], "status": int(exc.status)}}


class _Registered:
    """What the multiplexer caches per adapter; Ray calls __del__ when its LRU drops it."""

    def __init__(self, lora, name: str):
        self.lora, self.name = lora, name
        self.unloaded = False

    def __del__(self) -> None:
        # Once only: the garbage collector calls it again later, maybe after the adapter was reloaded.
        if not self.unloaded and self.lora.registry.contains(self.name):
            self.lora.unregister(self.name)  # requests still running on it finish first
        self.unloaded = True


app = FastAPI(title="lora-serve (Ray Serve)")


# Decorated here, not in build_app: each replica that imports this module must turn the
# routes into methods on its own `app` (Ray pickles the routes' functions by reference).
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    """POST /v1/completions (not streamed), GET /v1/models, GET /health."""

    def __init__(self, replicas: DeploymentHandle, base_name: str, adapter_dir: Path):
        self.replicas = replicas
        self.base_name = base_name
        self.adapter_dir = adapter_dir

    def adapter_of(self, model: str | None) -> str:
        """The multiplexed model id a request's `model` selects ("" = the base)."""
        if model is None or model == self.base_name:
            return ""
        base, _, adapter = model.rpartition(":")
        return adapter if base == self.base_name else model

    async def complete(self, body: dict) -> tuple[int, dict]:
        """The ingress without HTTP (also what the route calls): HTTP status and JSON body.
        Plain values, as Ray handles cannot carry APIError back to a caller."""
        try:
            return HTTPStatus.OK, await self._complete(body)
        except APIError as exc:
            return exc.status, exc.to_dict()

    async def _complete(self, body: dict) -> dict:
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise invalid_param(param_from_loc(first["loc"]) or None, first["msg"]) from None
        if req.stream:
            raise invalid_param("stream", "streaming is not supported behind the Ray Serve ingress")
        params = SamplingParams(
            max_tokens=req.max_tokens or 16,  # OpenAI's default for completions
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            seed=req.seed,
            stop=req.stop_list,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
        )
        handle = self.replicas.options(multiplexed_model_id=self.adapter_of(req.model))
        out = await handle.complete.remote(req.prompt, params)
        if "error" in out:
            error = out["error"]
            raise APIError(error["status"], error["message"], error["type"], error["param"], error["code"])
        num_prompt, num_out = len(out["prompt_token_ids"]), len(out["token_ids"])
        response = CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            model=req.model or self.base_name,
            choices=[CompletionChoice(text=out["text"], finish_reason=out["finish_reason"])],
            usage=UsageInfo.of(num_prompt, num_out),
        )
        return {**response.model_dump(), "lora_serve": out}  # token ids and the replica, for tests and debugging

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None  # not JSON: refused by validation, naming no param
        status, reply = await self.complete(body)
        return JSONResponse(reply, status_code=status)

    @app.get("/v1/models")
    async def models(self) -> dict:
        folders = self.adapter_dir.iterdir() if self.adapter_dir.is_dir() else []
        names = [self.base_name] + sorted(p.name for p in folders if p.is_dir() and not p.name.startswith("."))
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lora-serve"} for n in names]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}


def build_app(
    config: EngineConfig,
    base_name: str,
    *,
    num_replicas: int = 2,
    max_adapters_per_replica: int = 4,
    num_cpus_per_replica: float = 1.0,
    num_threads: int | None = None,
):
    """The Ray Serve application: the ingress bound to `num_replicas` engine replicas."""
    replica = AdapterReplica.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus_per_replica}
    ).bind(config, max_adapters_per_replica, num_threads)
    return OpenAIIngress.bind(replica, base_name, config.lora.adapter_dir)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype),
        cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory_gb),
        scheduler=SchedulerConfig(),
        lora=LoRAConfig(adapter_dir=args.adapter_dir, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_serve.deploy.ray_serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the base model's id in the API (default: the folder name)")
    p.add_argument("--adapter-dir", type=Path, required=True, help="adapters shared by every replica, one folder each")
    p.add_argument("--num-replicas", type=int, default=2)
    p.add_argument("--max-adapters-per-replica", type=int, default=4, help="Ray's per-replica LRU of registered adapters")
    p.add_argument("--max-loras", type=int, default=4, help="device slots per replica")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import ray

    from lora_serve.model.default_model import resolve_model_path

    args = parse_args(argv)
    config = engine_config(args)
    base_name = args.served_model_name or resolve_model_path(args.model).name
    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app(
            config,
            base_name,
            num_replicas=args.num_replicas,
            max_adapters_per_replica=args.max_adapters_per_replica,
            num_cpus_per_replica=args.num_cpus_per_replica,
        ),
        name="lora-serve",
        blocking=True,
    )


if __name__ == "__main__":
    # Through the importable module, not __main__, so Ray ships these classes by reference, as in tests.
    from lora_serve.deploy import ray_serve

    ray_serve.main()
