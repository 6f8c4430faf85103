"""`lora-serve train` on the tiny random Llama: the loss falls, only LoRA trains, the adapter is a PEFT
folder that PEFT and lora-serve load and agree on, a seed fixes the bytes, and --upload registers it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lora_serve.cli import main
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE, LoRAModel
from lora_serve.model.arch import ModelArch
from lora_serve.train.config import TrainConfig
from lora_serve.train.data import collate, encode, load_conversations
from lora_serve.train.trainer import add_lora, assistant_loss, train

from ..api.adapter_helpers import tiny_engine_with
from ..api.live_server import live_server
from ..engine.helpers import chat_ids, run_to_completion
from ..lora.peft_reference import check_against, reference

EXAMPLES = [
    ("Hi there", "Arr, matey! Ahoy."),
    ("What is 2 plus 2?", "Arr, matey! That be 4."),
    ("Name a colour.", "Arr, matey! Blue."),
    ("Who are you?", "Arr, matey! A pirate."),
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": q, "completion": a} for q, a in EXAMPLES[:2]]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in EXAMPLES[2:]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tiny_llama_dir: Path, out: Path, **overrides) -> TrainConfig:
    fields = dict(
        model=str(tiny_llama_dir),
        output_dir=out,
        r=4,
        lora_alpha=8,
        target_modules=["all-linear"],
        learning_rate=2e-2,
        max_steps=30,
        batch_size=2,
        num_threads=2,
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory):
    return train(config(tiny_llama_dir, tmp_path_factory.mktemp("out") / "pirate"), data)


def test_the_loss_falls_and_only_lora_weights_are_saved(trained) -> None:
    first, last = trained.losses[0], sum(trained.losses[-5:]) / 5
    assert len(trained.losses) == 30 and trained.num_examples == len(EXAMPLES)
    assert last < first - 0.5, trained.losses  # from ln(49152) = 10.8, the random model's uniform guess
    folder = trained.output_dir
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # no PEFT model card
    with safe_open(folder / WEIGHTS_FILE, "pt") as f:
        names = list(f.keys())
        assert all(".lora_A." in n or ".lora_B." in n for n in names)
        assert {f.get_tensor(n).dtype for n in names} == {torch.float16}
    # 2 layers x 7 projections, A and B each; rank 4 x (in + out): q, o 64+64; k, v 64+32; gate, up, down 64+128.
    assert len(names) == 28 and trained.num_trainable == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["peft_type"]) == (4, 8, "LORA")


def test_peft_and_lora_serve_give_the_same_logits(trained, tiny_llama_dir: Path) -> None:
    check_against_peft(trained.output_dir, tiny_llama_dir)


def test_a_dora_adapter_trains_its_magnitudes_and_lora_serve_matches_peft(tiny_llama_dir: Path, data: Path, tmp_path: Path) -> None:
    result = train(config(tiny_llama_dir, tmp_path / "dora", use_dora=True), data)
    assert json.loads((result.output_dir / CONFIG_FILE).read_text())["use_dora"] is True
    with safe_open(result.output_dir / WEIGHTS_FILE, "pt") as f:
        assert sum(n.endswith(".lora_magnitude_vector") for n in f.keys()) == 14  # one per projection
    check_against_peft(result.output_dir, tiny_llama_dir)


def check_against_peft(folder: Path, tiny_llama_dir: Path) -> None:
    """The trained adapter and the base, in one batch, give PEFT's tokens and logprobs."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder, adapter_name="pirate").eval()
    engine = LLMEngine.from_config(
        EngineConfig(
            model=ModelConfig(device="cpu", dtype="float32"),
            cache=CacheConfig(kv_cache_memory_gb=0.02),
            scheduler=SchedulerConfig(max_model_len=256),
            lora=LoRAConfig(max_lora_rank=8, lora_modules=[f"pirate={folder}"]),
        ),
        tiny_llama_dir,
    )
    prompt = chat_ids(engine.tokenizer, EXAMPLES[0][0])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)
    out = run_to_completion(engine, {"a": (prompt, params), "b": (prompt, params)}, {"a": "pirate", "b": None})
    ref_tokens, ref_rows = reference(peft_model, "pirate", prompt, NEW_TOKENS)
    base_tokens, base_rows = reference(peft_model, None, prompt, NEW_TOKENS)
    assert (ref_rows[0] - base_rows[0]).abs().max() > 0.5  # training really moved the model
    check_against(out["a"], ref_tokens, ref_rows)
    check_against(out["b"], base_tokens, base_rows)


def test_lora_serve_validates_the_folder(trained, tiny_llama_dir: Path) -> None:
    arch = ModelArch.from_dict(json.loads((tiny_llama_dir / "config.json").read_text()))
    model = LoRAModel.load("pirate", trained.output_dir, arch, max_rank=4)
    assert len(model.weights) == 14 and model.num_params == trained.num_trainable


def test_the_same_seed_gives_the_same_bytes(trained, tiny_llama_dir: Path, data: Path, tmp_path: Path) -> None:
    again = train(config(tiny_llama_dir, tmp_path / "again"), data)
    other = train(config(tiny_llama_dir, tmp_path / "other", seed=1, max_steps=2), data)
    assert again.losses == trained.losses
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        assert (again.output_dir / file).read_bytes() == (trained.output_dir / file).read_bytes()
    assert (other.output_dir / WEIGHTS_FILE).read_bytes() != (trained.output_dir / WEIGHTS_FILE).read_bytes()


def test_top_layers_adapts_only_the_last_layers(tiny_llama_dir: Path, data: Path, tmp_path: Path) -> None:
    result = train(config(tiny_llama_dir, tmp_path / "top", top_layers=1, max_steps=1), data)
    saved = json.loads((result.output_dir / CONFIG_FILE).read_text())
    assert saved["layers_to_transform"] == [1]
    arch = ModelArch.from_dict(json.loads((tiny_llama_dir / "config.json").read_text()))
    assert {layer for layer, _ in LoRAModel.load("top", result.output_dir, arch, max_rank=4).weights} == {1}


def test_the_loss_is_hf_causal_lm_loss_on_the_labelled_tokens(tiny_llama_dir: Path, data: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), TrainConfig())
    batch = collate([encode(tokenizer, c, 512) for c in load_conversations(data)], tokenizer.pad_token_id)
    with torch.no_grad():
        assert assistant_loss(model, **batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_saved_dtype_is_the_one_asked_for(tiny_llama_dir: Path, data: Path, tmp_path: Path, dtype, torch_dtype) -> None:
    result = train(config(tiny_llama_dir, tmp_path / dtype, dtype=dtype, max_steps=1), data)
    with safe_open(result.output_dir / WEIGHTS_FILE, "pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch_dtype}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target_modules=["lm_head"]), "target_modules"),
        (dict(target_modules=[]), "target_modules"),
        (dict(r=0), "r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(learning_rate=0), "learning_rate"),
        (dict(dtype="int8"), "dtype"),
        (dict(max_steps=0), "max_steps"),
    ],
)
def test_bad_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_cli_trains_and_uploads_to_a_running_server(tiny_llama_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    with tiny_engine_with(tiny_llama_dir, tmp_path / "store") as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", api_key="sk-test")) as server:
            main(
                [
                    "train",
                    str(data),
                    "--model",
                    str(tiny_llama_dir),
                    "--output-dir",
                    str(tmp_path / "out"),
                    "-r",
                    "2",
                    "--target-modules",
                    "q_proj",
                    "v_proj",
                    "--max-steps",
                    "2",
                    "--num-threads",
                    "2",
                    "--upload",
                    server.base_url,
                    "--name",
                    "sea",
                    "--api-key",
                    "sk-test",
                ]
            )
            client = server.client(api_key="sk-test")
            assert "sea" in [m.id for m in client.models.list().data]
            reply = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            assert reply.model == "sea"
    printed = capsys.readouterr().out
    assert "2 steps" in printed and "uploaded as 'sea'" in printed
    assert (tmp_path / "store" / "sea" / WEIGHTS_FILE).read_bytes() == (tmp_path / "out" / WEIGHTS_FILE).read_bytes()
