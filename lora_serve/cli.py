"""The `lora-serve` command line.

    lora-serve serve                                   # the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    lora-serve serve ./Llama-3.2-1B-Instruct --port 8080 --max-num-seqs 32 --api-key sk-local
    LORA_SERVE_MAX_MODEL_LEN=4096 lora-serve serve ./model --lora-modules sql=./adapters/sql chat=./adapters/chat
    lora-serve serve-ray ./model --adapter-dir /shared/adapters --num-replicas 4   # Ray Serve (the `ray` extra)

Every field of the typed configs (config.py) is a kebab-case flag and a LORA_SERVE_<FIELD>
environment variable (flags win), with the field's docstring as its help. The mapping is
made in one place, `flat_settings`, from the config classes themselves, so a new config
field needs no CLI change. `serve-ray` takes every flag of `serve`, with the same defaults,
plus RayConfig's. Subcommands are fields of `LoraServe`; `bench` and `train` go there.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from copy import copy
from typing import Annotated, Any, NoReturn, get_origin

from pydantic import BaseModel, BeforeValidator, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    CliVariadicArg,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

from lora_serve.bench.commands import BenchCommand
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, RayConfig, SchedulerConfig, ServerConfig
from lora_serve.train.command import TrainCommand

ENV_PREFIX = "LORA_SERVE_"
# EngineConfig's field name -> its sub-config class; ServerConfig is flattened beside them.
ENGINE_PARTS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "lora": LoRAConfig,
}
POSITIONAL = {"model"}  # `lora-serve serve MODEL`

log = logging.getLogger("lora_serve")


def _split_list(value: Any) -> Any:
    """Environment lists: a JSON list, or items separated by commas or spaces."""
    if isinstance(value, str):
        value = value.strip()
        return json.loads(value) if value.startswith("[") else [v for v in value.replace(",", " ").split() if v]
    return value


def _pick(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    return cls(**{k: v for k, v in values.items() if k in cls.model_fields})


class _FlatSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        env_parse_none_str="null",  # as the flags: LORA_SERVE_MAX_PREFILL_STALL=null turns pacing off
        use_attribute_docstrings=True,
        extra="forbid",
    )

    def engine_config(self) -> EngineConfig:
        values = self.model_dump(exclude_unset=True)
        parts = {part: _pick(cls, values) for part, cls in ENGINE_PARTS.items()}
        return EngineConfig(**parts)

    def server_config(self) -> ServerConfig:
        values = self.model_dump(exclude_unset=True)
        return _pick(ServerConfig, values)


def flat_settings(name: str, doc: str, config_classes: list[type[BaseModel]], base: type[_FlatSettings]) -> type:
    """One settings class whose fields are all the configs' fields, with their types, bounds and docstrings."""
    fields: dict[str, Any] = {}
    for cls in config_classes:
        for field_name, info in cls.model_fields.items():
            if field_name in fields:
                raise TypeError(f"config field {field_name!r} appears twice; CLI flags must be unique")
            annotation = info.annotation
            # Types built at run time from each field's annotation, which mypy cannot follow.
            if field_name in POSITIONAL:
                annotation = CliPositionalArg[annotation]  # type: ignore[misc, valid-type]
            elif annotation is bool:  # --enable-prefix-caching / --no-enable-prefix-caching, as vLLM's flags
                annotation = CliImplicitFlag[bool]
            elif get_origin(annotation) is list:
                annotation = CliVariadicArg[Annotated[annotation, NoDecode, BeforeValidator(_split_list)]]  # type: ignore[misc, valid-type]
            fields[field_name] = (annotation, copy(info))
    return create_model(name, __base__=base, __doc__=doc, **fields)


class _ServeBase(_FlatSettings):
    def cli_cmd(self) -> None:
        serve(self.engine_config(), self.server_config())


ServeCommand = flat_settings(
    "ServeCommand",
    "Serve a base model and its LoRA adapters over the OpenAI-compatible HTTP API. Every flag is also "
    "read from LORA_SERVE_<FLAG> (upper snake case, e.g. LORA_SERVE_MAX_NUM_SEQS=32; lists as JSON or "
    "comma-separated); flags win.",
    [*ENGINE_PARTS.values(), ServerConfig],
    _ServeBase,
)


class _ServeRayBase(_FlatSettings):
    def ray_config(self) -> RayConfig:
        return _pick(RayConfig, self.model_dump(exclude_unset=True))

    def cli_cmd(self) -> None:
        configs = self.engine_config(), self.server_config(), self.ray_config()  # a bad one is refused before Ray loads
        try:  # ray is an optional extra, imported only by this command
            from lora_serve.deploy.ray_serve import serve_ray
        except ModuleNotFoundError as exc:
            if exc.name != "ray":
                raise
            _exit_with('serve-ray needs Ray Serve: pip install "lora-serve[ray]"')
        serve_ray(*configs)


ServeRayCommand = flat_settings(
    "ServeRayCommand",
    "Serve the same API from replicas on Ray Serve: every flag of `serve` (the same defaults and "
    "LORA_SERVE_<FLAG> variables; each replica runs the engine and server they configure), plus the "
    "replicas' own. A request naming an adapter goes preferably to a replica holding it.",
    [*ENGINE_PARTS.values(), ServerConfig, RayConfig],
    _ServeRayBase,
)


class LoraServe(BaseSettings):
    """Multi-LoRA inference server: one resident base model, many hot-swapped LoRA adapters."""

    model_config = SettingsConfigDict(cli_prog_name="lora-serve", cli_kebab_case=True, use_attribute_docstrings=True)

    serve: CliSubCommand[ServeCommand]  # type: ignore[valid-type]  # a class made by flat_settings() at import
    """Run the OpenAI-compatible server."""

    serve_ray: CliSubCommand[ServeRayCommand]  # type: ignore[valid-type]  # made by flat_settings() too
    """Run the server as replicas on Ray Serve (pip install "lora-serve[ray]")."""

    bench: CliSubCommand[BenchCommand]
    """Benchmarks."""

    train: CliSubCommand[TrainCommand]
    """Fine-tune a LoRA adapter on chat examples."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    from lora_serve.api.server import run_server  # heavy imports (torch) only when serving
    from lora_serve.engine.async_engine import AsyncEngine

    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal; this handler turns that (or one
    # during start-up) into exit 0 through the `finally` below, instead of death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    engine = AsyncEngine.from_config(engine_config, server_config.served_model_name)  # logs model, device, dtype, cache
    name = engine.base_name
    log.info("serving %r at http://%s:%d/v1", name, server_config.host, server_config.port)
    try:
        run_server(engine, server_config)
    finally:
        engine.shutdown()


def _exit_cleanly(signum: int, _frame: object) -> None:
    log.info("%s: shut down cleanly", signal.Signals(signum).name)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        CliApp.run(LoraServe, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        _exit_with(_describe(exc))
    except (SettingsError, ValueError) as exc:
        _exit_with(str(exc))


def _describe(exc: ValidationError) -> str:
    # loc ("serve", "port") -> "--port"; cross-field errors have no loc beyond the config.
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if part not in LoraServe.model_fields]  # not the subcommand
        flag = f"--{loc[0].replace('_', '-')}: " if loc else ""
        lines.append(flag + err["msg"].removeprefix("Value error, "))
    return "; ".join(lines)


def _exit_with(message: str) -> NoReturn:
    print(f"lora-serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
