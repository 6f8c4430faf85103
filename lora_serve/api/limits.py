"""The server's per-request limits (ServerConfig) checked before a request reaches the engine.

Each refusal is a 400 naming the param at fault, with code "limit_exceeded", so a client can
tell a server policy from a malformed request. `check_limits` and `check_prompt_size` need no
tokenizer and run before the prompt is tokenized, so an oversized request costs no tokenizer
time; `check_prompt_tokens` runs after. Context-length checks stay in prepared_request.py.
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
    max_tokens: int | None,
    max_tokens_param: str,
    stops: list[str],
    num_stop_token_ids: int,
    num_logit_bias: int,
    top_logprobs: int,
    top_logprobs_param: str,
    n: int = 1,
    num_prompts: int = 1,
    prompt_logprobs: int | None = None,
) -> None:
    c = config
    if prompt_logprobs is not None and prompt_logprobs > c.max_top_logprobs:
        raise _over("prompt_logprobs", f"prompt_logprobs is {prompt_logprobs}; the limit is {c.max_top_logprobs}")
    if n > c.max_n:
        raise _over("n", f"n is {n}; the limit is {c.max_n}")
    if num_prompts > c.max_prompts:
        raise _over("prompt", f"{num_prompts} prompts given; the limit is {c.max_prompts}")
    if c.max_tokens_limit is not None and max_tokens is not None and max_tokens > c.max_tokens_limit:
        raise _over(max_tokens_param, f"{max_tokens_param} is {max_tokens}; the limit is {c.max_tokens_limit}")
    if len(stops) > c.max_stop_strings:
        raise _over("stop", f"{len(stops)} stop strings given; the limit is {c.max_stop_strings}")
    longest = max((len(s) for s in stops), default=0)
    if longest > c.max_stop_chars:
        raise _over("stop", f"a stop string has {longest} characters; the limit is {c.max_stop_chars}")
    if num_stop_token_ids > c.max_stop_token_ids:
        msg = f"{num_stop_token_ids} stop_token_ids given; the limit is {c.max_stop_token_ids}"
        raise _over("stop_token_ids", msg)
    if num_logit_bias > c.max_logit_bias:
        raise _over("logit_bias", f"{num_logit_bias} logit_bias entries given; the limit is {c.max_logit_bias}")
    if top_logprobs > c.max_top_logprobs:
        raise _over(top_logprobs_param, f"{top_logprobs_param} is {top_logprobs}; the limit is {c.max_top_logprobs}")


def prompt_token_limit(config: ServerConfig, max_model_len: int) -> int:
    """Most tokens a prompt may have."""
    return min(config.max_prompt_tokens or max_model_len, max_model_len)


def check_prompt_size(config: ServerConfig, max_model_len: int, *, prompt_param: str, num_chars: int, num_messages: int = 0) -> None:
    """Before tokenizing: text far longer than the token limit could fill, or more chat messages
    than it has tokens (every chat template gives each message at least one)."""
    tokens = prompt_token_limit(config, max_model_len)
    if num_messages > tokens:
        raise _over(prompt_param, f"{num_messages} messages given; the limit is {tokens}, the prompt's token limit")
    chars = tokens * config.max_prompt_chars_per_token
    if num_chars > chars:
        msg = (
            f"the {prompt_param} has {num_chars} characters; the limit is {chars} "
            f"({config.max_prompt_chars_per_token} per token of the prompt's {tokens}-token limit)"
        )
        raise _over(prompt_param, msg)


def check_prompt_tokens(config: ServerConfig, *, num_prompt: int, prompt_param: str) -> None:
    if config.max_prompt_tokens is not None and num_prompt > config.max_prompt_tokens:
        msg = f"the {prompt_param} has {num_prompt} tokens; the limit is {config.max_prompt_tokens}"
        raise _over(prompt_param, msg)
