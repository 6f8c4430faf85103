"""What the engine hands back for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first
    rank: int | None = None  # of a prompt token: 1 + the number of tokens the model found more likely


@dataclass
class RequestOutput:
    """A delta: the tokens and text produced since the previous output of this request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With SamplingParams.prompt_logprobs, once, in the first delta that has an output token: one entry
    per prompt token, None for the first (no position precedes it)."""
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (OpenAI's cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
