"""Share pass: compute each deterministic adapter node once (x·Aᵀ once for sites that share an input).

Sites that read the same tensor (q/k/v projections, gate/up) each emit ``get_attr A -> slice -> linear(x, A)``
for the same adapter; this pass keeps the first of each identical node and points the others' users at it,
so the projection and, in backward, its input gradient are computed once per input and adapter. Only
adapter nodes of deterministic ops are merged: dropout and sampling stay per site.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..sites import ADAPTER_KEY, graph_modules

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops that give the same result for the same arguments (no RNG, no side effects).
_PURE = {aten.slice.Tensor, aten._to_copy.default, aten.linear.default}


def _key(node: Node) -> Hashable:
    def freeze(a: Any) -> Hashable:
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, torch.dtype):
            return str(a)
        return a

    return node.op, node.target, freeze(node.args), freeze(node.kwargs)


def share_projections(gm: GraphModule, recompile: bool = True) -> int:
    """Merge identical deterministic adapter nodes in place; returns how many nodes were removed.
    ``recompile=False`` leaves linting and recompiling to the caller (who changes the graph anyway)."""
    seen: dict[Hashable, Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        tag = node.meta.get(ADAPTER_KEY)
        if not tag or tag.get("role") not in ("projection", "adapter"):
            continue
        if not (node.op == "get_attr" or (node.op == "call_function" and node.target in _PURE)):
            continue
        if node.op == "call_function" and node.target is aten.linear.default and tag.get("name") != "xA":
            continue  # only the input projection is shared; per-site products stay per site
        key = _key(node)
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        first_tag = first.meta[ADAPTER_KEY]
        first_tag["bases"] = sorted(set(first_tag.get("bases", [first_tag["base"]])) | {tag["base"]}
                                    | set(tag.get("bases", [])))
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        removed += 1
    if removed and recompile:
        gm.graph.lint()
        gm.recompile()
    logger.debug("share: %d duplicate adapter nodes removed", removed)
    return removed


class SharePass(PassBase):
    """The share pass as a torch.fx pass."""

    def call(self, graph_module: GraphModule) -> PassResult:
        removed = sum(share_projections(g) for g in graph_modules(graph_module))
        return PassResult(graph_module, removed > 0)
