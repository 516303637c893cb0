"""Adapter configs: VeraConfig and PveraConfig, with PEFT's field names and defaults.

Validated at construction (``raise``, never ``assert``); ``to_dict`` / ``from_dict`` read and write the
adapter_config.json layout that PEFT uses, versioned so that old files keep loading.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = ["VeraConfig", "PveraConfig", "AdapterConfig", "config_to_dict", "config_from_dict"]

CONFIG_VERSION = 1

# Default targets per `model.config.model_type` (the attention query and value projections).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "vit": ["query", "value"],
    "dinov2": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

_BIAS_MODES = ("none", "all")


def _check(cond: bool, field_name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


@dataclass
class _BaseConfig:
    """Fields shared by VeRA and PVeRA, in PEFT's order and with PEFT's defaults."""

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    # What the method calls its dropout field and its "only adapter biases" bias mode.
    _dropout_field = "vera_dropout"
    _method_bias = "vera_only"
    peft_type = "VERA"

    @property
    def dropout(self) -> float:
        return float(getattr(self, self._dropout_field))

    def __post_init__(self) -> None:
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
               "r", self.r, "expected a positive int, e.g. r=256")
        p = getattr(self, self._dropout_field)
        _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0,
               self._dropout_field, p, "expected a float in [0, 1)")
        modes = (*_BIAS_MODES, self._method_bias)
        _check(self.bias in modes, "bias", self.bias, f"allowed values are {', '.join(map(repr, modes))}")
        _check(isinstance(self.projection_prng_key, int) and not isinstance(self.projection_prng_key, bool),
               "projection_prng_key", self.projection_prng_key, "expected an int seed")
        _check(isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool),
               "d_initial", self.d_initial, "expected a float, e.g. 0.1")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "expected True or False")
        tm = self.target_modules
        if isinstance(tm, (set, tuple)):
            self.target_modules = tm = sorted(tm)
        if isinstance(tm, str):
            if tm.lower() != "all-linear":
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ValueError(f"target_modules={tm!r} is not a valid regular expression: {e}") from e
        elif tm is not None:
            _check(isinstance(tm, list) and len(tm) > 0 and all(isinstance(t, str) and t for t in tm),
                   "target_modules", tm,
                   "expected a non-empty list of module-name suffixes, a regex string, 'all-linear' or None")
        mts = self.modules_to_save
        if isinstance(mts, (set, tuple)):
            self.modules_to_save = mts = sorted(mts)
        _check(mts is None or (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)),
               "modules_to_save", mts, "expected None or a list of module names")
        ltt = self.layers_to_transform
        if isinstance(ltt, tuple):
            self.layers_to_transform = ltt = list(ltt)
        _check(ltt is None or (isinstance(ltt, int) and not isinstance(ltt, bool) and ltt >= 0)
               or (isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in ltt)),
               "layers_to_transform", ltt, "expected None, a layer index or a list of layer indices (ints >= 0)")
        lp = self.layers_pattern
        _check(lp is None or isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(s, str) for s in lp)),
               "layers_pattern", lp, "expected None, a name such as 'layers', or a list of names")
        if lp and ltt is None:
            raise ValueError(f"layers_pattern={lp!r} needs layers_to_transform: set the layer indices to adapt, "
                             "or drop layers_pattern")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@dataclass
class VeraConfig(_BaseConfig):
    """Configuration of a VeRA adapter (PEFT's VeraConfig fields and defaults)."""

    vera_dropout: float = 0.0


@dataclass
class PveraConfig(_BaseConfig):
    """Configuration of a PVeRA adapter (PEFT's PveraConfig fields and defaults)."""

    pvera_dropout: float = 0.0
    sample_at_inference: Union[bool, dict[str, bool]] = False
    generator_seed: Optional[int] = None

    _dropout_field = "pvera_dropout"
    _method_bias = "pvera_only"
    peft_type = "PVERA"

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.sample_at_inference
        _check(isinstance(s, bool) or (isinstance(s, dict) and all(isinstance(k, str) and isinstance(v, bool)
                                                                    for k, v in s.items())),
               "sample_at_inference", s, "expected True, False or a dict {site name: bool}")
        g = self.generator_seed
        _check(g is None or (isinstance(g, int) and not isinstance(g, bool)), "generator_seed", g,
               "expected None or an int seed")


AdapterConfig = Union[VeraConfig, PveraConfig]
_CONFIG_TYPES: dict[str, type] = {"VERA": VeraConfig, "PVERA": PveraConfig}

# Keys PEFT writes to adapter_config.json that carry no meaning for vera_fx; accepted and ignored on load.
_PEFT_ONLY_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_parameters", "exclude_modules", "vera_fx_version", "runtime_config",
}


def config_to_dict(config: AdapterConfig) -> dict[str, Any]:
    """The JSON-ready dict of a config, in adapter_config.json's layout (PEFT's keys plus our version)."""
    out: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["peft_type"] = config.peft_type
    out["task_type"] = None
    out["inference_mode"] = False
    out["vera_fx_version"] = CONFIG_VERSION
    return out


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build a config from adapter_config.json's dict; unknown fields raise ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type not in _CONFIG_TYPES:
        raise ValueError(f"peft_type={peft_type!r} is not supported: vera_fx reads 'VERA' and 'PVERA' adapters")
    version = data.get("vera_fx_version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(f"vera_fx_version={version!r} is newer than this vera_fx reads ({CONFIG_VERSION}): "
                         "upgrade vera_fx")
    cls = _CONFIG_TYPES[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    unsupported = {k: data[k] for k in ("exclude_modules", "target_parameters") if data.get(k)}
    if unsupported:
        raise ValueError(f"adapter config sets {unsupported}, which vera_fx does not support (it would select "
                         "other layers than PEFT); remove those fields or list the targets in target_modules")
    unknown = sorted(k for k in data if k not in names and k not in _PEFT_ONLY_KEYS)
    if unknown:
        raise ValueError(f"adapter config has unknown fields {unknown} for peft_type={peft_type!r}; "
                         f"known fields: {sorted(names)}")
    return cls(**{k: v for k, v in data.items() if k in names})
