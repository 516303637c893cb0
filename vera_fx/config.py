"""Adapter configs: VeraConfig and PveraConfig with PEFT's field names and defaults, validated at construction,
read from and written to adapter_config.json's layout (versioned)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

CONFIG_VERSION = 1

# Default targets per `model.config.model_type` (the attention query and value projections).
_QUERY_VALUE = {("q_proj", "v_proj"): ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
                                       "opt", "bart"),
                ("c_attn",): ("gpt2",),
                ("query", "value"): ("bert", "roberta", "xlm-roberta", "electra", "vit", "dinov2"),
                ("query_proj", "value_proj"): ("deberta-v2",),
                ("q", "v"): ("t5", "mt5")}
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {model: list(names) for names, types in _QUERY_VALUE.items()
                                                for model in types}

# PEFT's task types, and the heads each one trains as modules_to_save (PEFT's PeftModelFor<Task> adds them).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_MODULES_TO_SAVE: dict[str, list[str]] = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                                              "QUESTION_ANS": ["qa_outputs"]}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any, non_empty: bool = False) -> bool:
    return isinstance(v, list) and (len(v) > 0 or not non_empty) and all(isinstance(t, str) and t for t in v)


def _is_target_modules(tm: Any) -> bool:
    if isinstance(tm, str) and tm.lower() != "all-linear":
        try:
            re.compile(tm)
        except re.error as e:
            raise ValueError(f"target_modules={tm!r} is not a valid regular expression: {e}") from e
    return tm is None or isinstance(tm, str) or _is_str_list(tm, non_empty=True)


_Check = tuple[str, Callable[[Any], bool], str]
# One row per rule: (fields, valid?, what is expected), checked in this order at construction.
_CHECKS: tuple[_Check, ...] = (
    ("r", lambda v: _is_int(v) and v > 0, "expected a positive int, e.g. r=256"),
    ("projection_prng_key", _is_int, "expected an int seed"),
    ("d_initial", lambda v: _is_number(v) and math.isfinite(v), "expected a finite float, e.g. 0.1"),
    ("save_projection fan_in_fan_out init_weights inference_mode", lambda v: isinstance(v, bool),
     "expected True or False"),
    ("target_modules", _is_target_modules,
     "expected a non-empty list of module-name suffixes, a regex string, 'all-linear' or None"),
    ("modules_to_save", lambda v: v is None or _is_str_list(v), "expected None or a list of module names"),
    ("layers_to_transform", lambda v: v is None or (_is_int(v) and v >= 0)
     or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
     "expected None, a layer index or a list of layer indices (ints >= 0)"),
    ("layers_pattern", lambda v: v is None or isinstance(v, str) or _is_str_list(v),
     "expected None, a name such as 'layers', or a list of names"),
    ("task_type", lambda v: v is None or v in TASK_TYPES,
     f"expected None or one of {', '.join(map(repr, TASK_TYPES))}"),
    ("base_model_name_or_path revision peft_version", lambda v: v is None or isinstance(v, str),
     "expected None or a string"),
    ("auto_mapping", lambda v: v is None or isinstance(v, dict),
     "expected None or a dict such as {'base_model_class': 'BertModel', 'parent_library': ...}"),
)


def _method_checks(prefix: str) -> tuple[_Check, ...]:
    """The rows of a method's own fields: its dropout, and its bias modes (``<prefix>_only``: its sites' biases)."""
    modes = ("none", "all", f"{prefix}_only")
    return ((f"{prefix}_dropout", lambda p: _is_number(p) and 0.0 <= p < 1.0, "expected a float in [0, 1)"),
            ("bias", lambda v: v in modes, f"allowed values are {', '.join(map(repr, modes))}"))


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

    _dropout_field = "vera_dropout"
    peft_type = "VERA"

    _checks: ClassVar[tuple[_Check, ...]] = (*_method_checks("vera"), *_CHECKS)  # PVeRA adds its own rows

    @property
    def dropout(self) -> float:
        return float(getattr(self, self._dropout_field))

    def __post_init__(self) -> None:
        # Sets and tuples are read as lists; PEFT's TaskType enum as its value.
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), (set, frozenset, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.task_type = getattr(self.task_type, "value", self.task_type)
        for names, valid, expected in self._checks:
            for name in names.split():
                if not valid(getattr(self, name)):
                    raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {expected}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform: set the layer "
                             "indices to adapt, or drop layers_pattern")
        heads = [h for h in TASK_MODULES_TO_SAVE.get(self.task_type or "", []) if h not in (self.modules_to_save or [])]
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
    peft_type = "PVERA"

    _checks: ClassVar[tuple[_Check, ...]] = (*_method_checks("pvera"), *_CHECKS, (
        "sample_at_inference", lambda s: isinstance(s, bool) or (isinstance(s, dict) and all(
            isinstance(k, str) and isinstance(v, bool) for k, v in s.items())),
        "expected True, False or a dict {site name: bool}"),
        ("generator_seed", lambda g: g is None or _is_int(g), "expected None or an int seed"))


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
    """``config`` as a vera_fx config: ours as it is, PEFT's (any object with ``peft_type`` and ``to_dict()``)
    read by its fields; anything else raises TypeError."""
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
        data = {**to_dict(), "peft_type": peft_type}  # sets and enums: as __post_init__ reads them
        try:
            return config_from_dict(data)
        except (ValueError, TypeError) as e:
            raise type(e)(f"config {type(config).__module__}.{name} cannot be read as vera_fx's {peft_type} config: "
                          f"{e}") from e
    raise TypeError(f"config must be a vera_fx.VeraConfig or vera_fx.PveraConfig (or PEFT's VeraConfig / "
                    f"PveraConfig), got {type(config).__module__}.{name}")
