"""Attach pass: bind a captured and matched graph to the adapter state of the model object's source graph.

``attach_adapters`` makes the graph compute what the source computes: its base parameters, buffers and
bitsandbytes layers become the source's objects (by qualified name), it holds the very same adapter container
(so the same lambdas and run-time flags), the source's ``modules_to_save`` routing and the source's adapter
nodes, site by site in the same order. Attaching again after a switch puts back the tree's version for the new
state (built once, vera_fx/versions.py); tensors are bound again only when a base tensor or module was replaced
(``base_stamp``), states registered again only when they changed.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, Optional

import torch
from torch.fx import GraphModule

from ..methods import CONTAINER
from ..quantized import rebind_layers
from ..sites import ADAPTER_KEY, block_prefix, graph_modules
from ..versions import adapter_flags
from ..state import (MTS_TAG, active_adapters, adapters_disabled, adapters_of, adapters_training, attach_state,
                     set_adapters_training)
from .infer import INFERENCE_KEY, bind_flat_reads, flatten_reads
from .inject import emit_adapter, remove_adapter_nodes

logger = logging.getLogger(__name__)


def state_fingerprint(gm: GraphModule) -> tuple:
    """A cheap value that changes whenever the adapter nodes ``gm`` should carry change (adapters added or
    deleted, the active list, disabled, merged, lowering). Sampling switches and values are read at run time."""
    return tuple((n, id(s)) for n, s in adapters_of(gm).items()), adapter_flags(gm).key()


_SLOTS: "weakref.WeakKeyDictionary[GraphModule, tuple[list[dict], tuple]]" = weakref.WeakKeyDictionary()


def base_stamp(source: GraphModule) -> tuple:
    """The identities of every module, parameter and buffer of ``source``'s tree but its adapter state: changes
    whenever one is replaced (merge, load, ``.to()``). Tens of microseconds; walks the tree only after a change."""
    dicts, stamp = _SLOTS.get(source, ((), None))
    now = tuple(id(v) for d in dicts for v in d.values())
    if now == stamp:
        return now
    dicts, todo = [], [source]
    while todo:  # every _modules / _parameters / _buffers dict of the tree, not those of adapter containers
        mod = todo.pop()
        dicts += [mod._modules, mod._parameters, mod._buffers]
        todo += [c for k, c in mod._modules.items() if c is not None and k != CONTAINER]
    _SLOTS[source] = (dicts, tuple(id(v) for d in dicts for v in d.values()))
    return _SLOTS[source][1]


def strip_adapters(gm: GraphModule) -> int:
    """Remove every adapter's nodes (state or not) from ``gm``'s tree; returns how many adapters had nodes."""
    names = [a for a in dict.fromkeys((n.meta.get(ADAPTER_KEY) or {}).get("adapter")
                                      for g in graph_modules(gm) for n in g.graph.nodes) if a is not None]
    for name in names:
        remove_adapter_nodes(gm, name)
    return len(names)


def bind_tensors(dst: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                 undo: Optional[list] = None) -> int:
    """The one tensor binder: make ``dst``'s parameter or buffer of each name the given tensor, where ``dst`` has
    that name with no tensor or one of the same type and shape (other names are skipped). Returns how many
    changed; each change is appended to ``undo`` as (store, name, old tensor)."""
    count = 0
    for qualname, value in tensors:
        path, _, leaf = qualname.rpartition(".")
        try:
            mod = dst.get_submodule(path)
        except AttributeError:
            continue
        store = next((st for st in (mod._parameters, mod._buffers) if leaf in st), None)
        old = None if store is None else store[leaf]
        if store is None or old is value or (old is not None and (type(old) is not type(value)
                                                                  or old.shape != value.shape)):
            continue
        if undo is not None:
            undo.append((store, leaf, old))
        store[leaf] = value
        count += 1
    return count


def _rebind(gm: GraphModule, source: GraphModule) -> int:
    """Make ``gm``'s bitsandbytes layers, base parameters and buffers the source's objects, name by name."""
    named = [*source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)]
    # not the root's adapter container or a block's views of it
    return rebind_layers(gm, source) + bind_tensors(gm, ((n, t) for n, t in named if CONTAINER not in n.split(".")))


def _route_modules_to_save(gm: GraphModule, source: GraphModule) -> None:
    """Give the get_attr nodes of every graph of ``gm``'s tree the ``modules_to_save`` tags and current targets
    of the source's graph at the same path (a block's targets are relative to the block)."""
    routes: dict[tuple[str, str], tuple[dict, str]] = {}
    for g in graph_modules(source):
        for n in g.graph.nodes:
            tag = n.meta.get(MTS_TAG)
            if n.op == "get_attr" and tag is not None:
                routes[(block_prefix(g), tag["target"])] = (tag, n.target)
    if not routes:
        return
    for g in graph_modules(gm):
        prefix = block_prefix(g)
        for n in (n for n in g.graph.nodes if n.op == "get_attr"):
            route = routes.get((prefix, (n.meta.get(MTS_TAG) or {}).get("target", n.target)))
            if route is not None:
                n.meta[MTS_TAG], n.target = dict(route[0]), route[1]


def attach_adapters(gm: GraphModule, source: GraphModule, before: Optional[tuple] = None,
                    rebind: bool = True) -> GraphModule:
    """Make ``gm`` (captured and matched from the same model) compute what ``source`` computes, over its adapter
    state, in place. ``before``: the source's ``state_fingerprint`` ``gm`` was attached at last (None: never);
    ``rebind=False``: no base tensor was replaced since (``base_stamp``)."""
    container = getattr(source, CONTAINER, None)
    fp = state_fingerprint(source)
    same_states = (before is not None and container is not None and before[0] == fp[0]
                   and gm._modules.get(CONTAINER) is container)
    rebound = _rebind(gm, source) if rebind or before is None else 0
    if not same_states:
        for g in graph_modules(gm)[1:]:  # stale block views of an earlier attach
            g._modules.pop(CONTAINER, None)
        if container is None:
            gm._modules.pop(CONTAINER, None)
            strip_adapters(gm)
            gm.recompile()
            return gm
        gm.add_module(CONTAINER, container)
        for name, state in container.items():  # the same states; views of them in gm's own blocks
            attach_state(gm, name, state)
    container.versions.switch(gm, graph_modules(gm), before, fp, lambda: _emit_like(gm, source))
    # the modes as the source's (new states: set on every module, even where the root agrees)
    if not same_states or gm.training != source.training:
        gm.train(source.training)
    if not same_states or adapters_training(gm) != adapters_training(source):
        set_adapters_training(gm, adapters_training(source))
    bind_flat_reads(gm)
    logger.debug("attach: %d tensors rebound", rebound)
    return gm


def _emit_like(gm: GraphModule, source: GraphModule) -> None:
    """Give ``gm``'s tree the source's ``modules_to_save`` routing and adapter nodes."""
    _route_modules_to_save(gm, source)
    gm.recompile()  # the routed get_attr targets, where no emission below recompiles
    emit_layout(gm, live_layout(source))


def live_layout(gm: GraphModule) -> list[tuple[str, tuple[str, ...]]]:
    """(adapter, sites to emit) for every live adapter of ``gm``: active, not disabled, not merged there. The source
    graph holds these nodes, in this order (the active list's: the sum's order at every site)."""
    container = adapters_of(gm)
    if not len(container) or adapters_disabled(gm):
        return []
    merged = adapter_flags(gm).merged
    layout = [(name, tuple(s for s in container[name].site_names if name not in merged.get(s, ())))
              for name in active_adapters(gm)]
    return [(name, sites) for name, sites in layout if sites]


def emit_layout(gm: GraphModule, layout: Iterable[tuple[str, Iterable[str]]]) -> None:
    """The one emission of every graph built from a template (signature graphs, twins, decode and site graphs):
    exactly ``layout``'s adapter nodes, in the form ``gm`` is built for (an inference tree: its deep reads then
    through one lookup, ``flatten_reads``)."""
    strip_adapters(gm)
    for name, sites in layout:
        emit_adapter(gm, name, set(sites))
    if INFERENCE_KEY in gm.meta:
        flatten_reads(gm)
