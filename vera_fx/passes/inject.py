"""Inject pass: add one adapter's state (``gm.vera_fx_adapters[name]``) and its nodes after every targeted site,
then share x·Aᵀ and lower what it emitted. Only the lambdas, biases (``bias="all"`` / ``"<method>_only"``, cloned)
and ``modules_to_save`` copies train, so training never writes into the user's model.
"""

from __future__ import annotations

import logging
import operator
import re
import warnings
from typing import Any, Hashable, Optional, Union

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import AdapterConfig, as_config
from ..checks import check_rank
from ..methods import AdapterState, Emitter, method_for
from ..methods.fold import restore_linear
from ..sites import ADAPTER_KEY, Site, graph_modules, model_info, read_graph_sites, registration_order
from ..state import (ADAPTER_MODE, adapter_mode_module, adapters_of, attach_modules_to_save, attach_state, bias_targets,
                     shared_projections)
from .chains import Chain
from .lower import lower_adapters, lowering_setting
from .match import select_sites

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops that give the same result for the same arguments (no RNG, no side effects): the share pass merges them.
_PURE = {aten.slice.Tensor, aten._to_copy.default, aten.linear.default}


def _tag(node: Node) -> dict[str, Any]:
    return node.meta.get(ADAPTER_KEY) or {}


def _bases(tag: dict[str, Any]) -> list[str]:
    """The base calls an adapter node serves (several once the share pass merged it)."""
    return tag.get("bases") or [tag.get("base")]


def training_node(gm: GraphModule, module: str = "") -> Node:
    """The graph's node reading ``<module>.training`` (default: the base model's), created (a mode node) if missing."""
    target = f"{module}.training" if module else "training"
    found = gm.graph.find_nodes(op="get_attr", target=target)
    if found:
        return found[0]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a bool attribute, not a tensor: intended
        node = gm.graph.get_attr(target)
    node.meta[ADAPTER_KEY] = {"site": None, "adapter": None, "role": "mode", "base": None,
                              "name": "adapter_mode" if module else "training"}
    return node


def _placement(gm: GraphModule, site: Site) -> tuple[torch.device, torch.dtype]:
    """(device, float dtype) of the site's weight, else (the graph's device, float32)."""
    try:
        w = operator.attrgetter(site.weight)(gm) if site.weight else None
    except AttributeError:
        w = None
    if not isinstance(w, torch.Tensor):
        return next((p.device for p in gm.parameters()), torch.device("cpu")), torch.float32
    return w.device, w.dtype if w.is_floating_point() else torch.float32


def _max_shape(sites: list[Site]) -> tuple[int, int]:  # (in, out) of the projections
    return max(s.in_features for s in sites), max(s.out_features for s in sites)


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
        check_rank(cfg, chosen, _placement(gm, chosen[0])[0])  # before anything is allocated (chosen: never empty)
        odd = next((s for s in chosen if s.fan_in_fan_out != cfg.fan_in_fan_out), None)
        if odd is not None:
            warnings.warn(f"fan_in_fan_out={cfg.fan_in_fan_out} does not fit site {odd.name!r} (kind {odd.kind!r} "
                          f"stores its weight {'(in, out)' if odd.fan_in_fan_out else '(out, in)'}); vera_fx uses "
                          f"fan_in_fan_out={odd.fan_in_fan_out} there. Your config object is left unchanged.",
                          UserWarning, stacklevel=4)
        state = new_state(gm, cfg, chosen, shared_projections(gm, cfg, method, *_max_shape(chosen)), trainable=True)
        attach_state(gm, name, state)
        count = emit_adapter(gm, name)
        if cfg.modules_to_save:  # trainable copies owned by the adapter (the graph reads them while it is active)
            attach_modules_to_save(gm, name, cfg.modules_to_save)
        if cfg.bias != "none":  # "all", or "<method>_only": the biases of adapted sites (PEFT's checkpoint keys)
            for mod, leaf in bias_targets(gm, state).values():
                p = mod._parameters[leaf]
                if not p.requires_grad:
                    mod._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=True)
        gm.graph.lint()
        gm.recompile()
        logger.info("inject %s (%s): %d sites, %d calls, A %s, B %s", name, method.name, len(chosen), count,
                    tuple(state.projection("A").shape), tuple(state.projection("B").shape))
        return PassResult(gm, True)


def new_state(gm: GraphModule, config: AdapterConfig, chosen: list[Site],
              shared: Optional[tuple[torch.Tensor, torch.Tensor]], trainable: bool) -> AdapterState:
    """An adapter's state over ``chosen`` (projections ``shared`` or drawn), on the sites' device; registers nothing."""
    method = method_for(config)
    a, b = shared if shared is not None else method.init_projections(config, *_max_shape(chosen))
    device, dtype = _placement(gm, chosen[0])
    state = AdapterState(config, method)
    state.register_buffer(f"{method.prefix}_A", a.to(device=device, dtype=dtype))
    state.register_buffer(f"{method.prefix}_B", b.to(device=device, dtype=dtype))
    # random initial values (init_weights=False) are drawn in module registration order, as PEFT draws them
    by_name = {s.name: s for s in chosen}
    values = {n: method.init_site(config, by_name[n], _placement(gm, by_name[n])[1])
              for n in registration_order(list(by_name), list(model_info(gm).get("modules", {})))}
    for s in chosen:
        mod = state.site_module(s.name, create=True)
        for pname, value in values[s.name].items():
            mod.register_parameter(pname, nn.Parameter(value.to(_placement(gm, s)[0]), requires_grad=trainable))
        state.site_names.append(s.name)
    method.init_switches(state)
    return state


def emit_adapter(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]] = None) -> int:
    """Emit ``adapter_name``'s nodes after every call of its sites (or of ``site_names`` only) that lacks them, in
    every graph of the tree, by the root's lowering setting; returns the number of calls adapted."""
    setting, training = lowering_setting(gm), adapter_mode_module(gm).training  # a first adapter trains (PEFT)
    return sum(_emit_graph(g, adapter_name, site_names, setting, training)
               for g in graph_modules(gm) if adapter_name in adapters_of(g))


def _emit_graph(gm: GraphModule, adapter_name: str, site_names: Optional[set[str]], setting: Optional[dict],
                training: bool) -> int:
    """``emit_adapter`` on one graph (its own nodes only)."""
    state = adapters_of(gm)[adapter_name]
    wanted = set(state.site_names) if site_names is None else set(site_names) & set(state.site_names)
    if not wanted:
        return 0
    adapter_mode_module(gm, training)
    mode = training_node(gm, ADAPTER_MODE)  # the adapters' own flag; the base model's dropout reads ``training``
    outputs = {}  # base call name -> the last adapter output added to it (a weight-path fold is no output)
    for n in gm.graph.nodes:
        if _tag(n).get("role") == "output" and _tag(n).get("path") != "weight":
            outputs[_tag(n)["base"]] = n
    chains: list[Chain] = []  # one per site call adapted
    for site in read_graph_sites(gm):  # every call of a chosen site, shared layers included
        if site.name not in wanted or adapter_name in site.adapters:
            continue
        y = outputs.get(site.base.name, site.output)
        em = Emitter(gm.graph, y, site, adapter_name)
        out = state.method.emit(em, state, site.input, y, mode)
        y.replace_all_uses_with(out, delete_user_cb=lambda u, out=out, s=site.name: u is not out and not (
            _tag(u).get("site") == s and _tag(u).get("adapter") == adapter_name))
        chains.append(Chain(site, adapter_name, state, em.nodes))
    share_projections(gm, recompile=False)
    lower_adapters(gm, chains, setting)  # what was just emitted
    gm.graph.lint()
    gm.recompile()
    return len(chains)


def _freeze(a: Any) -> Hashable:
    if isinstance(a, (list, tuple)):
        return tuple(_freeze(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in a.items()))
    return str(a) if isinstance(a, torch.dtype) else a


def share_projections(gm: GraphModule, recompile: bool = True) -> int:
    """Merge identical deterministic adapter nodes of ``gm``'s own graph (products: x·Aᵀ only); returns how many."""
    seen: dict[Hashable, Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        tag = _tag(node)
        if tag.get("role") not in ("projection", "adapter") or not (node.op == "get_attr" or (
                node.op == "call_function" and node.target in _PURE
                and (node.target is not aten.linear.default or tag.get("name") == "xA"))):
            continue
        first = seen.setdefault((node.op, node.target, _freeze(node.args), _freeze(node.kwargs)), node)
        if first is not node:
            first.meta[ADAPTER_KEY]["bases"] = sorted({*_bases(first.meta[ADAPTER_KEY]), tag["base"],
                                                       *tag.get("bases", [])})
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            removed += 1
    if removed and recompile:
        gm.graph.lint()
        gm.recompile()
    logger.debug("share: %d duplicate adapter nodes removed", removed)
    return removed


def remove_adapter_nodes(gm: GraphModule, adapters: Union[str, None, dict[str, set[str]]],
                         site_names: Optional[set[str]] = None) -> int:
    """Erase the nodes of ``adapters`` (None: all; a dict: each adapter's at its sites; a name: at ``site_names``
    when given) and the mode flags left unread, rewiring each site's users to the output the adapter was added to;
    one pass per graph, a graph left as it was is not recompiled. Returns the calls cleared."""
    wanted = adapters if isinstance(adapters, dict) or adapters is None else {adapters: site_names}

    def mine(tag: dict[str, Any]) -> bool:
        a = tag.get("adapter")
        return a is not None and tag.get("role") == "output" and (
            wanted is None or (a in wanted and (wanted[a] is None or tag["site"] in wanted[a])))

    cleared = 0
    for g in graph_modules(gm):
        outputs = [n for n in g.graph.nodes if mine(_tag(n))]
        _remove_outputs(g.graph, outputs)
        unread = [n for n in g.graph.nodes if _tag(n).get("role") == "mode" and not n.users]
        for n in unread:  # the flags the adapters added (``training``, the adapter mode)
            g.graph.erase_node(n)
        if outputs or unread:
            g.graph.lint()
            g.recompile()
        cleared += len(outputs)
    return cleared


def _remove_outputs(graph: Graph, outputs: list[Node]) -> None:
    """Erase the adapter nodes behind each of ``outputs`` (shared ones once no other site reads them)."""
    for out in outputs:
        base, adapter = _tag(out)["base"], _tag(out)["adapter"]
        add = out
        while _tag(add) and _tag(add).get("name") != "add":
            add = add.args[0]
        # the add's y; an untagged node: a weight-path call's own output (its cast), the fold carries the adapter
        y = add.args[0] if _tag(add) else add
        users = list(out.users)
        out.replace_all_uses_with(y)
        for u in users:  # a weight-path call reads its weight again: the plain linear
            restore_linear(u)
        for n in reversed([n for n in graph.nodes if _tag(n).get("adapter") == adapter and base in _bases(_tag(n))]):
            if n.users:  # shared with another site (share pass): that site still reads it
                n.meta[ADAPTER_KEY]["bases"] = [b for b in _bases(_tag(n)) if b != base]
            else:
                graph.erase_node(n)
