"""Request bodies of the OpenAI chat and completions APIs (the subset we serve; responses.py: what they get back).

Field-level checks live here so that pydantic names the offending param; the server's
configurable limits (limits.py) and checks that need the tokenizer happen in prepared_request.py.
The fields declared here, in structured_outputs.py and in tools.py are honoured; the OpenAI fields with nothing to act on are no-ops or
refused (field_policy.py); any other field is refused with OpenAI's "Unrecognized request
argument supplied" (errors.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from lora_serve.api.field_policy import ChatFieldPolicy, CompletionFieldPolicy, MessageFieldPolicy
from lora_serve.api.protocol_base import RequestBody
from lora_serve.api.structured_outputs import StructuredOutputFields
from lora_serve.api.tool_prompt import call_arguments
from lora_serve.api.tools import ToolCall, ToolFields
from lora_serve.engine.sampling_params import MAX_LOGIT_BIAS, MAX_PENALTY, SEED_MAX, SEED_MIN
from lora_serve.lora.composition import MAX_COMPONENTS

# Pydantic builds a model per message and per content part (~10-30 us each), so a 4 MiB body of
# empty ones would hold the event loop for seconds: both are counted on the raw JSON first.
MAX_MESSAGES = 2048  # OpenAI's own limit on `messages`
MAX_CONTENT_PARTS = 2048  # text parts in all messages together
TOKEN_ID = re.compile(r"0|[1-9][0-9]*")  # a logit_bias key: one spelling per token id


class StreamOptions(RequestBody):
    include_usage: bool = False
    """Send a last chunk with `usage` and no choices."""

    continuous_usage_stats: bool = False
    """Extension (vLLM): with include_usage, every chunk also carries the usage so far (load testers such as
    guidellm ask for it)."""

    include_obfuscation: bool | None = None
    """No-op: OpenAI pads stream chunks against a side channel of its network; here there is none to pad."""


class SamplingRequest(StructuredOutputFields):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    """Base model id or adapter name (None: the base model)."""

    adapters: dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=MAX_COMPONENTS
    )
    """Extension: adapter name -> weight, 1 to 8 of them, weights finite and of any sign: each row gets the sum
    of weight x each adapter's delta, computed in the batch without merging (one entry: a per-request scale).
    `model` must then be the base model's id."""

    max_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate (None: up to max_model_len)."""

    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    """0 means greedy."""

    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)
    """Extension: keep the k most likely tokens (0 or -1: no limit)."""

    n: int = Field(1, ge=1)
    """Choices to generate for each prompt (at most the server's max_n); each is its own sequence, with seed + j when seeded."""

    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    """A 64-bit signed integer, as in OpenAI's API and vLLM."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    """Subtracted from the logit of every token already in the output."""

    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    """Subtracted from a token's logit once per time it is already in the output."""

    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit (each id in the vocabulary, at most max_logit_bias)."""

    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Extension (vLLM): tokens of the prompt or the output have a positive logit divided by it, a negative one multiplied."""

    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    """Extension (vLLM): keep only tokens at least min_p times as likely as the most likely one."""

    min_tokens: int = Field(0, ge=0)
    """Extension (vLLM): no EOS, stop_token_ids or stop strings end the output before it has this many tokens."""

    stop_token_ids: list[int] = Field(default_factory=list)
    """Extension (vLLM): token ids that end generation (at most max_stop_token_ids, each in the vocabulary)."""

    ignore_eos: bool = False
    """Extension (vLLM): keep generating past the end-of-sequence token."""

    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    """Extension (vLLM): the response's prompt_logprobs gives each prompt token's logprob, rank and this many
    top alternatives (the first token: null). Not with stream, as in vLLM."""

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f'keys are token ids written in decimal, like "50256"; {key!r} is not')
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases lie in [-100, 100]; token {key} has {bias}")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs is not available with stream (as in vLLM)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}


class TextPart(RequestBody):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None
    """No-op: a caching hint (field_policy.py)."""


class ChatMessage(RequestBody, MessageFieldPolicy):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    """A tool message: the id of the call it answers."""

    tool_calls: list[ToolCall] | None = None
    """An assistant message: the calls it made (rendered by tool_prompt.py)."""

    @property
    def num_chars(self) -> int:
        """Characters of text this message brings to the prompt, before the chat template."""
        content = self.content or ""
        text = len(content) if isinstance(content, str) else sum(len(part.text) for part in content)
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        return text + len(self.name or "") + len(self.tool_call_id or "") + calls

    def for_template(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": call_arguments(c)}}
                for c in self.tool_calls
            ]
        return message


class ChatMessages(RequestBody):
    """A conversation, counted on the raw JSON before pydantic builds its models."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    @field_validator("messages", mode="before")
    @classmethod
    def _count_before_parsing(cls, messages: Any) -> Any:
        if not isinstance(messages, list):
            return messages
        if len(messages) > MAX_MESSAGES:
            raise ValueError(f"{len(messages)} messages given; at most {MAX_MESSAGES} are accepted")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"{parts} content parts given; at most {MAX_CONTENT_PARTS} in all messages together")
        return messages


class ChatCompletionRequest(SamplingRequest, ChatMessages, ToolFields, ChatFieldPolicy):
    max_completion_tokens: int | None = Field(None, ge=1)
    """Newer name of max_tokens; wins when both are given."""

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def max_tokens_param(self) -> tuple[int | None, str]:
        """The requested completion length and the name of the field that gave it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(SamplingRequest, CompletionFieldPolicy):
    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, token ids, or a list of texts or of token-id lists: n choices for each prompt, in order."""

    max_tokens: int | None = Field(None, ge=0)
    """Most tokens to generate (None: up to max_model_len); 0 only with echo: the prompt alone (vLLM)."""

    logprobs: int | None = Field(None, ge=0, le=5)
    """Return the sampled token's logprob and the top N alternatives (with echo, the prompt's tokens' too)."""

    echo: bool = False
    """Each choice's text starts with its prompt (and its logprobs with the prompt tokens': the first is null)."""

    best_of: int | None = None
    """Accepted only equal to n (vLLM has dropped it): the server returns every choice it generates."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind_of_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            kinds = {_prompt_kind(p) for p in prompt}
            if len(kinds) > 1 or None in kinds:
                raise ValueError("a prompt list holds strings, token ids, or lists of token ids: one kind, not a mix")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")  # declared before best_of; absent if it failed its own checks
        if best_of is not None and n is not None and best_of != n:
            raise ValueError(f"best_of must equal n ({n}) or be omitted: every choice generated is returned (vLLM has dropped best_of)")
        return best_of

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


def _prompt_kind(item: Any) -> str | None:
    if isinstance(item, str):
        return "text"
    if isinstance(item, int) and not isinstance(item, bool):
        return "token id"
    return "token ids" if isinstance(item, list) else None
