"""The allowed-token masks of a step's constrained rows, filled while the model runs, applied to their rows only.

    pending = GrammarBitmask.fill(seqs_to_sample, vocab_size, pool)   # None when no row has a grammar
    ... the forward pass ...
    raw = pending.apply(logits, seqs)   # constrained rows masked in place; their raw logits kept
    ... the choice of tokens ...
    pending.restore(logits, raw)        # for the logprobs, which are the model's own

A row's mask depends only on the tokens its matcher has accepted, all known before the forward pass,
so the masks are filled on a worker thread during it (xgrammar's fill is ~5 us a row for 49152 ids)
and the sampler waits only if that worker is still busy. Only the constrained rows are copied and
masked (xgrammar's CPU kernel masks the listed rows in place): the other rows of the batch cost nothing.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future

import torch
import xgrammar as xgr

from .sequence import Sequence


class GrammarBitmask:
    def __init__(self, seqs: list[Sequence], bitmask: torch.Tensor, filled: Future[None]):
        self.rows = {seq: i for i, seq in enumerate(seqs)}  # sequence -> its row of bitmask
        self.bitmask = bitmask  # [len(seqs), ceil(V / 32)] int32, a bit per token id, 1: allowed
        self.filled = filled

    @classmethod
    def fill(cls, seqs: list[Sequence], vocab_size: int, pool: Executor) -> GrammarBitmask | None:
        """Start filling the masks of the sequences with a matcher; None (nothing to do) when none has one."""
        constrained = [s for s in seqs if s.matcher is not None]
        if not constrained:
            return None
        bitmask = xgr.allocate_token_bitmask(len(constrained), vocab_size)

        def fill_all() -> None:
            for i, seq in enumerate(constrained):
                assert seq.matcher is not None  # filtered above
                seq.matcher.fill_next_token_bitmask(bitmask, i)

        return cls(constrained, bitmask, pool.submit(fill_all))

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor]:
        """Mask logits [B, V] of `seqs` in place (some may have been dropped since fill, e.g. non-finite rows):
        each constrained row allows only its grammar's tokens. Returns those rows and their logits before [R, V]."""
        self.filled.result()
        at = [(b, self.rows[seq]) for b, seq in enumerate(seqs) if seq in self.rows]
        rows = [b for b, _ in at]
        raw = logits[rows]  # a copy (advanced indexing)
        if rows:
            # The kernel pairs logits row i with bitmask row i: lay the filled rows out at their batch rows.
            full = torch.zeros((logits.shape[0], self.bitmask.shape[1]), dtype=self.bitmask.dtype)
            full[rows] = self.bitmask[[r for _, r in at]]
            with torch.inference_mode():  # the model's logits are an inference tensor
                xgr.apply_token_bitmask_inplace(logits, full.to(logits.device), indices=rows)
        return rows, raw

    @staticmethod
    def restore(logits: torch.Tensor, masked: tuple[list[int], torch.Tensor]) -> None:
        """Put back the raw logits of the rows apply() masked."""
        rows, raw = masked
        with torch.inference_mode():
            logits[rows] = raw
