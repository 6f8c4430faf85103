"""A sampled token's way out: appended to its sequence, checked for the end of the output, turned into
the delta the caller sees (new token ids, text, logprobs since the previous one)."""

from __future__ import annotations

import logging
from collections.abc import Set

from .detokenizer import Detokenizer
from .outputs import RequestOutput, TokenLogprob
from .sequence import Sequence

log = logging.getLogger(__name__)


class OutputProcessor:
    """tokenizer None: no detokenization (deltas carry token ids only, stop strings are not looked for)."""

    def __init__(self, tokenizer, eos_token_ids: Set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> str | None:
        """Add the step's token (and its logprob) to seq; the finish reason it ends the output with, if any."""
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        return self._finish_reason(seq, token)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            # The sampler picks among the tokens the mask allows; this guards a row where it allowed none.
            log.warning("request %s: token %d is outside its grammar; ending it", seq.request_id, token)
            return "stop"
        if seq.matcher is not None and seq.matcher.is_terminated():
            return "stop"  # the grammar is complete and took EOS (even with ignore_eos or before min_tokens)
        may_stop = len(seq.output_token_ids) >= p.min_tokens  # the sampler masks EOS and stop_token_ids before
        if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        if self.tokenizer is not None and self.detokenizer.append(seq):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def delta(self, seq: Sequence) -> RequestOutput:
        """What seq produced since its previous delta (text held back mid-character or by a possible stop string waits)."""
        end = self.detokenizer.sendable_len(seq)
        text = seq.output_text[seq.num_sent_chars : end]
        new_ids = seq.output_token_ids[seq.num_sent_tokens :]
        new_lps = seq.logprobs[seq.num_sent_tokens :] if seq.params.logprobs else []
        seq.num_sent_chars = max(seq.num_sent_chars, end)
        seq.num_sent_tokens = len(seq.output_token_ids)
        prompt_lps: list[TokenLogprob | None] | None = None
        if seq.params.prompt_logprobs is not None and seq.output_token_ids and not seq.prompt_logprobs_sent:
            prompt_lps = [None, *seq.prompt_logprobs]  # all recorded: the prompt is prefilled before the first token
            seq.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            new_logprobs=new_lps,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
            num_cached_tokens=seq.num_prefix_cached_tokens or 0,
            finish_reason=seq.finish_reason,
            prompt_logprobs=prompt_lps,
        )
