"""The model object's ``state_dict``: the adapters only, self-describing, for transformers' Trainer checkpoints.

Keys: ``vera_fx.<adapter>.<PEFT key>`` for tensors and ``vera_fx_config.<adapter>`` for the adapter's config as
UTF-8 JSON bytes (a uint8 tensor), so a Trainer checkpoint (``model.safetensors``) says which adapters it holds
and ``vera_fx.from_pretrained`` can rebuild the object from it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from . import checkpoint as ckpt
from .compat import IncompatibleKeys
from .config import AdapterConfig, config_from_dict
from .methods import CONTAINER
from .state import state_lock

STATE_KEY_PREFIX = "vera_fx."
CONFIG_KEY_PREFIX = "vera_fx_config."


def adapters_state_dict(source: GraphModule, destination: Optional[dict] = None, prefix: str = "",
                        keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter's tensors under PEFT's keys (cloned: safetensors refuses shared storage) and its config."""
    out: dict[str, torch.Tensor] = OrderedDict() if destination is None else destination
    for name in getattr(source, CONTAINER, {}) or {}:
        for key, t in ckpt.adapter_state_dict(source, name).items():
            out[f"{prefix}{STATE_KEY_PREFIX}{name}.{key}"] = t if keep_vars else t.detach().clone()
        data = json.dumps(ckpt.peft_config_dict(source, name), sort_keys=True).encode()
        out[f"{prefix}{CONFIG_KEY_PREFIX}{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _split(state_dict: dict[str, Any], names: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The tensors of each adapter by PEFT key, and the keys that belong to no adapter of ``names``."""
    per_adapter: dict[str, dict[str, Any]] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(CONFIG_KEY_PREFIX):
            if key[len(CONFIG_KEY_PREFIX):] not in names:
                unexpected.append(key)
            continue
        adapter, _, rest = key.removeprefix(STATE_KEY_PREFIX).partition(".")
        if key.startswith(STATE_KEY_PREFIX) and adapter in names and rest:
            per_adapter.setdefault(adapter, {})[rest] = value
        else:
            unexpected.append(key)
    return per_adapter, unexpected


def load_adapters_state_dict(source: GraphModule, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
    """Load what ``adapters_state_dict`` gives (every adapter checked before anything changes)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"load_state_dict: state_dict={state_dict!r:.60} is a {type(state_dict).__name__}; "
                        "give the dict m.state_dict() returns (a folder loads with vera_fx.load_adapter)")
    names = list(getattr(source, CONTAINER, {}) or {})
    per_adapter, unexpected = _split(state_dict, names)
    missing = [f"{STATE_KEY_PREFIX}{n}.*" for n in names if n not in per_adapter]
    if strict and (missing or unexpected):
        raise ValueError(f"load_state_dict: the state dict does not fit this model's adapters {names}; missing: "
                         f"{missing or 'none'}, unexpected: {unexpected[:5] or 'none'}. Give it what "
                         "state_dict() returns (or load a PEFT folder with vera_fx.load_adapter)")
    plans = [(name, ckpt.plan_load(source, sd, name, f"state dict of adapter {name!r}")[0])
             for name, sd in per_adapter.items()]
    with state_lock(source).write():
        for name, plan in plans:
            ckpt.apply_plan(source, plan, [name])
    return IncompatibleKeys(missing, unexpected)


def read_trainer_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, AdapterConfig]]:
    """``path/model.safetensors`` of a Trainer checkpoint: its tensors and each adapter's config."""
    state = ckpt.read_weights(path / "model.safetensors")
    configs = {k[len(CONFIG_KEY_PREFIX):]: v for k, v in state.items() if k.startswith(CONFIG_KEY_PREFIX)}
    if not configs:
        raise ValueError(f"{path}/model.safetensors holds no vera_fx adapter (no {CONFIG_KEY_PREFIX}* entry): "
                         "give an adapter folder (adapter_config.json + adapter_model.safetensors) or a Trainer "
                         "checkpoint of a vera_fx model")
    parsed = {}
    for name, blob in configs.items():
        try:
            parsed[name] = config_from_dict(json.loads(bytes(blob.tolist()).decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}/model.safetensors: the config of adapter {name!r} is unreadable: {e}") from e
    return state, parsed
