"""Adapter configs: VeraConfig and PveraConfig, with PEFT's field names and defaults.

Validated at construction (``raise``, never ``assert``); ``to_dict`` / ``from_dict`` read and write the
adapter_config.json layout that PEFT uses, versioned so that old files keep loading.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

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

# PEFT's task types, and the heads each one trains as modules_to_save (PEFT's PeftModelFor<Task> adds them).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_MODULES_TO_SAVE: dict[str, list[str]] = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                                              "QUESTION_ANS": ["qa_outputs"]}


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
    # PEFT's PeftConfig fields, keyword-only (they follow the method's own fields): kept and written to
    # adapter_config.json as PEFT writes them. ``task_type`` adds its heads to ``modules_to_save`` as PEFT does.
    task_type: Optional[str] = dataclasses.field(default=None, kw_only=True)
    inference_mode: bool = dataclasses.field(default=False, kw_only=True)
    base_model_name_or_path: Optional[str] = dataclasses.field(default=None, kw_only=True)
    revision: Optional[str] = dataclasses.field(default=None, kw_only=True)
    auto_mapping: Optional[dict] = dataclasses.field(default=None, kw_only=True)
    peft_version: Optional[str] = dataclasses.field(default=None, kw_only=True)

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
        _check(isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool)
               and math.isfinite(self.d_initial), "d_initial", self.d_initial, "expected a finite float, e.g. 0.1")
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
        self._check_peft_fields()

    def _check_peft_fields(self) -> None:
        tt = getattr(self.task_type, "value", self.task_type)  # PEFT's TaskType enum reads as its value
        _check(tt is None or tt in TASK_TYPES, "task_type", self.task_type,
               f"expected None or one of {', '.join(map(repr, TASK_TYPES))}")
        self.task_type = tt
        _check(isinstance(self.inference_mode, bool), "inference_mode", self.inference_mode, "expected True or False")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), name, value, "expected None or a string")
        _check(self.auto_mapping is None or isinstance(self.auto_mapping, dict), "auto_mapping", self.auto_mapping,
               "expected None or a dict such as {'base_model_class': 'BertModel', 'parent_library': ...}")
        heads = [h for h in TASK_MODULES_TO_SAVE.get(tt or "", []) if h not in (self.modules_to_save or [])]
        if heads:  # as PEFT's PeftModelForSequenceClassification (...) extends the config
            self.modules_to_save = [*(self.modules_to_save or []), *heads]

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

# Keys of adapter_config.json that are no config field; accepted (and ignored) on load.
_PEFT_ONLY_KEYS = {"peft_type", "target_parameters", "exclude_modules", "vera_fx_version", "runtime_config"}


def config_to_dict(config: AdapterConfig) -> dict[str, Any]:
    """The JSON-ready dict of a config, in adapter_config.json's layout (PEFT's keys plus our version)."""
    out: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["peft_type"] = config.peft_type
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


def as_config(config: Any) -> AdapterConfig:
    """``config`` as a vera_fx config: ours as it is; a PEFT ``VeraConfig`` / ``PveraConfig`` (or any object
    with PEFT's ``peft_type`` and ``to_dict()``) read by its fields. Anything else raises TypeError naming it."""
    if isinstance(config, (VeraConfig, PveraConfig)):
        return config
    name = type(config).__name__
    peft_type = getattr(config, "peft_type", None)
    peft_type = getattr(peft_type, "value", peft_type)
    to_dict = getattr(config, "to_dict", None)
    if isinstance(peft_type, str) and callable(to_dict):
        if peft_type not in _CONFIG_TYPES:
            raise TypeError(f"config is a {type(config).__module__}.{name} (peft_type={peft_type!r}): vera_fx adds "
                            "VeRA and PVeRA adapters only; pass vera_fx.VeraConfig(...) / vera_fx.PveraConfig(...) "
                            "or PEFT's VeraConfig / PveraConfig")
        data = {k: _plain(v) for k, v in to_dict().items()}
        data["peft_type"] = peft_type
        try:
            return config_from_dict(data)
        except (ValueError, TypeError) as e:
            raise type(e)(f"config {type(config).__module__}.{name} cannot be read as vera_fx's {peft_type} config: "
                          f"{e}") from e
    raise TypeError(f"config must be a vera_fx.VeraConfig or vera_fx.PveraConfig (or PEFT's VeraConfig / "
                    f"PveraConfig), got {type(config).__module__}.{name}")


def _plain(value: Any) -> Any:
    """A PEFT config value as JSON-like data: enums as their values, sets as sorted lists."""
    value = getattr(value, "value", value) if not isinstance(value, (bool, int, float, str)) else value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value
