"""The plain adapter chains that the lower pass and the inference form rewrite (one site call's nodes after
``h``, handed over by the emitter, never searched for by tag), and the node surgery they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import Graph, Node

from ..methods.fold import weight_site, weight_site_t
from ..methods.lean import fused_site, lean_site
from ..sites import ADAPTER_KEY, Site

aten = torch.ops.aten

# Tag names of the emitter's per-site chain after h (Method.emit, PVeRA's emit_latent).
CHAIN_NAMES = frozenset({"scale_d", "mu", "logvar", "sample", "kl", "xAB", "scale_b"})

# Calls whose output a site's tail may write into: their backward does not read their output (the base linear
# or Conv1D addmm, a folding call, an earlier adapter's sum).
_INPLACE_BASES = {aten.linear.default, aten.addmm.default, aten.add.Tensor, weight_site, weight_site_t, lean_site,
                  fused_site}


@dataclass
class Chain:
    """One site call's plain adapter nodes after h by tag name (``Emitter.nodes``), with its site and adapter state."""

    site: Site
    adapter: str
    state: Any
    nodes: dict[str, Node]

    def __post_init__(self) -> None:
        self.nodes = {k: v for k, v in self.nodes.items() if k in CHAIN_NAMES}

    @property
    def h(self) -> Node:
        return self.nodes["scale_d"].args[0]

    @property
    def add(self) -> Node:
        return next(iter(self.nodes["scale_b"].users))

    @property
    def operands(self) -> tuple[Node, Node, Node, Node]:
        """``h``, ``lambda_d``, ``B`` and ``lambda_b``."""
        return (*self.nodes["scale_d"].args, self.nodes["xAB"].args[1], self.nodes["scale_b"].args[1])

    def erase(self, graph: Graph, names: Iterable[str]) -> None:
        """Erase the chain's nodes ``names`` (users first), then the sampling switches left without a reader."""
        inputs: list[Node] = []
        for name in names:
            inputs += [a for a in self.nodes[name].all_input_nodes
                       if a.op == "get_attr" and (a.meta.get(ADAPTER_KEY) or {}).get("role") == "sampling"]
            graph.erase_node(self.nodes[name])
        for a in dict.fromkeys(inputs):
            if not a.users:
                graph.erase_node(a)


def inplace_target(y: Node) -> bool:
    """Whether a site's tail may add in place into ``y``: its only reader, of a call whose backward ignores it."""
    return len(y.users) == 1 and y.op == "call_function" and y.target in _INPLACE_BASES


def tag_node(node: Node, c: Chain, role: str, name: str, path: str) -> Node:
    """Tag ``node`` as chain ``c``'s adapter node (what inspection, merge and node removal read)."""
    node.meta[ADAPTER_KEY] = {"site": c.site.name, "adapter": c.adapter, "role": role, "base": c.site.base.name,
                              "name": name, "path": path}
    return node


def retarget(node: Node, fn: Callable[..., Any], args: tuple, path: Optional[str] = None) -> None:
    """Make ``node`` a call of ``fn`` on ``args``, tagged with the lowering ``path`` when given (its name and tags
    stay: node removal reads ``y`` as an add's ``args[0]``)."""
    node.target, node.args, node.kwargs = fn, args, {}
    if path is not None:
        node.meta[ADAPTER_KEY]["path"] = path


def hoist(nodes: Iterable[Node], before: Node) -> None:
    """Move ``nodes`` (and the inputs they need) in front of ``before`` where they come after it."""
    order = {n: k for k, n in enumerate(before.graph.nodes)}  # the positions before any move
    moved: set[Node] = set()

    def move(node: Node) -> None:
        if order[node] < order[before] or node in moved:
            return
        for arg in node.all_input_nodes:
            move(arg)
        before.prepend(node)
        moved.add(node)

    for n in nodes:
        move(n)
