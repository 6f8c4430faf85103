"""JSONL parsing, and the loss mask: labels only on the assistant's tokens, found through the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lora_serve.train.data import IGNORE_INDEX, collate, encode, load_conversations

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_both_formats_become_chat_messages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, "", {"prompt": "Hi", "completion": "Hello"}])
    conversations = load_conversations(path)
    assert conversations == [CHAT, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "d.jsonl:1"),
        ([1, 2], "JSON object"),
        ({"text": "hi"}, "expected"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "string content"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path: Path, line, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [line])
    with pytest.raises(ValueError, match=message) as exc:
        load_conversations(path)
    assert "d.jsonl:1" in str(exc.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no examples"):
        load_conversations(write_jsonl(tmp_path / "d.jsonl", [""]))


def test_labels_are_exactly_the_assistant_turns(tokenizer) -> None:
    example = encode(tokenizer, CHAT, max_length=512)
    assert len(example.labels) == len(example.input_ids)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))
    # Both answers with their end-of-turn marker; no system, user or role-header token.
    assert tokenizer.decode(learned) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    masked = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert "Be brief." in masked and "Capital of France?" in masked and "And of Italy?" in masked
    assert "Paris" not in masked and masked.endswith("<|im_start|>assistant\n")


def test_truncation_keeps_the_prefix_and_drops_examples_with_no_answer_left(tokenizer) -> None:
    full = encode(tokenizer, CHAT, max_length=512)
    first_answer = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    cut = encode(tokenizer, CHAT, max_length=first_answer + 1)
    assert cut.input_ids == full.input_ids[: first_answer + 1]
    assert encode(tokenizer, CHAT, max_length=first_answer) is None


def test_collate_pads_right_and_masks_the_padding(tokenizer) -> None:
    short = encode(tokenizer, CHAT[:3], 512)
    long = encode(tokenizer, CHAT, 512)
    batch = collate([short, long], pad_token_id=0)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == 0).all()
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))
