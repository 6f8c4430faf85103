"""`adapter_config.json` of a HF PEFT LoRA adapter, parsed and checked against the base model.

Which projections an adapter targets, and with which rank and scale, follows PEFT 0.21
(`peft/tuners/tuners_utils.py: check_target_module_exists`, `peft/utils/other.py:
get_pattern_key`, `peft/tuners/lora/layer.py: update_layer`). PEFT matches against module
names relative to the `*ForCausalLM`, e.g. `model.layers.3.self_attn.q_proj`.

DoRA (`use_dora`) is supported (dora.py). Fields that change the forward pass in ways lora-serve
does not implement (extra trained modules, LoRA bias, QALoRA, ...) are refused with `UnsupportedAdapterError` naming the
field; training-only fields (dropout, init schemes that leave the base untouched) are ignored.
The file is untrusted: its size and nesting are bounded before it is used, every list and
pattern object to max_entries before any regex is compiled, and regexes run on RE2 (patterns.py).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.arch import ModelArch
from .errors import InvalidAdapterError, UnsupportedAdapterError
from .files import Roots, read_bytes
from .patterns import DEFAULT_LAYER_INDEX, compile_pattern, layer_index_regex, pattern_key_regex

# The seven projections of a Llama decoder layer and the submodule that holds each.
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
UNSUPPORTED_TARGETS = ("model.embed_tokens", "lm_head")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear but the output layer
MAX_CONFIG_BYTES = 1 << 20
MIN_MAX_ENTRIES = 64  # see max_entries

# Truthy values of these fields change the adapter's math (or need weights we do not load).
UNSUPPORTED_FIELDS = {
    "use_qalora": "QALoRA",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights values after which the adapter only works on a modified base model.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def module_path(layer: int, module: str) -> str:
    """The name PEFT matches target_modules and patterns against."""
    return f"model.layers.{layer}.{PROJECTIONS[module]}.{module}"


def max_entries(arch: ModelArch) -> int:
    """Most entries in any list or pattern object of adapter_config.json (target_modules, rank_pattern, ...):
    one per projection of the base (a name or pattern each), at least MIN_MAX_ENTRIES. Checked before any
    regex is compiled, so a config cannot buy CPU with thousands of patterns."""
    return max(MIN_MAX_ENTRIES, len(PROJECTIONS) * arch.num_layers)


@dataclass(frozen=True)
class LoRAAdapterConfig:
    r: int
    """Default rank of every targeted projection."""
    lora_alpha: float
    """Default alpha; scale = alpha / r, or alpha / sqrt(r) with use_rslora."""
    target_modules: tuple[str, ...] | str
    """Module names or name suffixes (PEFT: exact name or endswith '.' + entry), or one regex PEFT
    full-matches against the module name. 'all-linear' is stored as the seven projections."""
    use_rslora: bool = False
    use_dora: bool = False
    """DoRA: every targeted projection also has a magnitude vector (lora_model.py, dora.py)."""
    rank_pattern: tuple[tuple[str, int], ...] = ()
    """(pattern, rank) in file order: PEFT takes the first pattern that matches."""
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None
    _regexes: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Every regex the matching uses, as matched (PEFT's wrapping included) -> its RE2 program."""

    def __post_init__(self) -> None:
        # Compiled once here (InvalidAdapterError naming the field for one RE2 refuses), not per match.
        wanted = [("layers_pattern", DEFAULT_LAYER_INDEX, DEFAULT_LAYER_INDEX)]
        wanted += [("layers_pattern", p, layer_index_regex(p)) for p in self.layers_pattern or ()]
        for param in ("target_modules", "exclude_modules"):
            value = getattr(self, param)
            if isinstance(value, str):
                wanted.append((param, value, value))
        wanted += [("rank_pattern", p, pattern_key_regex(p)) for p, _ in self.rank_pattern]
        wanted += [("alpha_pattern", p, pattern_key_regex(p)) for p, _ in self.alpha_pattern]
        for param, pattern, wrapped in wanted:
            if wrapped not in self._regexes:
                self._regexes[wrapped] = compile_pattern(pattern, param, wrapped)

    @classmethod
    def from_file(cls, path: Path, arch: ModelArch, max_rank: int, roots: Roots = None) -> LoRAAdapterConfig:
        """roots: directories the file must lie in (files.py); None: anywhere."""
        path = Path(path)
        if not path.is_file():
            raise InvalidAdapterError(f"{path.name} not found in the adapter folder", param="adapter_config")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidAdapterError(f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes", param="adapter_config")
        raw = read_bytes(path, roots)  # outside the try: a ForbiddenPathError is a ValueError too
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise InvalidAdapterError(f"{path.name} is not valid JSON: {e}", param="adapter_config") from None
        except RecursionError:  # json's C parser recurses once per [ or {: deeper than Python's stack allows
            raise InvalidAdapterError(f"{path.name} is nested too deeply", param="adapter_config") from None
        return cls.from_dict(data, arch, max_rank)

    @classmethod
    def from_dict(cls, d: Any, arch: ModelArch, max_rank: int) -> LoRAAdapterConfig:
        if not isinstance(d, dict):
            raise InvalidAdapterError("adapter_config.json must hold a JSON object", param="adapter_config")
        _check_supported(d)
        for key in ("r", "lora_alpha", "target_modules"):
            if d.get(key) is None:
                raise InvalidAdapterError(f"adapter_config.json has no {key!r}", param=key)
        limit = max_entries(arch)
        r = _parse_rank(d["r"], max_rank, "r")
        lora_alpha = _parse_alpha(d["lora_alpha"], "lora_alpha")
        target_modules = _parse_targets(d["target_modules"], limit)
        layers_to_transform = _parse_layers(d.get("layers_to_transform"), arch.num_layers, limit)
        layers_pattern = _parse_str_list(d.get("layers_pattern"), "layers_pattern", limit) or None
        if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern is not None):
            field = "layers_to_transform" if layers_to_transform is not None else "layers_pattern"
            raise InvalidAdapterError(f"{field} cannot be used when target_modules is a regex", param=field)
        if layers_pattern is not None and layers_to_transform is None:
            raise InvalidAdapterError("layers_pattern needs layers_to_transform", param="layers_pattern")
        base_name = d.get("base_model_name_or_path")
        config = cls(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=_parse_flag(d.get("use_dora"), "use_dora"),
            rank_pattern=_parse_pattern(d, "rank_pattern", limit, lambda v: _parse_rank(v, max_rank, "rank_pattern")),
            alpha_pattern=_parse_pattern(d, "alpha_pattern", limit, lambda v: _parse_alpha(v, "alpha_pattern")),
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            exclude_modules=_parse_names_or_regex(d.get("exclude_modules"), "exclude_modules", limit),
            base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        )
        config._check_unsupported_targets()
        if not config.targets(arch.num_layers):
            msg = f"target_modules {reprlib.repr(d['target_modules'])} matches none of the base model's projections"
            raise InvalidAdapterError(msg, param="target_modules")
        return config

    def targets(self, num_layers: int) -> dict[tuple[int, str], tuple[int, float]]:
        """(layer, projection) -> (rank, scale) for every projection the adapter modifies."""
        out = {}
        for layer in range(num_layers):
            for module in PROJECTIONS:
                key = module_path(layer, module)
                if not self._is_target(key):
                    continue
                r = self._pattern_value(self.rank_pattern, key, self.r)
                alpha = self._pattern_value(self.alpha_pattern, key, self.lora_alpha)
                out[(layer, module)] = (r, alpha / math.sqrt(r) if self.use_rslora else alpha / r)
        return out

    def _is_target(self, key: str) -> bool:
        # Mirrors peft check_target_module_exists (modules_to_save and target_parameters are refused in from_dict).
        if isinstance(self.exclude_modules, str):
            if self._regexes[self.exclude_modules].fullmatch(key):
                return False
        elif self.exclude_modules and _matches_name(self.exclude_modules, key):
            return False
        if isinstance(self.target_modules, str):
            return self._regexes[self.target_modules].fullmatch(key) is not None
        if key in self.target_modules:
            return True  # an exact name bypasses layers_to_transform, as in PEFT
        if not _matches_name(self.target_modules, key):
            return False
        if self.layers_to_transform is None:
            return True
        return self._layer_index(key) in self.layers_to_transform

    def _pattern_value(self, pattern: tuple[tuple[str, Any], ...], key: str, default: Any) -> Any:
        # peft get_pattern_key: the first pattern p with re.match(r"(.*\.)?(p)$", key) wins.
        return next((v for p, v in pattern if self._regexes[pattern_key_regex(p)].match(key)), default)

    def _layer_index(self, key: str) -> int | None:
        # Lazy .*? takes the first numbered segment, as PEFT does.
        regexes = [layer_index_regex(p) for p in self.layers_pattern or ()] or [DEFAULT_LAYER_INDEX]
        match = next((m for r in regexes if (m := self._regexes[r].match(key))), None)
        return int(match["idx"]) if match else None

    def _check_unsupported_targets(self) -> None:
        for key in UNSUPPORTED_TARGETS:
            if self._is_target(key):
                msg = f"target_modules covers {key}; only the attention and MLP projections are supported"
                raise UnsupportedAdapterError(msg, param="target_modules")


def _check_supported(d: dict[str, Any]) -> None:
    peft_type = d.get("peft_type") or "LORA"
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported, only LORA", param="peft_type")
    for key, what in UNSUPPORTED_FIELDS.items():
        if d.get(key):
            raise UnsupportedAdapterError(f"{what} ({key}={d[key]!r}) is not supported", param=key)
    bias = d.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(f"bias={bias!r} is not supported; only 'none' is", param="bias")
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} changes the base weights; convert the adapter to plain LoRA "
            "(PEFT save_pretrained(path_initial_model_for_weight_conversion=...)) first",
            param="init_lora_weights",
        )


def _parse_targets(value: Any, limit: int) -> tuple[str, ...] | str:
    if value == ALL_LINEAR:
        return tuple(PROJECTIONS)
    names = _parse_names_or_regex(value, "target_modules", limit)
    assert names is not None  # from_dict refused a missing or null target_modules
    for name in () if isinstance(names, str) else names:
        last = name.rsplit(".", 1)[-1]
        if last in ("embed_tokens", "lm_head"):
            msg = f"target module {name!r} is not supported; only the attention and MLP projections are"
            raise UnsupportedAdapterError(msg, param="target_modules")
        if last not in PROJECTIONS:
            msg = f"unknown target module {name!r}; expected one of {', '.join(PROJECTIONS)}"
            raise InvalidAdapterError(msg, param="target_modules")
    return names


def _parse_flag(value: Any, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidAdapterError(f"{param} must be true or false, got {reprlib.repr(value)}", param=param)
    return value


def _parse_rank(value: Any, max_rank: int, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidAdapterError(f"{param} must be a positive integer, got {reprlib.repr(value)}", param=param)
    if value > max_rank:
        raise InvalidAdapterError(f"{param}={value} is larger than the server's max_lora_rank={max_rank}", param=param)
    return value


def _parse_alpha(value: Any, param: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidAdapterError(f"{param} must be a finite number, got {reprlib.repr(value)}", param=param)
    return value


def _check_count(value: list | dict, param: str, limit: int) -> None:
    if len(value) > limit:
        msg = f"{param} has {len(value)} entries; the limit for this base model is {limit}"
        raise InvalidAdapterError(msg, param=param)


def _parse_pattern(d: dict[str, Any], param: str, limit: int, parse_value) -> tuple[tuple[str, Any], ...]:
    """Compiled with the config (__post_init__), after this count check."""
    value = d.get(param)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidAdapterError(f"{param} must be an object of pattern -> value", param=param)
    _check_count(value, param, limit)
    return tuple((k, parse_value(v)) for k, v in value.items())


def _parse_layers(value: Any, num_layers: int, limit: int) -> tuple[int, ...] | None:
    if value is None or value == []:  # PEFT: an empty list means every layer
        return None
    layers = [value] if isinstance(value, int) else value
    if isinstance(layers, list):
        _check_count(layers, "layers_to_transform", limit)
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        msg = f"layers_to_transform must be an int or a list of ints, got {reprlib.repr(value)}"
        raise InvalidAdapterError(msg, param="layers_to_transform")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        msg = f"layers_to_transform {bad} out of range: the base model has {num_layers} layers"
        raise InvalidAdapterError(msg, param="layers_to_transform")
    return tuple(layers)


def _parse_names_or_regex(value: Any, param: str, limit: int) -> tuple[str, ...] | str | None:
    """A regex string (PEFT full-matches it; compiled with the config) or a list of module names."""
    if isinstance(value, str):
        return value
    return _parse_str_list(value, param, limit)


def _parse_str_list(value: Any, param: str, limit: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        _check_count(value, param, limit)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        msg = f"{param} must be a string or a list of strings, got {reprlib.repr(value)}"
        raise InvalidAdapterError(msg, param=param)
    return tuple(value)


def _matches_name(names: tuple[str, ...], key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)
