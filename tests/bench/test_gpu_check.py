"""`lora-serve bench gpu-check --device cpu --tiny`: the GPU check's whole code path on a 2-layer shape, so it cannot rot."""

from __future__ import annotations

import pytest
from pydantic_settings import CliApp

from lora_serve.bench import gpu_check
from lora_serve.bench.gpu_check_plan import BenchGPUCheck
from lora_serve.cli import LoraServe

CONFIGURATIONS = ["base", "1 adapter merged", "1 adapter unmerged", "2 adapters", "4 adapters"]


def tiny_plan(*args: str) -> BenchGPUCheck:
    root = CliApp.run(LoraServe, cli_args=["bench", "gpu-check", "--tiny", "--device", "cpu", *args], cli_cmd_method_name="model_dump")
    return root.bench.gpu_check.plan()


def test_plan_defaults_and_explicit_fields():
    plan = tiny_plan("--num-seqs", "6", "--profile-steps", "0")
    assert plan.shapes == ["tiny"] and plan.num_adapters_list == [2, 4] and plan.num_seqs == 6 and plan.profile_steps == 0
    full = BenchGPUCheck().plan()
    assert full.shapes == ["llama-3.2-1b", "llama-3-8b"] and full.num_adapters_list == [8, 32, 64] and full.num_seqs == 64
    assert full.profile_steps == 8
    with pytest.raises(ValueError, match="num-seqs"):
        BenchGPUCheck(num_seqs=8).plan()


def test_tiny_cpu_run_checks_and_measures_every_configuration(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gpu_check.run(tiny_plan())
    out = capsys.readouterr().out
    assert "| q_proj/k_proj/v_proj |" in out and "| down_proj " in out
    for label in CONFIGURATIONS:
        assert f"| lora-serve {label} " in out
    assert "memory-bound ceiling" in out
    profiled = _profile_rows(out)
    assert list(profiled) == ["base", "4 adapters"]
    for wall_ms, kernel_ms, launches in profiled.values():
        assert wall_ms > 0 and kernel_ms == 0 and launches == 0  # on a CPU no device kernels run
    assert out.rstrip().endswith("all checks passed")


def _profile_rows(out: str) -> dict[str, tuple[float, float, int]]:
    """The profile table's rows: label -> (wall ms, device kernels ms, kernels launched)."""
    lines = out[out.index("| decode step ") :].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (float(cells[1]), float(cells[2]), int(cells[4]))
    return rows


def test_tiny_cpu_run_checks_the_triton_kernels_under_the_interpreter(monkeypatch, capsys):
    pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gpu_check.run(tiny_plan("--num-adapters-list", "3", "--repeats", "1", "--decode-steps", "1"))
    out = capsys.readouterr().out
    assert "triton err / max delta" in out
    assert "end to end, logits: max |triton - torch|" in out and "(ok)" in out
    assert out.rstrip().endswith("all checks passed")


def test_a_failing_part_is_reported_and_the_rest_still_runs(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("kernel launch failed")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gpu_check, "check_projections", broken)
    gpu_check.run(tiny_plan())
    out = capsys.readouterr().out
    assert "kernel check FAILED" in out and "RuntimeError: kernel launch failed" in out
    assert "| lora-serve 4 adapters " in out
    assert out.rstrip().endswith("SOME CHECKS FAILED")


def test_slot_dtype_reaches_the_kernel_check_the_engine_and_the_bandwidth_ceiling(monkeypatch, capsys):
    from lora_serve.bench.llama_shapes import arch_of
    from lora_serve.bench.random_adapters import random_lora_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = tiny_plan("--lora-dtype", "float16", "--num-adapters-list", "2", "--repeats", "1", "--decode-steps", "1")
    gpu_check.run(plan)
    out = capsys.readouterr().out
    assert "LoRA slots in torch.float16" in out.splitlines()[0]
    adapter_bytes = random_lora_model("x", arch_of("tiny"), plan.rank, 0).num_params * 2  # float16
    assert f"and 2 adapters ({2 * adapter_bytes / 1e9:.3g} GB)" in out
    assert out.rstrip().endswith("all checks passed")
