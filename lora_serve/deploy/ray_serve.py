"""Ray Serve: lora-serve engines as replicas, adapters multiplexed per replica.

    pip install -e ".[ray]"
    lora-serve serve-ray --adapter-dir adapters --num-replicas 2 --port 8000
    python -m lora_serve.deploy.ray_serve --adapter-dir adapters --num-replicas 2   # the same command

The flags are `lora-serve serve`'s (the same configs, defaults and LORA_SERVE_* variables)
plus RayConfig's (cli.py). An OpenAI-compatible ingress (ray_ingress.py: chat and completions,
streamed or not) reads the adapter from a request's `model` and calls the replicas with
`multiplexed_model_id=<adapter>`, so Ray routes it to a replica that already holds that adapter
(Ray Serve model multiplexing). Each replica (ray_replica.py) runs one AsyncEngine. Its
`@serve.multiplexed` loader registers <adapter-dir>/<adapter> on first use, and Ray's per-replica
LRU unregisters the least recently used one past --max-adapters-per-replica. Replicas share
--adapter-dir, as the Kubernetes replicas do. Inside a replica, the engine's own tiers
(--max-loras device slots, CPU copies) work as in a single process.

Reference: https://docs.ray.io/en/latest/serve/model-multiplexing.html
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from lora_serve.config import EngineConfig, RayConfig, ServerConfig
from lora_serve.deploy.ray_ingress import OpenAIIngress
from lora_serve.deploy.ray_replica import AdapterReplica
from lora_serve.model.default_model import resolve_model_path


def build_app(config: EngineConfig, server: ServerConfig, ray_config: RayConfig) -> Application:
    """The Ray Serve application: the ingress bound to ray_config.num_replicas engine replicas.
    `server`: the request limits, queue and timeout each replica applies (api keys are not read)."""
    base_name = server.served_model_name or resolve_model_path(config.model.model).name  # as the engine names it
    server = server.model_copy(update={"served_model_name": base_name})
    # @serve.deployment made both classes Deployments; mypy ignores what a class decorator returns.
    replica = AdapterReplica.options(  # type: ignore[attr-defined]
        num_replicas=ray_config.num_replicas,
        ray_actor_options={"num_cpus": ray_config.num_cpus_per_replica, "num_gpus": ray_config.num_gpus_per_replica},
    ).bind(config, server, ray_config.max_adapters_per_replica)
    return OpenAIIngress.bind(replica, base_name, config.lora.adapter_dir)  # type: ignore[attr-defined]


def serve_ray(config: EngineConfig, server: ServerConfig, ray_config: RayConfig) -> None:
    """Start (or join) Ray, listen on server.host:server.port, run until interrupted."""
    import ray

    ray.init()
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(build_app(config, server, ray_config), name="lora-serve", blocking=True)


if __name__ == "__main__":
    # `lora-serve serve-ray`, one parser for both entries. It imports this module again under its
    # own name, so that Ray ships the deployment classes by reference, as in tests.
    import sys

    from lora_serve.cli import main

    main(["serve-ray", *sys.argv[1:]])
