"""Adapter state in PEFT's checkpoint layout.

Our parameter names map to PEFT's keys by a rename: ``vera_fx_adapters.<adapter>.sites.<site>.<p>`` is
``base_model.model.<site>.<p>`` and ``vera_fx_adapters.<adapter>.<prefix>_A`` is ``base_model.<prefix>_A``.
Trainable biases and ``modules_to_save`` copies use PEFT's names for them too.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .methods import CONTAINER, AdapterState
from .sites import read_sites

__all__ = ["adapter_state_dict", "load_adapter_state_dict", "adapter_state", "state_dict_targets"]

logger = logging.getLogger(__name__)

_PEFT_ROOT = "base_model.model."


def adapter_state(gm: GraphModule, adapter_name: str = "default") -> AdapterState:
    """The AdapterState of ``adapter_name``; ValueError listing the adapters when it is missing."""
    container = getattr(gm, CONTAINER, None)
    if container is None or len(container) == 0:
        raise ValueError("this graph has no adapter: create one with vera_fx.transform(model, config)")
    if adapter_name not in container:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this graph; adapters: {sorted(container)}")
    return container[adapter_name]


def _bias_key(qualname: str, wrapped: set[str]) -> str:
    """PEFT's key of a base bias: adapted layers are wrapped, so their bias sits under ``base_layer``."""
    path, _, name = qualname.rpartition(".")
    return f"{_PEFT_ROOT}{path}.base_layer.{name}" if path in wrapped else f"{_PEFT_ROOT}{qualname}"


def state_dict_targets(gm: GraphModule, adapter_name: str = "default") -> dict[str, tuple[nn.Module, str]]:
    """PEFT key -> (module, attribute) of every tensor the adapter's checkpoint holds, in PEFT's order."""
    state = adapter_state(gm, adapter_name)
    cfg, method = state.config, state.method
    targets: dict[str, tuple[nn.Module, str]] = {}
    for site in state.site_names:
        mod = state.site_module(site)
        for pname in mod._parameters:
            targets[method.peft_site_key(site, pname)] = (mod, pname)
    mts_paths: list[str] = list(getattr(state, "modules_to_save_paths", []))
    if cfg.bias != "none":
        wrapped = {s.name for s in read_sites(gm) if s.adapters}
        wrapped |= set(state.site_names)
        for qualname, p in gm.named_parameters(remove_duplicate=False):
            if qualname.startswith(CONTAINER + ".") or qualname.rpartition(".")[2] != "bias" or not p.requires_grad:
                continue
            if any(qualname.startswith(m + ".") for m in mts_paths):
                continue
            path, _, name = qualname.rpartition(".")
            targets[_bias_key(qualname, wrapped)] = (gm.get_submodule(path), name)
    if cfg.save_projection:
        for which in ("A", "B"):
            targets[method.peft_projection_key(which)] = (state, f"{method.prefix}_{which}")
    for path in mts_paths:
        mod = gm.get_submodule(path)
        for pname, _ in mod.named_parameters():
            sub, _, leaf = pname.rpartition(".")
            targets[f"{_PEFT_ROOT}{path}.{pname}"] = (mod.get_submodule(sub) if sub else mod, leaf)
    return targets


def adapter_state_dict(gm: GraphModule, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT writes to adapter_model.safetensors for this adapter, under PEFT's keys."""
    return {k: getattr(mod, attr).detach() for k, (mod, attr) in state_dict_targets(gm, adapter_name).items()}


def _normalise_peft_key(key: str) -> Optional[str]:
    """Map PEFT's variant keys onto ours: drop a ``.<adapter>`` suffix on projections and the
    ``modules_to_save`` wrappers' extra level; None for keys that carry no state of ours."""
    if ".original_module." in key:
        return None
    key = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    return key


def load_adapter_state_dict(gm: GraphModule, state_dict: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Copy ``state_dict`` (PEFT's keys) into the adapter; every key and shape is checked first.

    Missing or unexpected keys and shape mismatches raise ValueError naming them; nothing changes then.
    Projections may be absent when the config has ``save_projection=False`` (they come from the PRNG key).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    state = adapter_state(gm, adapter_name)
    targets = state_dict_targets(gm, adapter_name)
    projection_keys = {state.method.peft_projection_key(w) for w in ("A", "B")}
    incoming: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state_dict.items():
        norm = _normalise_peft_key(key)
        if norm is None:
            ignored.append(key)
            continue
        if norm.endswith(f".{adapter_name}") and norm.rsplit(".", 1)[0] in projection_keys:
            norm = norm.rsplit(".", 1)[0]
        incoming[norm] = value
    for key in projection_keys:
        if key in incoming and key not in targets:  # save_projection=False but the file has them: use them
            targets[key] = (state, key.rsplit(".", 1)[1])
    missing = [k for k in targets if k not in incoming and k not in projection_keys]
    unexpected = [k for k in incoming if k not in targets]
    if missing or unexpected:
        raise ValueError(f"adapter {adapter_name!r}: state dict does not fit this graph; missing keys: "
                         f"{missing[:5] or 'none'}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                         f"keys: {unexpected[:5] or 'none'}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)}). Check target_modules, r and the model")
    bad = []
    for key, value in incoming.items():
        mod, attr = targets[key]
        current = getattr(mod, attr)
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key}: not a tensor ({type(value).__name__})")
        elif tuple(value.shape) != tuple(current.shape):
            bad.append(f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(current.shape)} on the graph")
        elif not (value.is_floating_point() or value.is_complex()):
            bad.append(f"{key}: dtype {value.dtype} is not a floating dtype")
    if bad:
        raise ValueError(f"adapter {adapter_name!r}: state dict does not fit: " + "; ".join(bad[:5]) +
                         (" ..." if len(bad) > 5 else ""))
    missing_proj = [k for k in projection_keys if k not in incoming]
    if missing_proj and state.config.save_projection:
        logger.warning("adapter %r: the state dict has no %s; keeping the projections regenerated from "
                       "projection_prng_key=%d", adapter_name, sorted(missing_proj), state.config.projection_prng_key)
    with torch.no_grad():
        for key, value in incoming.items():
            mod, attr = targets[key]
            getattr(mod, attr).copy_(value.to(getattr(mod, attr).dtype))
    if ignored:
        logger.debug("ignored PEFT keys without state here: %s", ignored)
