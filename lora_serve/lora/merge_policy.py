"""When to merge an adapter automatically (`--merge-policy auto`), after dLoRA (OSDI'24).

Watch the tokens each adapter had in the last `window` engine steps. Merge the adapter
whose share reaches `merge_threshold`; unmerge when the merged adapter's share falls below
`unmerge_threshold` (lower, so a share hovering near the threshold does not flap). At most
one switch per `min_interval` steps. Counted in steps, not seconds, so a test can drive it
step by step and get the same decisions every time.

Only adapters `eligible` says yes to are merge candidates (the engine asks the adapter's
auto_merge mark: an admin's choice, never a tenant's). The others' tokens still count in the
total, so flooding an ineligible adapter merges nothing and only lowers every other share.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class MergeDecision:
    action: str  # "merge" | "unmerge"
    adapter: str
    reason: str


class MergePolicy:
    def __init__(self, merge_threshold: float, unmerge_threshold: float, window: int, min_interval: int):
        if not 0 < unmerge_threshold < merge_threshold <= 1:
            raise ValueError("need 0 < unmerge_threshold < merge_threshold <= 1")
        self.merge_threshold = merge_threshold
        self.unmerge_threshold = unmerge_threshold
        self.window = window
        self.min_interval = min_interval
        self._steps: deque[Counter] = deque(maxlen=window)
        self._totals: Counter = Counter()
        self._since_switch = min_interval  # the first switch needs no wait
        self.decisions: Counter = Counter()  # action -> count, for metrics
        self.last: MergeDecision | None = None

    def observe(self, tokens: Counter, merged: str | None, eligible: Callable[[str], bool]) -> MergeDecision | None:
        """Record one step's tokens per adapter (None = base) and return a switch to make, if any.
        eligible(name): whether the policy may merge that adapter."""
        if len(self._steps) == self.window:
            self._totals.subtract(self._steps[0])
        self._steps.append(tokens)
        self._totals.update(tokens)
        self._since_switch += 1
        if len(self._steps) < self.window or self._since_switch < self.min_interval:
            return None
        total = sum(self._totals.values())
        if total == 0:
            return None
        if merged is not None:
            share = self._totals[merged] / total
            if share < self.unmerge_threshold:
                return self._decide("unmerge", merged, f"share {share:.2f} < {self.unmerge_threshold}")
            return None
        adapters = [(n, c) for n, c in self._totals.items() if n is not None and c > 0 and eligible(n)]
        if not adapters:
            return None
        name, count = max(adapters, key=lambda nc: nc[1])
        share = count / total
        if share >= self.merge_threshold:
            return self._decide("merge", name, f"share {share:.2f} >= {self.merge_threshold}")
        return None

    def _decide(self, action: str, adapter: str, why: str) -> MergeDecision:
        self._since_switch = 0
        self.decisions[action] += 1
        self.last = MergeDecision(action, adapter, f"{why} of the tokens in the last {self.window} steps")
        return self.last
