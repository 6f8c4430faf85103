"""How many tokens of a long prompt a step may prefill beside running decodes, from measured step times.

A step's time is every running stream's inter-token latency for that token, and a prefill chunk
lengthens it. A fixed chunk size (`long_prefill_token_threshold`) is right for one machine and one
load only: 16 tokens keep 16 streams within 2x on a 2-vCPU CPU, where a GPU prefills thousands in the
time of a decode step. So the engine times its steps, and the scheduler asks this pacer, each step:

- `is_long(n)`: would prefilling these n prompt tokens whole hold the streams for more than
  `LONG_PROMPT_STEPS` decode steps (and are they more than LONG_PROMPT_MIN_TOKENS)? Shorter prompts go
  whole, as before: their stall is one longer step, where a long prompt's lasts for as many steps as
  it has chunks, and sets the streams' p99.
- `allowance(num_decodes, num_long)`: the tokens of long prompts this step may prefill so that each
  of the `num_long` long prompts waiting for their first token adds `max_stall - 1` decode-only steps
  to it (never fewer than `MIN_CHUNK`, so a long prompt always advances). None: no limit (no stream is
  decoding). One long prompt arriving holds the step to `max_stall` decode steps; a queue of them
  gets a larger share: the streams' pace is bought with the waiting prompts' first tokens, and where
  several wait, one bound a step for all of them would make each wait the longer for the others (six
  1000-token prompts beside 4 streams on a 2-vCPU CPU: the last first token after 38 s at one 1.5x
  bound for all, against 13 s unpaced). The first in line takes the allowance, so they finish in turn.

The bound is aimed at, not guaranteed: steps vary (a 2-vCPU VM's decode steps by ~25% at p99), and
the decode-only estimate stays where it was while a long prompt prefills, as the streams' contexts
grow. `lora-serve bench prefill-stall` measures what the streams get.

Estimates (medians of the latest steps: one slow step, a collection or a neighbour's burst on a
VM, moves neither; recent, so they follow the streams' growing contexts and the prompt's own, whose
attention makes later chunks cost more per token):
- a decode-only step's time, from steps that ran decodes and no prompt tokens;
- a prompt token's time: a step's time past the decode-only estimate, over its prompt tokens (all of
  the step's time when nothing decoded, which counts the step's fixed cost too: an overestimate, so
  the chunks it gives are smaller, never larger).
Before a prompt token has been timed, every prompt past LONG_PROMPT_MIN_TOKENS counts as long.
"""

from __future__ import annotations

import statistics
from collections import deque

LONG_PROMPT_STEPS = 16  # a prompt whose whole prefill would take longer than this many decode steps is paced
LONG_PROMPT_MIN_TOKENS = 256  # shorter prompts never are: not worth the chunks, nor at the mercy of one slow step's estimate
MIN_CHUNK = 8  # tokens: the least a long prompt prefills in a step
DECODE_WINDOW = 16  # decode-only steps the decode estimate is the median of
TOKEN_WINDOW = 8  # steps with prompt tokens the per-token estimate is the median of


class PrefillPacer:
    def __init__(self, max_stall: float):
        """max_stall: the time a step of decodes and a long prompt's chunk is sized to take, as a multiple of
        a decode-only step (> 1)."""
        if not max_stall > 1.0:
            raise ValueError(f"max_stall must be > 1, got {max_stall}")
        self.max_stall = max_stall
        self._decode_steps: deque[float] = deque(maxlen=DECODE_WINDOW)  # seconds, steps of decodes only
        self._per_token: deque[float] = deque(maxlen=TOKEN_WINDOW)  # seconds, a prompt token's share of a step
        self.decode_step: float | None = None  # the median of _decode_steps
        self.per_token: float | None = None  # the median of _per_token

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float) -> None:
        """One step that ran `num_decodes` decodes and `num_prompt_tokens` prompt tokens in `seconds`."""
        if num_prompt_tokens == 0:
            if num_decodes > 0:
                self._decode_steps.append(seconds)
                self.decode_step = statistics.median(self._decode_steps)
            return
        if num_decodes > 0 and self.decode_step is None:
            return  # the decodes' share of this step is not known yet
        past_decodes = seconds - (self.decode_step or 0.0) if num_decodes > 0 else seconds
        self._per_token.append(max(past_decodes, 0.0) / num_prompt_tokens)
        self.per_token = statistics.median(self._per_token)

    def is_long(self, num_prompt_tokens: int) -> bool:
        if self.decode_step is None or num_prompt_tokens <= LONG_PROMPT_MIN_TOKENS:
            return False  # nothing to pace against yet, or short
        if self.per_token is None:
            return True
        return num_prompt_tokens * self.per_token > LONG_PROMPT_STEPS * self.decode_step

    def allowance(self, num_decodes: int, num_long: int = 1) -> int | None:
        """Tokens of long prompts a step running `num_decodes` decodes may prefill, `num_long` long prompts
        waiting for their first token (None: no limit)."""
        if num_decodes == 0 or self.decode_step is None:
            return None
        if self.per_token is None:
            return MIN_CHUNK  # time one chunk first
        if self.per_token == 0.0:
            return None
        stall = max(num_long, 1) * (self.max_stall - 1.0) * self.decode_step  # seconds of prefill past the decodes
        return max(MIN_CHUNK, int(stall / self.per_token))
