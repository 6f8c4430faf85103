"""Training examples: JSONL -> chat messages -> token ids, with the loss only on the assistant's tokens.

One JSON object per line, either the OpenAI chat fine-tuning format
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or a prompt/completion pair, trained as one user turn and one assistant turn
    {"prompt": "...", "completion": "..."}

The conversation is rendered with the tokenizer's chat template. The tokens of assistant
turn i are those of render(messages[:i+1]) after render(messages[:i], add_generation_prompt=True),
so the role header is masked and the turn's end marker (<|im_end|> for SmolLM2) is learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # labels with this value carry no loss (torch cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # input_ids where the assistant speaks, IGNORE_INDEX elsewhere; same length


def load_conversations(path: Path) -> list[Messages]:
    """Every line of a JSONL file as a list of chat messages; ValueError names the bad line."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    conversations.append(_parse_line(json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{number}: {e}") from None
    if not conversations:
        raise ValueError(f"{path} holds no examples")
    return conversations


def _parse_line(row: object) -> Messages:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise ValueError('expected {"messages": [...]} or {"prompt": ..., "completion": ...}')
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a role in {ROLES} and a string content, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode(tokenizer, messages: Messages, max_length: int) -> Example | None:
    """Token ids and labels of one conversation, cut to max_length; None when no assistant token is left."""
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if turn[: len(prefix)] != prefix or ids[: len(turn)] != turn:
            raise ValueError(
                f"the chat template does not render this conversation prefix by prefix, so assistant turn {i} "
                "cannot be located (does the conversation start with an assistant message?)"
            )
        labels[len(prefix) : len(turn)] = turn[len(prefix) :]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels)


def _render(tokenizer, messages: Messages, generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False))


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each [B, T] with T the longest example."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
