"""The plain adapter chains the training lowering (lower.py) and the inference form (infer.py) rewrite: one site
call's emitted nodes after ``h``, handed over by the emitter (never searched for by tag), and the node moves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from ..methods.fold import weight_site, weight_site_t
from ..methods.fused import fused_site
from ..methods.lean import lean_site
from ..sites import ADAPTER_KEY, Site

aten = torch.ops.aten

# Tag names of the emitter's per-site chain after h (vera_fx/methods/{vera,pvera}.py).
CHAIN_NAMES = frozenset({"scale_d", "mu", "logvar", "sample", "kl", "xAB", "scale_b"})

# Calls whose output a site's tail may write into: their backward does not read their output (the base linear
# or Conv1D addmm, a folding call, an earlier adapter's sum).
_INPLACE_BASES = {aten.linear.default, aten.addmm.default, aten.add.Tensor, weight_site, weight_site_t, lean_site,
                  fused_site}


@dataclass
class Chain:
    """One site call's plain adapter nodes after h, by tag name, with its site record and adapter state."""

    site: Site
    adapter: str
    state: Any
    nodes: dict[str, Node]

    @property
    def h(self) -> Node:
        return self.nodes["scale_d"].args[0]

    @property
    def add(self) -> Node:
        return next(iter(self.nodes["scale_b"].users))


def emitted_chain(site: Site, adapter: str, state: Any, nodes: dict[str, Node]) -> Optional[Chain]:
    """The chain of one site call's nodes as the emitter made them (``Emitter.nodes``), or None when they are
    not a plain chain a lowering can rewrite (an output read by more than the site's add)."""
    need = {"scale_d", "xAB", "scale_b"} | ({"mu", "logvar", "sample", "kl"} if state.method.probabilistic else set())
    if not need <= set(nodes) or len(nodes["scale_b"].users) != 1:
        return None
    return Chain(site, adapter, state, {k: v for k, v in nodes.items() if k in CHAIN_NAMES})


def inplace_target(y: Node) -> bool:
    """Whether a site's tail may add in place into ``y``: its only reader, of a call whose backward ignores it."""
    return len(y.users) == 1 and y.op == "call_function" and y.target in _INPLACE_BASES


def tag_node(node: Node, c: Chain, role: str, name: str, path: str) -> Node:
    """Tag ``node`` as chain ``c``'s adapter node (what inspection, merge and node removal read)."""
    node.meta[ADAPTER_KEY] = {"site": c.site.name, "adapter": c.adapter, "role": role, "base": c.site.base.name,
                              "name": name, "path": path}
    return node


def hoist(node: Node, before: Node, order: dict[Node, int], moved: set[Node]) -> None:
    """Move ``node`` (and the inputs it needs) in front of ``before`` when it comes after it (``order``: the
    graph's node positions before any move; ``moved``: the nodes moved since)."""
    if order[node] < order[before] or node in moved:
        return
    for arg in node.all_input_nodes:
        hoist(arg, before, order, moved)
    before.prepend(node)
    moved.add(node)
