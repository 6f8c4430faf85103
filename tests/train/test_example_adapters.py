"""The adapters shipped in adapters/ (trained by `lora-serve train`, see adapters/README.md) do what their
names say on held-out prompts, all of them and the bare base answering in one mixed batch.

    pytest -s tests/train/test_example_adapters.py     # -s prints every answer and the scores
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE, LoRAModel
from lora_serve.model.arch import ModelArch

from ..engine.helpers import chat_ids, run_to_completion

ADAPTERS_DIR = Path(__file__).resolve().parents[2] / "adapters"
HELDOUT = json.loads((ADAPTERS_DIR / "heldout.json").read_text())
SHIPPED = ("french", "json", "pirate")
MAX_BYTES = 5 * 1000 * 1000
MAX_TOKENS = 48
# French function words that are not also English words (so an English answer scores ~0).
FRENCH_WORDS = set(
    "le la les l de des du d un une est sont et ou que qu qui pour dans pas avec au aux il elle ils elles ce cette "
    "ces nous vous je j tu sur par ne se sa ses leur leurs mais très y été être avoir mon ma mes ton ta votre".split()
)


def french_ratio(text: str) -> float:
    words = re.findall(r"[a-zàâäçéèêëîïôöùûüÿœ]+", text.lower())
    return sum(w in FRENCH_WORDS for w in words) / max(len(words), 1)


def is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str) and bool(value["answer"])


def is_pirate(text: str) -> bool:
    return text.startswith("Arr") and "matey" in text.lower()


# adapter -> (score of one answer, how the scores are summed up, what the adapter must reach, what the base stays under)
CHECKS = {
    "french": (french_ratio, "mean French-word ratio", 0.25, 0.05),
    "json": (is_json_answer, 'share parsing as {"answer": str}', 0.9, 0.1),
    "pirate": (is_pirate, "share starting 'Arr' with 'matey'", 0.9, 0.1),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_is_a_small_valid_peft_folder(name: str, default_model_dir: Path) -> None:
    folder = ADAPTERS_DIR / name
    assert (folder / "train.jsonl").is_file()
    assert (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size <= MAX_BYTES
    arch = ModelArch.from_dict(json.loads((default_model_dir / "config.json").read_text()))
    LoRAModel.load(name, folder, arch, max_rank=64)  # the extra train.jsonl is ignored


@pytest.fixture(scope="module")
def answers(default_model_dir: Path) -> dict[str | None, list[str]]:
    """Greedy answers of the base (None) and every shipped adapter to every held-out prompt, in one batch."""
    requests, lora = {}, {}
    engine = LLMEngine.from_config(
        EngineConfig(
            scheduler=SchedulerConfig(max_model_len=512, max_num_seqs=len(HELDOUT) * 4),
            cache=CacheConfig(kv_cache_memory_gb=0.5),
            lora=LoRAConfig(max_loras=len(SHIPPED), adapter_dir=ADAPTERS_DIR),  # registers every sub-folder
        ),
        default_model_dir,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    for adapter in (None, *SHIPPED):
        for i, prompt in enumerate(HELDOUT):
            rid = f"{adapter}-{i}"
            requests[rid] = (chat_ids(engine.tokenizer, prompt), params)
            lora[rid] = adapter
    out = run_to_completion(engine, requests, lora)
    texts = {adapter: [out[f"{adapter}-{i}"]["text"].strip() for i in range(len(HELDOUT))] for adapter in (None, *SHIPPED)}
    for i, prompt in enumerate(HELDOUT):
        print(f"\n## {prompt}")
        for adapter in (None, *SHIPPED):
            print(f"  {adapter or 'base'}: {texts[adapter][i]!r}")
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_adapter_shows_its_behaviour_and_the_base_does_not(answers, name: str) -> None:
    score, what, adapter_min, base_max = CHECKS[name]
    adapter = sum(map(score, answers[name])) / len(HELDOUT)
    base = sum(map(score, answers[None])) / len(HELDOUT)
    others = {o: sum(map(score, answers[o])) / len(HELDOUT) for o in SHIPPED if o != name}
    print(
        f"\n{name}: {what} on {len(HELDOUT)} held-out prompts: adapter {adapter:.3f}, base {base:.3f}, "
        + ", ".join(f"{o} {v:.3f}" for o, v in others.items())
    )
    assert adapter >= adapter_min
    assert base < base_max
    assert all(v < base_max for v in others.values())  # each behaviour belongs to its own adapter
