"""Ray Serve: the server's own app on engine replicas, each request routed to a replica holding its adapter.

    pip install "lora-serve[ray]"
    lora-serve serve-ray --adapter-dir adapters --num-replicas 2 --port 8000
    python -m lora_serve.deploy.ray_serve --adapter-dir adapters --num-replicas 2   # the same command

The flags are `lora-serve serve`'s (the same configs, defaults and LORA_SERVE_* variables)
plus RayConfig's (cli.py). The ingress (ray_ingress.py) reads the adapter from a request's
`model` and forwards the request with `multiplexed_model_id=<adapter>`, so Ray routes it to a
replica that already holds that adapter (Ray Serve model multiplexing). Each replica
(ray_replica.py) runs one AsyncEngine behind the server's FastAPI app (api/server.py), which
answers the request as a single process would. Replicas share --adapter-dir, as the Kubernetes
replicas do: an upload through any replica is served by every one.

Reference: https://docs.ray.io/en/latest/serve/model-multiplexing.html
"""

from __future__ import annotations

import logging
import signal

from ray import serve
from ray.serve import Application

from lora_serve.config import EngineConfig, RayConfig, ServerConfig
from lora_serve.deploy.ray_ingress import Ingress
from lora_serve.deploy.ray_replica import AdapterReplica
from lora_serve.model.default_model import resolve_model_path

log = logging.getLogger(__name__)


def build_app(config: EngineConfig, server: ServerConfig, ray_config: RayConfig) -> Application:
    """The Ray Serve application: the ingress bound to ray_config.num_replicas engine replicas."""
    base_name = server.served_model_name or resolve_model_path(config.model.model).name  # as the engine names it
    server = server.model_copy(update={"served_model_name": base_name})
    # Twice what the app admits (running + queued): the app answers an overload with its own 429,
    # where Ray's router would queue without bound, and management calls still find room.
    max_ongoing = 2 * (config.scheduler.max_num_seqs + server.max_queue)
    # @serve.deployment made both classes Deployments; mypy ignores what a class decorator returns.
    replica = AdapterReplica.options(  # type: ignore[attr-defined]
        num_replicas=ray_config.num_replicas,
        max_ongoing_requests=max_ongoing,
        graceful_shutdown_timeout_s=server.shutdown_grace_s,
        ray_actor_options={"num_cpus": ray_config.num_cpus_per_replica, "num_gpus": ray_config.num_gpus_per_replica},
    ).bind(config, server, ray_config.max_adapters_per_replica)
    ingress = Ingress.options(max_ongoing_requests=max_ongoing * ray_config.num_replicas)  # type: ignore[attr-defined]
    return ingress.bind(replica, base_name, server, config.lora.max_adapter_bytes)


def serve_ray(config: EngineConfig, server: ServerConfig, ray_config: RayConfig) -> None:
    """Start (or join) Ray, listen on server.host:server.port, run until SIGINT or SIGTERM; then shut the
    application down, each replica finishing its requests for up to shutdown_grace_s."""
    import ray

    ray.init()
    # SIGTERM as Ctrl-C: Ray's own handler would end the driver at once, leaving Serve running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve.start(http_options={"host": server.host, "port": server.port})
    try:
        serve.run(build_app(config, server, ray_config), name="lora-serve", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("shutting down the replicas")
        serve.shutdown()


if __name__ == "__main__":
    # `lora-serve serve-ray`, one parser for both entries. It imports this module again under its
    # own name, so that Ray ships the deployment classes by reference, as in tests.
    import sys

    from lora_serve.cli import main

    main(["serve-ray", *sys.argv[1:]])
