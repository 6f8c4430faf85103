"""Incremental detokenization and stop strings.

Each step decodes only a short window of tokens (prefix_offset..end), so the cost
per token stays constant however long the output grows. Text ending in an
incomplete UTF-8 character (U+FFFD) waits for the next token. Text that could be
the start of a stop string is held back from streaming until it is decided. Stop
strings count from the token after min_tokens on (vLLM): one that ends earlier is
part of the output.
"""

from __future__ import annotations

from .sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, seq: Sequence) -> bool:
        """Extend seq.output_text with the newest token; True when a stop string ended the output."""
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.prefix_offset : seq.read_offset])
        full = self._decode(ids[seq.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(seq.output_text)
        seq.output_text += full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        stops = seq.params.stop
        if not stops or len(ids) <= seq.params.min_tokens:
            return False
        search_from = max(0, old_len - max(map(len, stops)) + 1)
        hits = [i for i in (seq.output_text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            seq.output_text = seq.output_text[: min(hits)]
            return True
        return False

    @staticmethod
    def sendable_len(seq: Sequence) -> int:
        """How much of output_text may be streamed now: all of it, less a tail that may begin a stop string."""
        text = seq.output_text
        if seq.is_finished or not seq.params.stop:
            return len(text)
        hold = 0
        for s in seq.params.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return len(text) - hold
