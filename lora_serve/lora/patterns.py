"""Regexes from untrusted adapter configs, compiled with RE2 (the google-re2 package).

RE2 matches in time linear in the text whatever the pattern, so a pattern cannot backtrack
catastrophically and matching needs no timer (a timer refused valid patterns on a busy
machine). What RE2 cannot run in linear time (backreferences, lookaround) it does not
compile, and the adapter is refused with a 400 naming the field and the pattern. PEFT
matches with Python's `re` against module names like `model.layers.3.self_attn.q_proj`;
on such names (no newlines, ASCII) RE2 gives the same matches.

Bounds, so that an upload cannot buy CPU with a config: MAX_PATTERN_CHARS per pattern,
RE2_MAX_MEM per compiled pattern, and the number of patterns (see peft_config.max_entries).
"""

from __future__ import annotations

import reprlib
from typing import Any

import re2

from .errors import InvalidAdapterError

MAX_PATTERN_CHARS = 512  # a full module name is ~40 characters; an alternation over 80 layers ~270
RE2_MAX_MEM = 1 << 20  # bytes per compiled pattern (RE2's default is 8 MiB); past it compiling fails
# PEFT without layers_pattern: the layer index is the first numbered segment (lazy .*?, as in PEFT).
DEFAULT_LAYER_INDEX = r".*?\.[^.]*\.(?P<idx>\d+)\."


def pattern_key_regex(pattern: str) -> str:
    """How PEFT (get_pattern_key) matches a rank_pattern or alpha_pattern key: re.match of this."""
    return rf"(.*\.)?({pattern})$"


def layer_index_regex(layers_pattern: str) -> str:
    """How PEFT finds the layer index with a layers_pattern: re.match of this, group idx."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def compile_pattern(pattern: Any, param: str, wrapped: str | None = None) -> re2._Regexp:
    """RE2-compile `wrapped` (default: the pattern itself); InvalidAdapterError naming `pattern`."""
    if not isinstance(pattern, str):
        raise InvalidAdapterError(f"{param} patterns must be strings, got {reprlib.repr(pattern)}", param=param)
    if len(pattern) > MAX_PATTERN_CHARS:
        msg = f"{param}: a pattern has {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}"
        raise InvalidAdapterError(msg, param=param)
    options = re2.Options()
    options.log_errors = False  # a refused upload is answered with a 400, not logged by RE2 on stderr
    options.max_mem = RE2_MAX_MEM
    try:
        return re2.compile(wrapped or pattern, options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        msg = f"{param}: {pattern!r} is not a regex lora-serve can match ({why}); backreferences and lookaround are not supported"
        raise InvalidAdapterError(msg, param=param) from None
