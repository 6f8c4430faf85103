"""`lora-serve serve` and `serve-ray` flags and LORA_SERVE_* variables map onto the typed configs (without starting a server).

`serve-ray` (Ray Serve replicas) is built from the same config models as `serve`, plus RayConfig:
every table below runs against both commands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_serve import cli
from lora_serve.cli import ENGINE_PARTS, ServeCommand, ServeRayCommand, main
from lora_serve.config import EngineConfig, RayConfig, ServerConfig

COMMANDS = {"serve": ServeCommand, "serve-ray": ServeRayCommand}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LORA_SERVE_"):
            monkeypatch.delenv(name)


def parse(argv: list[str], command: str = "serve") -> ServeCommand:
    return COMMANDS[command](_cli_parse_args=argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_configs_defaults(command: str) -> None:
    cmd = parse([], command)
    assert cmd.engine_config() == EngineConfig()
    assert cmd.server_config() == ServerConfig()
    assert cmd.server_config().port == 8000


def test_serve_ray_has_every_serve_flag_with_its_type_default_and_help() -> None:
    serve, ray = ServeCommand.model_fields, ServeRayCommand.model_fields
    assert set(ray) == set(serve) | set(RayConfig.model_fields)
    for name, info in serve.items():
        same = (ray[name].annotation, ray[name].description, ray[name].metadata) == (info.annotation, info.description, info.metadata)
        assert same and ray[name].get_default(call_default_factory=True) == info.get_default(call_default_factory=True), name
    assert parse([], "serve-ray").ray_config() == RayConfig()


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_reach_every_sub_config(command: str) -> None:
    cmd = parse(
        [
            "/models/llama",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--block-size",
            "32",
            "--max-num-seqs",
            "4",
            "--max-model-len",
            "1024",
            "--max-loras",
            "2",
            "--lora-dtype",
            "float16",
            "--lora-modules",
            "sql=/a/sql",
            "chat=/a/chat",
            "--allowed-lora-dir",
            "/a",
            "/b",
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--served-model-name",
            "base",
            "--api-key",
            "k1",
            "--admin-api-key",
            "k2",
        ],
        command,
    )
    engine, server = cmd.engine_config(), cmd.server_config()
    assert (engine.model.model, engine.model.dtype, engine.model.device) == ("/models/llama", "bfloat16", "cpu")
    assert engine.cache.block_size == 32
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_model_len) == (4, 1024)
    assert (engine.lora.max_loras, engine.lora.lora_dtype) == (2, "float16")
    assert engine.lora.lora_modules == ["sql=/a/sql", "chat=/a/chat"]
    assert engine.lora.allowed_lora_dir == [Path("/a"), Path("/b")]
    assert server == ServerConfig(host="0.0.0.0", port=9001, served_model_name="base", api_key="k1", admin_api_key="k2")


@pytest.mark.parametrize("command", COMMANDS)
def test_environment_variables_and_flags_win(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_SERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LORA_SERVE_PORT", "9100")
    monkeypatch.setenv("LORA_SERVE_MODEL", "/env/model")
    monkeypatch.setenv("LORA_SERVE_LORA_MODULES", "a=/x, b=/y")
    monkeypatch.setenv("LORA_SERVE_ALLOWED_LORA_DIR", '["/p"]')
    cmd = parse(["--port", "9200"], command)
    engine = cmd.engine_config()
    assert engine.scheduler.max_num_seqs == 7
    assert engine.model.model == "/env/model"
    assert engine.lora.lora_modules == ["a=/x", "b=/y"]
    assert engine.lora.allowed_lora_dir == [Path("/p")]
    assert cmd.server_config().port == 9200


@pytest.mark.parametrize("command", COMMANDS)
def test_null_turns_off_an_option_whose_default_is_on(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([], command).engine_config().scheduler.max_prefill_stall == 2.0
    assert parse(["--max-prefill-stall", "null"], command).engine_config().scheduler.max_prefill_stall is None
    monkeypatch.setenv("LORA_SERVE_MAX_PREFILL_STALL", "null")
    assert parse([], command).engine_config().scheduler.max_prefill_stall is None
    assert parse(["--max-prefill-stall", "1.5"], command).engine_config().scheduler.max_prefill_stall == 1.5


@pytest.mark.parametrize("command", COMMANDS)
def test_s3_locations_stay_urls_beside_local_paths(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Path would fold s3://bucket/prefix into s3:/bucket/prefix: URLs are kept as given, local paths become Paths."""
    argv = ["--adapter-dir", "s3://team-bucket/adapters", "--allowed-lora-dir", "s3://team-bucket/shared", "/local/adapters"]
    argv += ["--lora-modules", "sql=s3://team-bucket/shared/sql", "chat=/a/chat", "--adapter-cache-dir", "/var/cache/s3"]
    lora = parse(argv, command).engine_config().lora
    assert lora.adapter_dir == "s3://team-bucket/adapters"
    assert lora.allowed_lora_dir == ["s3://team-bucket/shared", Path("/local/adapters")]
    assert lora.lora_modules == ["sql=s3://team-bucket/shared/sql", "chat=/a/chat"]
    assert lora.adapter_cache_dir == Path("/var/cache/s3")
    monkeypatch.setenv("LORA_SERVE_ADAPTER_DIR", "s3://env-bucket/adapters")
    monkeypatch.setenv("LORA_SERVE_ALLOWED_LORA_DIR", "s3://env-bucket/a, /b")
    lora = parse([], command).engine_config().lora
    assert (lora.adapter_dir, lora.allowed_lora_dir) == ("s3://env-bucket/adapters", ["s3://env-bucket/a", Path("/b")])
    assert parse(["--adapter-dir", "/srv/adapters"], command).engine_config().lora.adapter_dir == Path("/srv/adapters")


def test_ray_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_SERVE_NUM_REPLICAS", "3")
    monkeypatch.setenv("LORA_SERVE_MAX_ADAPTERS_PER_REPLICA", "9")
    cmd = parse(["--max-adapters-per-replica", "8", "--num-gpus-per-replica", "1", "--max-loras", "2"], "serve-ray")
    assert cmd.ray_config() == RayConfig(num_replicas=3, max_adapters_per_replica=8, num_gpus_per_replica=1)
    assert cmd.engine_config().lora.max_loras == 2


@pytest.mark.parametrize(("command", "configs"), [("serve", []), ("serve-ray", [RayConfig])])
def test_help_documents_every_config_field(command: str, configs: list, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for cls in [*ENGINE_PARTS.values(), ServerConfig, *configs]:
        for name, info in cls.model_fields.items():
            flag = "MODEL" if name == "model" else "--" + name.replace("_", "-")
            assert flag in out
            assert info.description and info.description.split()[0] in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "abc"], "--port"),
        (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
        (["serve", "--dtype", "float8"], "--dtype"),
        (["serve", "--lora-dtype", "float8"], "--lora-dtype"),
        (["serve", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["serve", "--lora-modules", "no-equals-sign"], "name=path"),
        (["serve", "--allowed-lora-dir", "gs://bucket/adapters"], "s3://bucket/prefix"),
        (["serve", "--adapter-dir", "https://example.com/adapters"], "s3://bucket/prefix"),
        (["serve", "--lora-modules", "x=gs://bucket/x"], "s3://bucket/prefix"),
        (["serve-ray", "--port", "abc"], "--port"),
        (["serve-ray", "--num-replicas", "0"], "--num-replicas"),
        (["serve-ray", "--num-cpus-per-replica", "0"], "--num-cpus-per-replica"),
        (["serve-ray", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_boolean_flags_take_a_no_form_through_the_real_command_line(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's style: --enable-prefix-caching / --no-enable-prefix-caching, parsed by `lora-serve` itself."""
    seen: list[tuple[EngineConfig, ServerConfig]] = []
    if command == "serve":
        monkeypatch.setattr(cli, "serve", lambda engine, server: seen.append((engine, server)))
    else:
        ray_serve = pytest.importorskip("lora_serve.deploy.ray_serve")  # the `ray` extra
        monkeypatch.setattr(ray_serve, "serve_ray", lambda engine, server, ray: seen.append((engine, server)))
    main([command, "--no-enable-prefix-caching", "--no-access-log", "--disable-metrics-auth"])
    main([command, "--enable-prefix-caching"])
    (off, off_server), (on, _) = seen
    assert (off.cache.enable_prefix_caching, off_server.access_log, off_server.disable_metrics_auth) == (False, False, True)
    assert on.cache.enable_prefix_caching is True
