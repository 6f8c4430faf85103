"""Engine logprobs -> the two OpenAI formats (chat `content` list, legacy completions arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_serve.api.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, PromptLogprobs, TopLogprob
from lora_serve.engine.outputs import TokenLogprob


class TokenText:
    """Decodes single token ids for logprobs, caching since the same ids recur."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            # A lone byte-level token may be half a UTF-8 character; decode gives U+FFFD then, as vLLM does.
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def _top(token_text: TokenText, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(token_text: TokenText, logprobs: list[TokenLogprob], num_top: int) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        sampled = _top(token_text, lp.token_id, lp.logprob)
        tops = [_top(token_text, tid, tlp) for tid, tlp in lp.top[:num_top]]
        content.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_text: TokenText,
    logprobs: list[TokenLogprob],
    num_top: int,
    text_offset: int,
    echoed: Sequence[int] = (),
    echoed_logprobs: Sequence[TokenLogprob | None] = (),
) -> CompletionLogprobs:
    """`text_offset` is where the first of these tokens starts in the choice's text. echoed: prompt token
    ids put before the completion's tokens (echo), with their logprobs (None for the first: nothing precedes it)."""
    out = CompletionLogprobs()
    entries = [*zip(echoed, echoed_logprobs), *((lp.token_id, lp) for lp in logprobs)]
    for token_id, lp in entries:
        text = token_text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {token_text(tid): tlp for tid, tlp in lp.top[:num_top]})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def prompt_logprobs(token_text: TokenText, prompt: list[int], logprobs: Sequence[TokenLogprob | None], num_top: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token, None for the first, then {token id: logprob, rank, text} of
    the prompt's token, then of the num_top most likely ones."""
    out: PromptLogprobs = []
    for token_id, lp in zip(prompt, logprobs):
        if lp is None:
            out.append(None)
            continue
        entry = {token_id: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=token_text(token_id))}
        for rank, (tid, tlp) in enumerate(lp.top[:num_top], start=1):
            entry.setdefault(tid, PromptLogprob(logprob=tlp, rank=rank, decoded_token=token_text(tid)))
        out.append(entry)
    return out
