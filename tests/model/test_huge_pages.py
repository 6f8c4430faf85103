"""Moving the base's weights into huge pages (model/huge_pages.py): values, ties and outputs unchanged;
the pages are huge where the system gives them; nothing moves where it does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lora_serve.bench.llama_shapes import arch_of
from lora_serve.model import huge_pages
from lora_serve.model.loader import random_model

THP = huge_pages.thp_mode() in ("always", "madvise")


def tied_model():
    return random_model(dataclasses.replace(arch_of("tiny"), tie_word_embeddings=True), torch.float32, torch.device("cpu"), 64)


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside, kb = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            kb = int(line.split()[1])
    return kb


@pytest.mark.skipif(not THP, reason="this system gives no transparent huge pages")
def test_moved_weights_keep_their_values_ties_and_outputs():
    model = tied_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    lin = model.layers[0].mlp.gate_up_proj
    x = torch.randn(3, lin.in_features)
    y = lin(x)
    moved = huge_pages.move_to_huge_pages(model, min_bytes=0)

    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.lm_head_weight is model.embed_tokens.weight  # still one parameter
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    assert moved == sum(t.nbytes for t in tensors.values())
    # One mapping, each tensor 64-byte aligned, none overlapping.
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors.values())
    assert all(a % huge_pages.ALIGN == 0 for a, _ in spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] - spans[0][0] < moved + len(spans) * huge_pages.ALIGN
    assert torch.equal(lin(x), y)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(not THP or not Path("/proc/self/smaps").exists(), reason="this system gives no transparent huge pages")
def test_the_weights_lie_in_huge_pages():
    model = random_model(dataclasses.replace(arch_of("tiny"), vocab_size=32768), torch.float32, torch.device("cpu"), 64)
    embedding = model.embed_tokens.weight  # 32768 x 64 float32: 8 MiB
    if huge_pages.thp_mode() == "madvise":  # ("always" may give torch's own allocations huge pages too)
        assert anon_huge_kb(embedding.data_ptr()) == 0  # torch's own allocation, not advised: small pages
    assert huge_pages.move_to_huge_pages(model) >= embedding.nbytes  # the default bound: 2 MiB tensors and up
    assert anon_huge_kb(model.embed_tokens.weight.data_ptr()) >= 2048


def test_nothing_moves_where_the_system_gives_no_huge_pages(tmp_path: Path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert huge_pages.thp_mode() == "never"
    model = tied_model()
    where = {name: t.data_ptr() for name, t in model.state_dict().items()}
    assert huge_pages.move_to_huge_pages(model, min_bytes=0) == 0
    assert huge_pages.huge_page_buffer(1 << 20) is None
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == where
    monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "missing")
    assert huge_pages.thp_mode() is None and huge_pages.huge_page_buffer(1 << 20) is None
