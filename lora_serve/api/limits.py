"""The server's per-request limits (ServerConfig) checked before a request reaches the engine.

Each refusal is a 400 naming the param at fault, with code "limit_exceeded", so a client can
tell a server policy from a malformed request. Context-length checks stay in generation.py.
"""

from __future__ import annotations

from lora_serve.api.errors import APIError, invalid_param
from lora_serve.config import ServerConfig

LIMIT_EXCEEDED = "limit_exceeded"


def _over(param: str, message: str) -> APIError:
    return invalid_param(param, message, code=LIMIT_EXCEEDED)


def check_limits(
    config: ServerConfig,
    *,
    num_prompt: int,
    prompt_param: str,
    max_tokens: int | None,
    max_tokens_param: str,
    stops: list[str],
    top_logprobs: int,
    top_logprobs_param: str,
) -> None:
    c = config
    if c.max_prompt_tokens is not None and num_prompt > c.max_prompt_tokens:
        raise _over(prompt_param, f"the {prompt_param} has {num_prompt} tokens; the limit is {c.max_prompt_tokens}")
    if c.max_tokens_limit is not None and max_tokens is not None and max_tokens > c.max_tokens_limit:
        raise _over(max_tokens_param, f"{max_tokens_param} is {max_tokens}; the limit is {c.max_tokens_limit}")
    if len(stops) > c.max_stop_strings:
        raise _over("stop", f"{len(stops)} stop strings given; the limit is {c.max_stop_strings}")
    longest = max((len(s) for s in stops), default=0)
    if longest > c.max_stop_chars:
        raise _over("stop", f"a stop string has {longest} characters; the limit is {c.max_stop_chars}")
    if top_logprobs > c.max_top_logprobs:
        raise _over(top_logprobs_param, f"{top_logprobs_param} is {top_logprobs}; the limit is {c.max_top_logprobs}")
