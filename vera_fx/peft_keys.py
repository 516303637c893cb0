"""Our adapter tensors under PEFT's checkpoint keys, and the base weights PEFT saves beside them.

``vera_fx_adapters.<adapter>.sites.<site>.<p>`` is ``base_model.model.<site>.<p>``,
``vera_fx_adapters.<adapter>.<prefix>_A`` is ``base_model.<prefix>_A``; biases and ``modules_to_save`` copies
take PEFT's names too.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .config import AdapterConfig
from .distributed import full_tensor
from .methods import CONTAINER, AdapterState
from .sites import as_graph_module, model_info
from .state import PEFT_ROOT, adapters_of, bias_targets, modules_to_save_copy


def adapter_state(gm: GraphModule, adapter_name: str = "default") -> AdapterState:
    gm = as_graph_module(gm, "adapter_state")
    container = adapters_of(gm)
    if len(container) == 0:
        raise ValueError("this graph has no adapter: create one with vera_fx.transform(model, config)")
    if adapter_name not in container:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this graph; adapters: {sorted(container)}")
    return container[adapter_name]


def state_dict_targets(gm: GraphModule, adapter_name: str = "default") -> dict[str, tuple[nn.Module, str]]:
    """PEFT key -> (module, attribute) of every tensor the adapter's checkpoint holds, in PEFT's order."""
    gm = as_graph_module(gm, "state_dict_targets")
    state = adapter_state(gm, adapter_name)
    cfg, method = state.config, state.method
    targets: dict[str, tuple[nn.Module, str]] = {}
    for site in state.site_names:
        mod = state.site_module(site)
        for pname in mod._parameters:
            targets[method.peft_site_key(site, pname)] = (mod, pname)
    targets.update(bias_targets(gm, state))
    if cfg.save_projection:
        for which in ("A", "B"):
            targets[method.peft_projection_key(which)] = (state, f"{method.prefix}_{which}")
    for path in getattr(state, "modules_to_save_paths", []):
        copy = modules_to_save_copy(state, path)
        for pname, _ in copy.named_parameters():
            sub, _, leaf = pname.rpartition(".")
            targets[f"{PEFT_ROOT}{path}.{pname}"] = (copy.get_submodule(sub) if sub else copy, leaf)
    return targets


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for save_embedding_layers="auto"


def embedding_targeted(gm: GraphModule, config: AdapterConfig) -> bool:
    """PEFT's save_embedding_layers='auto' test: an embedding-layer name among the targets."""
    targets = config.target_modules
    if not isinstance(targets, str):
        return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)
    return targets.lower() != "all-linear" and any(
        re.fullmatch(targets, k) for k in model_info(gm).get("modules", {})
        if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))


def base_layer_targets(gm: GraphModule, adapter_name: str = "default") -> dict[str, str]:
    """PEFT key -> graph qualname of the base weights PEFT also saves (save_embedding_layers: the output head's
    ``<path>.base_layer.weight`` / ``.bias`` when an embedding-layer name is targeted)."""
    state = adapter_state(gm, adapter_name)
    head = model_info(gm).get("output_head")
    if not head or head not in state.site_names or not embedding_targeted(gm, state.config):
        return {}
    return {f"{PEFT_ROOT}{head}.base_layer.{leaf}": f"{head}.{leaf}" for leaf in ("weight", "bias")
            if base_tensor(gm, f"{head}.{leaf}") is not None}


def base_tensor(gm: GraphModule, qualname: str) -> Optional[torch.Tensor]:
    """The graph's base parameter or buffer at ``qualname`` (None for adapter state and missing names)."""
    if qualname.startswith(CONTAINER + "."):
        return None
    path, _, leaf = qualname.rpartition(".")
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    value = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
    return value if isinstance(value, torch.Tensor) else None


def base_qualname(gm: GraphModule, key: str) -> Optional[str]:
    """The graph qualname a PEFT base-weight key names (``base_model.model.<path>[.base_layer].<leaf>``), or
    None."""
    if not key.startswith(PEFT_ROOT):
        return None
    qualname = key[len(PEFT_ROOT):].replace(".base_layer.", ".")
    return qualname if base_tensor(gm, qualname) is not None else None


def adapter_state_dict(gm: GraphModule, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT writes to adapter_model.safetensors for this adapter, under PEFT's keys, full: FSDP2
    shards are gathered (a collective: call it on every rank)."""
    gm = as_graph_module(gm, "adapter_state_dict")
    out = {k: full_tensor(getattr(mod, attr).detach())
           for k, (mod, attr) in state_dict_targets(gm, adapter_name).items()}
    for key, qualname in base_layer_targets(gm, adapter_name).items():
        out.setdefault(key, full_tensor(base_tensor(gm, qualname).detach()))
    return out


def normalise_peft_key(key: str) -> Optional[str]:
    """Map PEFT's variant keys onto ours (``modules_to_save`` wrappers' extra level); None for keys that
    carry no state of ours (the wrapped original module)."""
    if ".original_module." in key:
        return None
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
