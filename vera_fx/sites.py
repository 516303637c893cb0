"""The Site record: one linear-like call in the graph, and how to read sites back from a graph.

The match pass tags each site's base call node with ``node.meta["vera_fx_site"]`` (a small dict of plain
values, so it survives ``Graph.node_copy``); everything else (the input and output nodes) is derived from
the graph's structure, so a Site is always in step with the graph it was read from.
Adapter nodes carry ``node.meta["vera_fx"] = {"site", "adapter", "role"}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

__all__ = ["as_graph_module", "Site", "Candidate", "SITE_KEY", "ADAPTER_KEY", "MERGED_KEY", "read_sites", "site_of",
           "site_output", "site_input",
           "adapter_nodes", "LINEAR_KINDS", "adapted_sites"]

SITE_KEY = "vera_fx_site"
ADAPTER_KEY = "vera_fx"
# gm.meta key written by the merge pass: site name -> names of the adapters folded into its weight.
MERGED_KEY = "vera_fx_merged"

# Kinds of site: dense kinds are merged by adding to the weight; quantized kinds come from bitsandbytes.
LINEAR_KINDS = ("linear", "conv1d", "int8", "nf4", "fp4")


@dataclass
class Candidate:
    """A linear-like call found by a recogniser of the match pass, before it is named.

    Recognisers (``vera_fx.passes.match.RECOGNISERS``: dense linears, Conv1D, the quantized kinds of
    vera_fx/quantized.py) map a node to a Candidate or None; the record lives here so that a recogniser
    outside the passes needs nothing from them.
    """

    node: Node
    kind: str
    owner: str  # innermost module path
    owner_type: str
    in_features: int
    out_features: int
    weight: Optional[str]
    bias: Optional[str]


@dataclass(frozen=True)
class Site:
    """A linear-like call that an adapter can attach to.

    ``name`` is the module path as in ``model.named_modules()`` (for a functional ``F.linear`` call, its
    owner's path, plus the weight's attribute name when the owner makes several calls). ``weight`` is the
    qualified name of the weight parameter when the graph reads it directly (needed to merge).
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    weight: Optional[str]
    bias: Optional[str]
    base: Node = field(compare=False, repr=False)
    output: Node = field(compare=False, repr=False)
    adapters: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()
    sampling: tuple[str, ...] = ()

    @property
    def input(self) -> Node:
        """The tensor the site reads *now*: read from the base call each time, so that after an upstream site's
        adapter was added (and the base call rewired to read it) this is the adapted value, not a stale node."""
        return site_input(self.base, self.kind)

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the weight is stored (in_features, out_features), as in GPT-2's Conv1D."""
        return self.kind == "conv1d"


def site_input(base: Node, kind: str) -> Node:
    """The tensor the site reads: the argument before Conv1D's flattening view, else the first argument."""
    if kind == "conv1d":
        return base.args[1].args[0]  # addmm(bias, view(x), weight)
    return base.args[0]


def site_output(base: Node, kind: str) -> Node:
    """The node whose value is the site's output (before any adapter is added)."""
    if kind == "conv1d":
        users = list(base.users)
        if len(users) == 1 and users[0].target is torch.ops.aten.view.default:
            return users[0]
    return base


def site_of(node: Node) -> Optional[dict[str, Any]]:
    return node.meta.get(SITE_KEY)


def adapter_nodes(gm: GraphModule, site: Optional[str] = None, adapter: Optional[str] = None) -> list[Node]:
    """Nodes that adapters added, optionally only those of one site and/or adapter."""
    out = []
    for n in gm.graph.nodes:
        tag = n.meta.get(ADAPTER_KEY)
        if tag is None:
            continue
        if site is not None and tag.get("site") != site:
            continue
        if adapter is not None and tag.get("adapter") != adapter:
            continue
        out.append(n)
    return out


def read_sites(gm: GraphModule) -> list[Site]:
    """Every tagged site of ``gm`` in graph order, with the adapters attached to it."""
    attached: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get(ADAPTER_KEY)
        if tag and tag.get("role") == "output":
            attached.setdefault(tag["site"], []).append(tag["adapter"])
    merged: dict[str, tuple[str, ...]] = gm.meta.get(MERGED_KEY) or {}
    sampling: dict[str, tuple[str, ...]] = {}
    for adapter_name, state in _adapter_states(gm):
        for site_name in state.method.sampling_sites(state):
            sampling.setdefault(site_name, ())
            sampling[site_name] += (adapter_name,)
    result = []
    for n in gm.graph.nodes:
        tag = site_of(n)
        if tag is None:
            continue
        result.append(Site(name=tag["name"], kind=tag["kind"], in_features=tag["in_features"],
                           out_features=tag["out_features"], weight=tag.get("weight"), bias=tag.get("bias"),
                           base=n, output=site_output(n, tag["kind"]),
                           adapters=tuple(attached.get(tag["name"], ())),
                           merged=tuple(merged.get(tag["name"], ())),
                           sampling=sampling.get(tag["name"], ())))
    return result


def _adapter_states(gm: GraphModule) -> list[tuple[str, Any]]:
    container = getattr(gm, "vera_fx_adapters", None)
    return list(container.items()) if container is not None else []


def adapted_sites(gm: GraphModule, adapter_name: Optional[str] = None) -> list[Site]:
    """The sites that carry an adapter (of ``adapter_name`` only, when given), one per site name.

    An adapter counts whether it is active, inactive (no nodes while switched off) or merged.
    """
    owners: dict[str, list[str]] = {}
    for name, state in _adapter_states(gm):
        for site_name in state.site_names:
            owners.setdefault(site_name, []).append(name)
    seen: dict[str, Site] = {}
    for s in read_sites(gm):
        names = set(s.adapters) | set(s.merged) | set(owners.get(s.name, ()))
        if s.name in seen or not names or (adapter_name is not None and adapter_name not in names):
            continue
        seen[s.name] = s
    return list(seen.values())


def as_graph_module(obj: Any, fn: str = "this function") -> GraphModule:
    """The GraphModule that holds the adapter state of ``obj``: ``obj`` itself, the GraphModule inside a
    ``torch.compile`` wrapper, or the source graph of the model object ``vera_fx.transform`` returns."""
    inner = getattr(obj, "_orig_mod", obj)
    if not isinstance(inner, GraphModule):
        inner = getattr(type(inner), "_vera_fx_source_graph", None) is not None and inner._vera_fx_source_graph
    if not isinstance(inner, GraphModule):
        raise TypeError(f"{fn} takes the model vera_fx.transform returns (a VeraFxModel), its GraphModule "
                        f"(m.graph_module) or torch.compile of either; got {type(obj).__name__}")
    return inner
