"""Ray Serve: lora-serve engines as replicas, adapters multiplexed per replica.

    pip install -e ".[ray]"
    python -m lora_serve.deploy.ray_serve --adapter-dir adapters --num-replicas 2 --port 8000

An OpenAI-compatible ingress (ray_ingress.py: chat and completions, streamed or not) reads
the adapter from a request's `model` and calls the replicas with `multiplexed_model_id=<adapter>`,
so Ray routes it to a replica that already holds that adapter (Ray Serve model multiplexing).
Each replica (ray_replica.py) runs one AsyncEngine. Its `@serve.multiplexed` loader registers
<adapter-dir>/<adapter> on first use, and Ray's per-replica LRU unregisters the least recently
used one past --max-adapters-per-replica. Replicas share --adapter-dir, as the Kubernetes
replicas do. Inside a replica, the engine's own tiers (--max-loras device slots, CPU copies)
work as in a single process.

Reference: https://docs.ray.io/en/latest/serve/model-multiplexing.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ray import serve

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.deploy.ray_ingress import OpenAIIngress
from lora_serve.deploy.ray_replica import AdapterReplica


def build_app(
    config: EngineConfig,
    base_name: str,
    *,
    server: ServerConfig | None = None,
    num_replicas: int = 2,
    max_adapters_per_replica: int = 4,
    num_cpus_per_replica: float = 1.0,
    num_threads: int | None = None,
):
    """The Ray Serve application: the ingress bound to `num_replicas` engine replicas.
    `server`: the request limits, queue and timeout each replica applies (api keys are not read)."""
    server = (server or ServerConfig()).model_copy(update={"served_model_name": base_name})
    # @serve.deployment made both classes Deployments; mypy ignores what a class decorator returns.
    replica = AdapterReplica.options(  # type: ignore[attr-defined]
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus_per_replica}
    ).bind(config, server, max_adapters_per_replica, num_threads)
    return OpenAIIngress.bind(replica, base_name, config.lora.adapter_dir)  # type: ignore[attr-defined]


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
