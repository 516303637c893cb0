"""Inject pass: add one adapter's state to the GraphModule and its nodes after every targeted site.

State: one ``AdapterState`` at ``gm.vera_fx_adapters[adapter_name]`` holding the shared projections (sized
to the largest targeted site, sliced per site in the graph) and per-site lambda parameters. Nodes: whatever
the method emits after each site's output, reached through get_attr nodes. Only the lambdas (plus biases for
``bias="all"`` / ``"<method>_only"`` and ``modules_to_save`` copies) are trainable; biases are cloned first and
``modules_to_save`` copies belong to the adapter (vera_fx/state.py), so training never writes into the
user's model. Later adapters of a method share the first one's projections (``shared_projections``).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import AdapterConfig, as_config
from ..checks import check_rank
from ..methods import CONTAINER, AdapterState, Emitter, method_for
from ..methods.fold import restore_linear
from ..sites import ADAPTER_KEY, Site, graph_modules, model_info, read_graph_sites, registration_order
from ..state import (ADAPTER_MODE, adapter_mode_module, adapters_of, attach_modules_to_save, attach_state, bias_targets,
                     shared_projections)
from .chains import emitted_chain
from .lower import lower_adapters, lowering_setting
from .match import select_sites
from .share import share_projections

logger = logging.getLogger(__name__)


def training_node(gm: GraphModule) -> Node:
    """The graph's ``get_attr('training')`` node, created before the first non-input node if missing."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == "training":
            return n
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        node = gm.graph.get_attr("training")
    # Added for the adapters (the base graph had no dropout): removed again with the last adapter node.
    node.meta[ADAPTER_KEY] = {"site": None, "adapter": None, "role": "mode", "base": None, "name": "training"}
    return node


def adapter_mode_node(gm: GraphModule, training: bool = True) -> Node:
    """The node reading the adapters' own train / eval flag (``vera_fx_adapter_mode.training``, see
    vera_fx/state.py), created with its module when missing: the adapter nodes' dropout and sampling read it,
    the base model's dropout keeps reading ``training``. A new module starts with ``training``."""
    adapter_mode_module(gm, training)
    target = f"{ADAPTER_MODE}.training"
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            return n
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a bool attribute, not a tensor: intended
        node = gm.graph.get_attr(target)
    node.meta[ADAPTER_KEY] = {"site": None, "adapter": None, "role": "mode", "base": None, "name": "adapter_mode"}
    return node


def _float_dtype(gm: GraphModule, site: Site) -> torch.dtype:
    if site.weight is not None:
        w = gm.get_parameter(site.weight) if _is_param(gm, site.weight) else gm.get_buffer(site.weight)
        if w.is_floating_point():
            return w.dtype
    return torch.float32


def _device(gm: GraphModule, site: Site) -> torch.device:
    if site.weight is not None:
        try:
            return gm.get_parameter(site.weight).device
        except AttributeError:
            pass
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


def _is_param(gm: GraphModule, target: str) -> bool:
    mod_path, _, name = target.rpartition(".")
    return name in gm.get_submodule(mod_path)._parameters


class InjectPass(PassBase):
    """Attach adapter ``adapter_name`` with ``config`` to the sites it targets."""

    def __init__(self, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.config = as_config(config)
        self.adapter_name = adapter_name
        self.method = method_for(self.config)

    def requires(self, graph_module: GraphModule) -> None:
        if not isinstance(self.adapter_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.adapter_name):
            raise ValueError(f"adapter_name={self.adapter_name!r} is invalid: use a Python identifier such as "
                             "'default' or 'task_a'")
        if any(hasattr(p, "device_mesh") for p in graph_module.parameters()):
            raise ValueError(f"cannot add adapter {self.adapter_name!r}: the graph is sharded with FSDP2 (its new "
                             "lambdas would not be sharded); add every adapter before vera_fx.distributed.shard(...)")
        if self.adapter_name in adapters_of(graph_module):
            raise ValueError(f"adapter_name={self.adapter_name!r} already exists on this graph; choose another "
                             "name or delete it first")

    def call(self, graph_module: GraphModule) -> PassResult:
        gm, cfg, method, name = graph_module, self.config, self.method, self.adapter_name
        chosen = select_sites(gm, cfg)
        check_rank(cfg, chosen, _device(gm, chosen[0]) if chosen else None)  # before anything is allocated
        for s in chosen:
            if s.fan_in_fan_out != cfg.fan_in_fan_out:
                warnings.warn(f"fan_in_fan_out={cfg.fan_in_fan_out} does not fit site {s.name!r} (kind {s.kind!r} "
                              f"stores its weight {'(in, out)' if s.fan_in_fan_out else '(out, in)'}); vera_fx uses "
                              f"fan_in_fan_out={s.fan_in_fan_out} there. Your config object is left unchanged.",
                              UserWarning, stacklevel=4)
                break
        # Adapters of one method share the first one's projections (views, sliced to a lower r).
        shared = shared_projections(gm, cfg, method, max(s.in_features for s in chosen),
                                    max(s.out_features for s in chosen))
        state = new_state(gm, cfg, chosen, shared, trainable=True)
        attach_state(gm, name, state)

        count = emit_adapter(gm, name)
        self._mark_trainable(gm, cfg, chosen)
        gm.graph.lint()
        gm.recompile()
        logger.info("inject %s (%s): %d sites, %d calls, A %s, B %s", name, method.name, len(chosen), count,
                    tuple(state.projection("A").shape), tuple(state.projection("B").shape))
        return PassResult(gm, True)

    def _mark_trainable(self, gm: GraphModule, cfg: AdapterConfig, chosen: list[Site]) -> None:
        # modules_to_save: trainable copies owned by the adapter (the graph reads them while it is active).
        if cfg.modules_to_save:
            attach_modules_to_save(gm, self.adapter_name, cfg.modules_to_save)
        if cfg.bias != "none":  # "all", or "<method>_only": the biases of adapted sites (PEFT's checkpoint keys)
            for mod, leaf in bias_targets(gm, getattr(gm, CONTAINER)[self.adapter_name]).values():
                p = mod._parameters[leaf]
                if not p.requires_grad:
                    mod._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=True)


def new_state(gm: GraphModule, config: AdapterConfig, chosen: list[Site],
              shared: Optional[tuple[torch.Tensor, torch.Tensor]], trainable: bool) -> AdapterState:
    """An adapter's state over the sites ``chosen``: the projections (``shared``, or drawn from the config's
    seed), the lambdas at their initial values (``requires_grad=trainable``) and the method's switches, on the
    sites' device and float dtype. Registers and emits nothing."""
    method = method_for(config)
    in_max = max(s.in_features for s in chosen)
    out_max = max(s.out_features for s in chosen)
    a, b = shared if shared is not None else method.init_projections(config, in_max, out_max)
    device, dtype = _device(gm, chosen[0]), _float_dtype(gm, chosen[0])
    state = AdapterState(config, method)
    state.register_buffer(f"{method.prefix}_A", a.to(device=device, dtype=dtype))
    state.register_buffer(f"{method.prefix}_B", b.to(device=device, dtype=dtype))
    # random initial values (init_weights=False) are drawn in module registration order, as PEFT draws them
    by_name = {s.name: s for s in chosen}
    modules = list(model_info(gm).get("modules", {}))
    values = {n: method.init_site(config, by_name[n], _float_dtype(gm, by_name[n]))
              for n in registration_order(list(by_name), modules)}
    for s in chosen:
        mod = state.site_module(s.name, create=True)
        for pname, value in values[s.name].items():
            mod.register_parameter(pname, nn.Parameter(value.to(_device(gm, s)), requires_grad=trainable))
        state.site_names.append(s.name)
    method.init_switches(state)
    return state


def _is_own_node(node: Node, site: str, adapter: str) -> bool:
    tag = node.meta.get(ADAPTER_KEY)
    return bool(tag) and tag.get("site") == site and tag.get("adapter") == adapter


def _adapted_outputs(gm: GraphModule) -> dict[str, Node]:
    """Base call name -> the last adapter output added to that call (one walk of the graph)."""
    last: dict[str, Node] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get(ADAPTER_KEY)
        if tag and tag.get("role") == "output" and tag.get("path") != "weight":  # a weight-path fold is no output
            last[tag["base"]] = n
    return last


def emit_adapter(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]] = None) -> int:
    """Emit ``adapter_name``'s nodes after every call of its sites (or of ``site_names`` only), in every graph
    of the tree that holds its state (``attach_state``).

    Sites that already carry its nodes are skipped. Returns the number of calls adapted. Recompiles the
    graphs it changed.
    """
    count = 0
    setting = lowering_setting(gm)  # the root's lowering setting, for every graph of the tree
    # The root's adapter flag (training mode for a first adapter, as PEFT's new layers) for every graph.
    training = adapter_mode_module(gm).training
    for g in graph_modules(gm):
        if adapter_name in adapters_of(g):
            count += _emit_graph(g, adapter_name, site_names, setting, training)
    return count


def _emit_graph(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]],
                setting: Optional[dict] = None, training: bool = True) -> int:
    """``emit_adapter`` on one graph (its own nodes only)."""
    state = getattr(gm, CONTAINER)[adapter_name]
    method = state.method
    wanted = set(state.site_names) if site_names is None else set(site_names) & set(state.site_names)
    if not wanted:
        return 0
    training = adapter_mode_node(gm, training)
    outputs = _adapted_outputs(gm)
    count, chains = 0, []
    for site in read_graph_sites(gm):  # every call of a chosen site, shared layers included
        if site.name not in wanted or adapter_name in site.adapters:
            continue
        y = outputs.get(site.base.name, site.output)
        em = Emitter(gm.graph, y, site, adapter_name)
        out = method.emit(em, state, site.input, y, training)
        y.replace_all_uses_with(out, delete_user_cb=lambda u, out=out, s=site.name: u is not out
                                and not _is_own_node(u, s, adapter_name))
        chain = emitted_chain(site, adapter_name, state, em.nodes)
        chains += [chain] if chain is not None else []
        count += 1
    share_projections(gm, recompile=False)  # linted and recompiled below
    lower_adapters(gm, chains, setting, recompile=False)  # what was just emitted; linted and recompiled below
    gm.graph.lint()
    gm.recompile()
    return count


def remove_adapter_nodes(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]] = None) -> int:
    """Erase ``adapter_name``'s nodes (at ``site_names`` only, when given) in every graph of the tree,
    rewiring each site's users to the output the adapter was added to. Returns the number of calls cleared.
    Recompiles the graphs."""
    return sum(_remove_graph(g, adapter_name, site_names) for g in graph_modules(gm))


def _remove_graph(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]]) -> int:
    """``remove_adapter_nodes`` on one graph."""
    graph = gm.graph
    cleared = 0
    for out in [n for n in graph.nodes if (n.meta.get(ADAPTER_KEY) or {}).get("role") == "output"
                and n.meta[ADAPTER_KEY]["adapter"] == adapter_name]:
        tag = out.meta[ADAPTER_KEY]
        if site_names is not None and tag["site"] not in site_names:
            continue
        add = out
        while add.meta.get(ADAPTER_KEY) and add.meta[ADAPTER_KEY].get("name") != "add":
            add = add.args[0]
        # the add's y; an untagged node: a weight-path call's own output (its cast), the fold carries the adapter
        y = add.args[0] if add.meta.get(ADAPTER_KEY) else add
        users = list(out.users)
        out.replace_all_uses_with(y)
        for u in users:  # a weight-path call reads its weight again: the plain linear
            restore_linear(u)
        own = [n for n in graph.nodes if (n.meta.get(ADAPTER_KEY) or {}).get("adapter") == adapter_name
               and tag["base"] in (n.meta[ADAPTER_KEY].get("bases") or [n.meta[ADAPTER_KEY].get("base")])]
        for n in reversed(own):
            if n.users:  # shared with another site (share pass): that site still reads it
                bases = n.meta[ADAPTER_KEY].get("bases") or [n.meta[ADAPTER_KEY]["base"]]
                n.meta[ADAPTER_KEY]["bases"] = [b for b in bases if b != tag["base"]]
            else:
                graph.erase_node(n)
        cleared += 1
    for n in list(graph.nodes):  # the flags the adapters added (``training``, the adapter mode) once unread
        if (n.meta.get(ADAPTER_KEY) or {}).get("role") == "mode" and not n.users:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return cleared
