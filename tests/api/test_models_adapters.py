"""How a request's `model` names an adapter: "<adapter>", "<base>:<adapter>", or the base id."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_serve.api.errors import APIError
from lora_serve.api.models import ModelRegistry


class FakeAdapters:
    """The AdapterRegistry methods ModelRegistry reads."""

    def __init__(self, *names: str) -> None:
        self.records = [SimpleNamespace(name=n, path=Path(f"/adapters/{n}"), source=None, created=1) for n in names]

    def contains(self, name: str) -> bool:
        return any(r.name == name for r in self.records)

    def get(self, name: str) -> SimpleNamespace:
        return next(r for r in self.records if r.name == name)

    def list(self) -> list:
        return self.records


def _registry(base: str = "base") -> ModelRegistry:
    return ModelRegistry(base, Path("/models/base"), 256, FakeAdapters("b", "a"))


@pytest.mark.parametrize(
    ("model", "lora_name"),
    [(None, None), ("base", None), ("a", "a"), ("base:a", "a"), ("base:b", "b")],
)
def test_resolve(model: str | None, lora_name: str | None) -> None:
    assert _registry().resolve(model) == lora_name


@pytest.mark.parametrize("model", ["nope", "other:a", "base:nope", "a:b", "base:", ":a", "base:base", "a:base"])
def test_resolve_unknown_is_404(model: str) -> None:
    with pytest.raises(APIError) as info:
        _registry().resolve(model)
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")


def test_base_id_with_a_colon() -> None:
    models = _registry("org:model")
    assert models.resolve("org:model") is None
    assert models.resolve("org:model:a") == "a"


def test_model_list_has_base_then_adapters_by_name() -> None:
    cards = _registry().model_list().data
    assert [(c.id, c.parent, c.root) for c in cards] == [
        ("base", None, "/models/base"),
        ("a", "base", "/adapters/a"),
        ("b", "base", "/adapters/b"),
    ]


@pytest.mark.parametrize(("model", "card_id", "parent"), [("base", "base", None), ("a", "a", "base"), ("base:b", "b", "base")])
def test_card_of_any_spelling_is_the_listed_card(model: str, card_id: str, parent: str | None) -> None:
    models = _registry()
    card = models.card(model)
    assert (card.id, card.parent) == (card_id, parent)
    assert card in models.model_list().data


@pytest.mark.parametrize("model", ["nope", "base:nope", "other:a"])
def test_card_of_an_unknown_name_is_404(model: str) -> None:
    with pytest.raises(APIError) as info:
        _registry().card(model)
    assert (info.value.status, info.value.code) == (404, "model_not_found")
