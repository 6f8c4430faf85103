"""Weighted composition of resident adapters, unmerged: what a request names, and what its rows hold.

A request may name several adapters with a weight each; each of its rows then gets the delta

    sum_i w_i · s_i · B_i A_i          (s_i: adapter i's own alpha/r, or alpha/sqrt(r) for rsLoRA)

which is the adapter PEFT's `add_weighted_adapter(combination_type="cat")` builds, without building
it: each (adapter, weight) is a virtual slot (residency.py) viewing the adapter's resident tensors
with its scales times w, and each component adds one segment over the composition's rows (as the
merged adapter's negation already covers rows of other segments). One entry is a per-request scale
(llama.cpp's `lora: [{id, scale}]`); one entry at weight 1.0 is the adapter itself.

Each component is a distinct adapter for max_loras and the device budget (virtual slots hold no
memory of their own), so a composition runs only when all of its adapters fit at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from .registry import AdapterRecord

MAX_COMPONENTS = 8  # adapters one request may compose: each adds a pass over its rows
COMPOSED_LABEL = "+composed"  # composed requests' metrics label: no adapter name holds '+' (registry.py)


class AdapterLease(Protocol):
    """A hold on one adapter's CPU copy (catalog.AdapterLease, which imports residency, which imports this)."""

    @property
    def record(self) -> AdapterRecord: ...  # the registration it was opened on

    def close(self) -> None: ...


@dataclass(frozen=True)
class Composition:
    """Adapters with a weight each, sorted by name (the order of the sum changes nothing but rounding)."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> Composition:
        """Checked: 1 to MAX_COMPONENTS entries, finite weights of any sign. ValueError otherwise."""
        if not 1 <= len(weights) <= MAX_COMPONENTS:
            raise ValueError(f"adapters must name 1 to {MAX_COMPONENTS} adapters; it names {len(weights)}")
        for name, weight in weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"adapters' keys are adapter names; {name!r} is not")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"adapter {name!r} has weight {weight!r}; weights are finite numbers")
        return cls(tuple(sorted((name, float(weight)) for name, weight in weights.items())))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    @property
    def plain_name(self) -> str | None:
        """The adapter, when this is one adapter at weight 1.0: the same as naming it in `model`."""
        if len(self.weights) == 1 and self.weights[0][1] == 1.0:
            return self.weights[0][0]
        return None

    @property
    def label(self) -> str:
        """For logs: 'a*0.7+b*0.5'."""
        return "+".join(f"{name}*{weight!r}" for name, weight in self.weights)


@dataclass(eq=False)
class ComposedLeases:
    """A composed request's hold on its adapters: a lease on each CPU copy, in composition order,
    closed when it ends; and, while it runs, the slot each component's segment reads."""

    composition: Composition
    leases: Sequence[AdapterLease]
    slots: list[int] | None = None  # per component: its virtual slot, pinned while the sequence runs

    @cached_property
    def identity(self) -> str:
        """What computes its K/V (the prefix cache's root, engine/block_hash.py): each component's content
        identity (LoRAModel.identity, never its name) and weight, in an order names do not change."""
        parts = sorted([lease.record.identity, weight] for lease, (_, weight) in zip(self.leases, self.composition.weights))
        return hashlib.sha256(json.dumps(["composed", parts]).encode()).hexdigest()

    def close(self) -> None:
        for lease in self.leases:
            lease.close()


def open_composed(composition: Composition, open_lease: Callable[[str], AdapterLease]) -> ComposedLeases:
    """A lease on each component (open_lease: AdapterCatalog.open); those opened are closed if one fails."""
    leases: list[AdapterLease] = []
    try:
        for name in composition.names:
            leases.append(open_lease(name))
    except BaseException:
        for lease in leases:
            lease.close()
        raise
    return ComposedLeases(composition, leases)
