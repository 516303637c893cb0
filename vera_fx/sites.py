"""The Site record: one linear-like call in the graph, read back from the ``node.meta`` tags of the match pass
(plain values: they survive ``Graph.node_copy``), so a Site is always in step with its graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from .versions import adapter_flags

SITE_KEY = "vera_fx_site"
ADAPTER_KEY = "vera_fx"
MODEL_INFO_KEY = "vera_fx_model"  # root gm.meta: what capture recorded of the model (class, modules, output head)
BLOCK_KEY = "vera_fx_block"  # gm.meta of a block graph (a repeated layer as a submodule): {"path", "group"}
BLOCK_CALL_KEY = "vera_fx_block_call"  # node.meta of the root's node that calls a block: the block's path
ADAPTERS = "vera_fx_adapters"  # a graph's adapter set (methods.CONTAINER; sites reads it without importing methods)
LINEAR_KINDS = ("linear", "conv1d", "int8", "nf4", "fp4")


@dataclass
class Candidate:
    """A linear-like call a recogniser of the match pass found, before it is named."""

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
    """A linear-like call an adapter can attach to, named by its module path (a functional call's owner, plus the
    weight's name when the owner makes several); ``weight``: the weight's qualname when the graph reads it."""

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
        """The tensor the site reads now (after an upstream adapter rewired the base call, the adapted value)."""
        return self.base.args[1].args[0] if self.kind == "conv1d" else self.base.args[0]  # addmm(bias, view(x), w)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind == "conv1d"


def module_path(node: Node) -> tuple[str, str]:
    """(path, type name) of the innermost module a node was traced in; ('', '') at the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    path = path.split("@")[0].removeprefix("L['self']").lstrip(".")
    typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
    return path, typ.rsplit(".", 1)[-1]


def registration_order(names: list[str], modules: list[str]) -> list[str]:
    """Site ``names`` in their modules' registration order (PEFT's order of drawing random values); a functional
    call's site goes where its caller is."""
    index = {path: i for i, path in enumerate(modules)}

    def key(name: str) -> int:
        path = name
        while path not in index and "." in path:
            path = path.rsplit(".", 1)[0]
        return index.get(path, len(index))

    return sorted(names, key=key)


def model_info(gm: GraphModule) -> dict[str, Any]:
    """What capture recorded of the model a graph was captured from (empty for other graphs)."""
    return gm.meta.get(MODEL_INFO_KEY) or {}


def block_prefix(gm: GraphModule) -> str:
    """The module path of a block graph in the tree ('' for the root graph)."""
    return (gm.meta.get(BLOCK_KEY) or {}).get("path", "")


def graph_modules(gm: torch.nn.Module) -> list[GraphModule]:
    """Every graph of the tree (of the model object's source graph): the root, then its blocks in order."""
    if not isinstance(gm, GraphModule) and getattr(type(gm), "_vera_fx_source_graph", None) is not None:
        gm = gm._vera_fx_source_graph
    blocks = [m for _, m in gm.named_modules() if m is not gm and isinstance(m, GraphModule) and BLOCK_KEY in m.meta]
    return [gm, *blocks] if isinstance(gm, GraphModule) else blocks


def block_groups(gm: GraphModule) -> dict[int, list[GraphModule]]:
    """Blocks by group (blocks of one group run copies of one exported graph)."""
    groups: dict[int, list[GraphModule]] = {}
    for g in graph_modules(gm)[1:]:
        groups.setdefault(g.meta[BLOCK_KEY]["group"], []).append(g)
    return groups


def adapter_nodes(gm: GraphModule, site: Optional[str] = None, adapter: Optional[str] = None) -> list[Node]:
    """Nodes that adapters added (in every graph of the tree), optionally of one site and/or adapter only."""
    return [n for g in graph_modules(gm) for n in g.graph.nodes if (tag := n.meta.get(ADAPTER_KEY)) is not None
            and site in (None, tag.get("site")) and adapter in (None, tag.get("adapter"))]


def qualified_name(g: GraphModule, target: str) -> str:
    """A name relative to graph ``g`` (a get_attr target) as a name in the root module of its tree."""
    prefix = block_prefix(g)
    return f"{prefix}.{target}" if prefix else str(target)


def relative_name(g: GraphModule, name: str) -> str:
    """A root-module name (a site's path, its weight) relative to graph ``g``: the inverse of ``qualified_name``."""
    prefix = block_prefix(g)
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def read_sites(gm: GraphModule) -> list[Site]:
    """Every tagged site of ``gm``'s tree in call order, with its adapters (merge state and sampling: the root's)."""
    merged = adapter_flags(gm).merged
    sampling: dict[str, tuple[str, ...]] = {}
    for adapter_name, state in (getattr(gm, ADAPTERS, None) or {}).items():
        for site_name in state.method.sampling_sites(state):
            sampling[site_name] = sampling.get(site_name, ()) + (adapter_name,)
    blocks = {block_prefix(g): g for g in graph_modules(gm)[1:]}
    own = {s.base: s for s in read_graph_sites(gm, merged, sampling)}
    result: list[Site] = []
    for n in gm.graph.nodes:
        path = n.meta.get(BLOCK_CALL_KEY)
        if path in blocks:
            result.extend(read_graph_sites(blocks.pop(path), merged, sampling))
        elif n in own:
            result.append(own[n])
    for g in blocks.values():
        result.extend(read_graph_sites(g, merged, sampling))
    return result


def read_graph_sites(gm: GraphModule, merged: Optional[dict] = None, sampling: Optional[dict] = None) -> list[Site]:
    """The tagged sites of ``gm``'s own graph only (not its blocks), in graph order."""
    merged, sampling = merged or {}, sampling or {}
    attached: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get(ADAPTER_KEY)
        if tag and tag.get("role") == "output":
            attached.setdefault(tag["site"], []).append(tag["adapter"])
    sites = []
    for n in gm.graph.nodes:
        if (tag := n.meta.get(SITE_KEY)) is None:
            continue
        users = list(n.users)  # Conv1D's output is the view after its addmm
        view = tag["kind"] == "conv1d" and len(users) == 1 and users[0].target is torch.ops.aten.view.default
        sites.append(Site(name=tag["name"], kind=tag["kind"], in_features=tag["in_features"],
                          out_features=tag["out_features"], weight=tag.get("weight"), bias=tag.get("bias"), base=n,
                          output=users[0] if view else n, adapters=tuple(attached.get(tag["name"], ())),
                          merged=tuple(merged.get(tag["name"], ())), sampling=sampling.get(tag["name"], ())))
    return sites


def site_owners(gm: GraphModule) -> dict[str, list[str]]:
    """Site name -> the adapters holding state there (active, inactive: no nodes while switched off, or merged)."""
    owners: dict[str, list[str]] = {}
    for name, state in (getattr(gm, ADAPTERS, None) or {}).items():
        for site_name in state.site_names:
            owners.setdefault(site_name, []).append(name)
    return owners


def adapted_sites(gm: GraphModule, adapter_name: Optional[str] = None) -> list[Site]:
    """The sites that carry an adapter (of ``adapter_name`` only, when given), one per site name."""
    owners = site_owners(gm)
    seen: dict[str, Site] = {}
    for s in read_sites(gm):
        names = {*s.adapters, *s.merged, *owners.get(s.name, ())}
        if names and (adapter_name is None or adapter_name in names):
            seen.setdefault(s.name, s)
    return list(seen.values())


def as_graph_module(obj: Any, fn: str = "this function") -> GraphModule:
    """The GraphModule holding ``obj``'s adapter state: ``obj``, the one inside ``torch.compile``, or the model
    object's source graph."""
    inner = getattr(obj, "_orig_mod", obj)
    if not isinstance(inner, GraphModule):
        inner = getattr(type(inner), "_vera_fx_source_graph", None) is not None and inner._vera_fx_source_graph
    if not isinstance(inner, GraphModule):
        raise TypeError(f"{fn} takes the model vera_fx.transform returns (a VeraFxModel), its GraphModule "
                        f"(m.graph_module) or torch.compile of either; got {type(obj).__name__}")
    return inner
