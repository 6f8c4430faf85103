"""The official openai client's `chat.completions.parse(response_format=Model)`, unmodified, against a live
server on the embedded model and an adapter of it: `.message.parsed` is an instance of the model.

What the client sends is its strict JSON schema of the model: `additionalProperties: false` on every
object, every property required, a nested model as `$defs` + `$ref`, an optional field as `anyOf` with
null; the server must constrain decoding to that schema for `parsed` to be built."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import EMBEDDED_ADAPTER
from tests.api.live_server import LiveServer

MAX_TOKENS = 120  # the fields are bounded so that an instance always fits


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)


class Trip(BaseModel):
    """A trip to plan."""

    destination: City
    days: int = Field(ge=1, le=30)
    season: Literal["spring", "summer", "autumn", "winter"]
    activities: list[str] = Field(max_length=3)
    budget_eur: int | None = None


QUESTION = "Plan a short trip to Paris."


@pytest.mark.parametrize("model", ["base", EMBEDDED_ADAPTER])
def test_parse_returns_an_instance_of_the_model(embedded_server: LiveServer, model: str) -> None:
    client = embedded_server.client()
    completion = client.chat.completions.parse(
        model=embedded_server.model if model == "base" else model,
        messages=[{"role": "user", "content": QUESTION}],
        response_format=Trip,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    trip = choice.message.parsed
    assert isinstance(trip, Trip), choice.message
    assert isinstance(trip.destination, City) and len(trip.destination.name) <= 16
    assert 1 <= trip.days <= 30 and len(trip.activities) <= 3
    assert trip == Trip.model_validate_json(choice.message.content or "")


def test_parse_with_n_parses_every_choice(embedded_server: LiveServer) -> None:
    completion = embedded_server.client().chat.completions.parse(
        model=EMBEDDED_ADAPTER,
        messages=[{"role": "user", "content": QUESTION}],
        response_format=Trip,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=0,
        n=3,
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert isinstance(choice.message.parsed, Trip), choice.message
