"""PVeRA's run-time sampling switches (per-site bools the graph reads) and its KL term (recorded by the last
forward, so differentiable)."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import nn

from .methods import AdapterState
from .methods.pvera import GENERATOR_STATE, KL_RECORD, SAMPLE_SWITCH, PveraMethod, pvera_record_kl, reseed_state
from .sites import ADAPTER_KEY, as_graph_module, graph_modules
from .state import adapters_of, mutation

logger = logging.getLogger(__name__)


def pvera_states(gm: nn.Module, adapter_name: Optional[str] = None) -> dict[str, AdapterState]:
    """The PVeRA adapters of ``gm`` by name (only ``adapter_name`` when given); ValueError when there is none."""
    states = dict(adapters_of(as_graph_module(gm)).items())
    pvera = {k: s for k, s in states.items() if isinstance(s.method, PveraMethod)}
    if adapter_name is not None:
        if adapter_name not in states:
            raise ValueError(f"adapter_name={adapter_name!r} is not on this graph; adapters: {sorted(states)}")
        if adapter_name not in pvera:
            raise ValueError(f"adapter_name={adapter_name!r} is a {states[adapter_name].method_name} adapter; "
                             f"sampling and the KL term exist for PVeRA adapters only: {sorted(pvera) or 'none'}")
        return {adapter_name: pvera[adapter_name]}
    if not pvera:
        raise ValueError(f"this graph has no PVeRA adapter (adapters: {sorted(states) or 'none'}); create one with "
                         "vera_fx.transform(model, vera_fx.PveraConfig(...))")
    return pvera


@mutation
def set_sample_at_inference(gm: nn.Module, value: Union[bool, dict[str, bool]],
                            adapter_name: str = "default") -> None:
    """Switch sampling at inference on or off for every site (a bool) or the named sites (``{site name: bool}``);
    training mode always samples. Read at run time (a compiled graph recompiles once per combination)."""
    state = pvera_states(gm, adapter_name)[adapter_name]
    sites = state.site_names
    wanted = {s: value for s in sites} if isinstance(value, bool) else value
    if isinstance(value, dict):
        unknown = sorted(k for k in value if k not in sites)
        if unknown:
            raise ValueError(f"set_sample_at_inference: unknown sites {unknown} for adapter {adapter_name!r}; its "
                             f"sites are {sites}")
        bad = {k: v for k, v in value.items() if not isinstance(v, bool)}
        if bad:
            raise ValueError(f"set_sample_at_inference: values must be True or False, got {bad}")
    elif not isinstance(value, bool):
        raise TypeError(f"set_sample_at_inference: value must be True, False or a dict {{site name: bool}}, got "
                        f"{type(value).__name__} {value!r}")
    for site, on in wanted.items():
        setattr(state.site_module(site), SAMPLE_SWITCH, on)
    state.switches["sample_at_inference"] = {s: getattr(state.site_module(s), SAMPLE_SWITCH) for s in sites}
    logger.debug("adapter %r samples at inference at %d of %d sites", adapter_name,
                 sum(state.switches["sample_at_inference"].values()), len(sites))


@mutation
def reseed(gm: nn.Module, seed: Optional[int] = None, adapter_name: str = "default") -> None:
    """Restart a seeded adapter's noise streams from ``seed`` (default: its ``generator_seed``)."""
    state = pvera_states(gm, adapter_name)[adapter_name]
    if not any(GENERATOR_STATE in state.site_module(s)._buffers for s in state.site_names):
        raise ValueError(f"adapter {adapter_name!r} was created with generator_seed=None and samples from torch's "
                         "global generator (use torch.manual_seed); set PveraConfig(generator_seed=...) to get "
                         "per-site noise streams")
    if seed is None:
        seed = state.config.generator_seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is invalid: expected an int or None")
    reseed_state(state, seed)


def kl_divergence(gm: nn.Module, adapter_name: Optional[str] = None) -> torch.Tensor:
    """The KL term of the last forward: per site the mean of ``-0.5 * (1 + logvar - mu^2 - exp(logvar))`` (over a
    shared layer's calls too), summed over sites and PVeRA adapters (``adapter_name``'s only when given);
    differentiable when the forward ran with gradients."""
    inner = as_graph_module(gm)
    states = pvera_states(inner, adapter_name)
    per_site: dict[tuple[str, str], list[torch.Tensor]] = {}
    # Each graph of the tree records into its own state's record (a block's view has one per block path).
    live: dict[int, tuple[Any, set[str]]] = {id(getattr(s, KL_RECORD)): (getattr(s, KL_RECORD), set())
                                             for s in states.values()}
    missing = []
    for g in graph_modules(inner):
        container = adapters_of(g)
        for node in g.graph.find_nodes(op="call_function", target=pvera_record_kl):
            tag = node.meta.get(ADAPTER_KEY) or {}
            name = tag.get("adapter")
            if name not in states or name not in container:
                continue
            record = getattr(container[name], KL_RECORD)
            live.setdefault(id(record), (record, set()))[1].add(node.args[3])
            value = record.get(node.args[3])
            if value is None:
                missing.append(tag.get("site"))
                continue
            per_site.setdefault((name, tag["site"]), []).append(value)
    for record, keys in live.values():  # drop terms of calls no longer in the graph (merged or switched off)
        for stale in [k for k in record.values if k not in keys]:
            del record.values[stale]
    if missing or not per_site:
        which = repr(adapter_name) if adapter_name is not None else f"{sorted(states)}"
        why = (f" at sites {sorted(set(missing))[:5]}; run a forward pass first" if missing else
               ": it has no nodes in the graph (inactive or merged adapters have no KL term)")
        raise ValueError(f"kl_divergence: no KL term recorded for adapter {which}{why}")
    return torch.stack([torch.stack(v).mean() for v in per_site.values()]).sum()
