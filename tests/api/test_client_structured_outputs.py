"""LangChain's structured outputs and tools, unmodified, against a live server on the embedded model and an
adapter of it: `with_structured_output` (json_schema and function_calling) returns the model's objects,
`bind_tools` returns valid tool calls, whole and streamed; LiteLLM passes tools and response_format through."""

from __future__ import annotations

import json
import os
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import EMBEDDED_ADAPTER
from tests.api.live_server import LiveServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list at import

langchain_openai = pytest.importorskip("langchain_openai")
litellm = pytest.importorskip("litellm")

MAX_TOKENS = 60


class Weather(BaseModel):
    """The weather to look up."""

    city: str = Field(max_length=16, description="The city")
    unit: Literal["celsius", "fahrenheit"]


class Clock(BaseModel):
    """The time to look up."""

    timezone: str = Field(max_length=16)


QUESTION = "What is the weather like in Paris?"


def _chat(live: LiveServer, model: str):
    return langchain_openai.ChatOpenAI(
        base_url=f"{live.base_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=MAX_TOKENS, max_retries=0
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("model", ["base", EMBEDDED_ADAPTER])
def test_with_structured_output_returns_the_object(embedded_server: LiveServer, method: str, model: str) -> None:
    chat = _chat(embedded_server, embedded_server.model if model == "base" else model)
    weather = chat.with_structured_output(Weather, method=method).invoke(QUESTION)
    assert isinstance(weather, Weather), weather
    assert len(weather.city) <= 16 and weather.unit in ("celsius", "fahrenheit")


def test_with_structured_output_of_a_json_schema_returns_a_dict(embedded_server: LiveServer) -> None:
    schema = {"title": "weather", "description": "The weather to look up", **Weather.model_json_schema()}
    answer = _chat(embedded_server, EMBEDDED_ADAPTER).with_structured_output(schema, method="json_schema").invoke(QUESTION)
    assert isinstance(answer, dict)
    jsonschema.validate(answer, Weather.model_json_schema())


@pytest.mark.parametrize("tool_choice", ["any", "Clock"])
def test_bind_tools_returns_valid_calls_whole_and_streamed(embedded_server: LiveServer, tool_choice: str) -> None:
    chat = _chat(embedded_server, EMBEDDED_ADAPTER).bind_tools([Weather, Clock], tool_choice=tool_choice, parallel_tool_calls=False)
    whole = chat.invoke(QUESTION)
    chunks = list(chat.stream(QUESTION))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed = streamed + chunk
    for message in (whole, streamed):
        assert len(message.tool_calls) == 1, message
        call = message.tool_calls[0]
        assert call["name"] in ("Weather", "Clock") if tool_choice == "any" else call["name"] == "Clock"
        model = Weather if call["name"] == "Weather" else Clock
        model.model_validate(call["args"])
        assert call["id"].startswith("call_")
    assert whole.response_metadata["finish_reason"] == "tool_calls"


def test_litellm_passes_tools_and_response_format_through(embedded_server: LiveServer) -> None:
    common = {"model": f"openai/{EMBEDDED_ADAPTER}", "api_base": f"{embedded_server.base_url}/v1", "api_key": "unused"}
    tool = {"type": "function", "function": {"name": "Weather", "parameters": Weather.model_json_schema()}}
    called = litellm.completion(
        **common,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[tool],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    calls = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and calls
    Weather.model_validate_json(calls[0].function.arguments)
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": Weather.model_json_schema(), "strict": True}}
    answered = litellm.completion(
        **common, messages=[{"role": "user", "content": QUESTION}], response_format=fmt, max_tokens=MAX_TOKENS, temperature=0
    )
    Weather.model_validate(json.loads(answered.choices[0].message.content))
