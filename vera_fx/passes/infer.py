"""The inference form of a graph's adapters: what a graph run in eval mode or without gradients computes.

A graph built for inference (root ``gm.meta["vera_fx_inference"]`` names the form: the model object's twins and
generation's decode graphs) keeps nothing for backward. Per site group (one adapter's sites reading one
``h = x @ A.T`` and one slice of ``B``) it calls vera_fx/methods/lean.py: one ``group_products`` before the
group's first add and a ``site_add`` per site (a lone site: one ``site_apply``). The products are per site, back to
back, so ``B`` is read again from cache (the default ``form="site"``), or with ``form="batched"`` one product over
the stacked rows (``B`` read once). PVeRA's sites reading one ``x`` share ``pvera_group_h`` and take
``pvera_latent`` each.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from torch.fx import GraphModule, Node

from ..methods.lean import group_products, latent_products, site_add, site_apply
from ..methods.pvera import pvera_group_h, pvera_latent
from ..sites import ADAPTER_KEY, graph_modules
from .chains import Chain, hoist, inplace_target, retarget, tag_node

logger = logging.getLogger(__name__)

INFERENCE_KEY = "vera_fx_inference"  # root gm.meta: the inference form this graph tree is built in
FLAT_KEY = "vera_fx_flat_reads"  # each graph's meta in an inference tree: {flat name: owner module path}
FORMS = ("batched", "site")
# ``m.inference_form``'s default: on the 2-core CPU (hidden 1024, r=256, decode) a group's per-site products back
# to back measured 0.89-0.94x PEFT, the stacked product 0.91-0.95x, each product at its site's add 0.93-0.94x.
DEFAULT_FORM = "site"
CALL_COST = 4096  # multiply-add equivalents of one eager op call (~5-10 us on the 2-core CPU, ~1 GMAC/s/core)


def inference_costs(tokens: int, r: int, out: int, n: int) -> dict[str, int]:
    """Multiply-add equivalents of ``n`` sites (``out`` wide, one ``B`` slice, rank ``r``) at ``tokens`` tokens
    per call, per form: the products, one per value of ``B`` read, ``CALL_COST`` per call. (Folding dW per call,
    ``out r in``, would pay only when ``tokens > in``.)"""
    products = n * tokens * r * out
    return {"site": products + n * out * r + 3 * n * CALL_COST,
            "batched": products + out * r + n * r + (n + 5) * CALL_COST}


def inference_plan(tokens: int, r: int, out: int, n: int, form: str = "batched") -> str:
    """The plan of one group: ``"site"`` for a lone site; ``"batched"`` (one stacked product) when asked and it
    costs less; else ``"adjacent"`` (per-site products, back to back)."""
    if n < 2:
        return "site"
    costs = inference_costs(tokens, r, out, n)
    return "batched" if form == "batched" and costs["batched"] < costs["site"] else "adjacent"


def _tail(gm: GraphModule, members: list[Chain], plan: str) -> None:
    """A VeRA group's products from its ``h``: one ``group_products`` (``stacked`` for ``plan="batched"``) then a
    ``site_add`` per site; a lone site's one ``site_apply`` in place of its add."""
    h, _, b, _ = members[0].operands
    if plan == "site":
        for c in members:
            _site_apply(c, h, c.operands[1])
    else:
        _products(gm, members, group_products, (h, b, *[c.operands[1] for c in members]),
                  {"stacked": plan == "batched"})
    for c in members:
        c.erase(gm.graph, ("scale_b", "xAB", "scale_d"))


def _products(gm: GraphModule, members: list[Chain], target: Callable, args: tuple, kwargs: dict) -> None:
    """One ``target(*args)`` node before the first of the members' adds (its inputs moved up where they come
    later): the members' products as a tuple, each add one ``site_add`` of its element."""
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    first = min((c.add for c in members), key=order.__getitem__)
    hoist([a for a in args if isinstance(a, Node)], first)
    with graph.inserting_before(first):
        u = graph.call_function(target, args, kwargs)
    tag_node(u, members[0], "adapter", "products", "inference")
    u.meta[ADAPTER_KEY]["bases"] = [c.site.base.name for c in members]
    for k, c in enumerate(members):
        y = c.add.args[0]
        retarget(c.add, site_add, (y, u, k, c.operands[3], inplace_target(y)), "inference")


def _site_apply(c: Chain, h: Node, lam_d: Optional[Node]) -> None:
    """Chain ``c``'s add becomes one ``site_apply`` from ``h`` (and ``lambda_d``, None for PVeRA's latent)."""
    y, (_, _, b, lam_b) = c.add.args[0], c.operands
    retarget(c.add, site_apply, (y, h, b, lam_d, lam_b, inplace_target(y)), "inference")


def _lower_pvera(gm: GraphModule, chains: list[Chain]) -> None:
    """PVeRA's sites reading one ``h``: ``h`` becomes ``pvera_group_h`` (no other graph for sampling switches),
    each site's sampling one ``pvera_latent``; the products of sites reading one ``B`` slice back to back
    (``latent_products``), a lone site's one ``site_apply``."""
    graph, h, r = gm.graph, chains[0].h, chains[0].state.config.r
    (x, a), training = h.args[:2], chains[0].nodes["sample"].args[2]
    switches = [c.nodes["sample"].args[3] for c in chains]
    hoist((training, *switches), h)
    retarget(h, pvera_group_h, (x, a, r, training, *switches), "inference")
    by_b: dict[str, list[tuple[Chain, Node]]] = {}
    for c in chains:
        nd = c.nodes
        with graph.inserting_before(nd["xAB"]):  # after the KL record's inputs
            z = graph.call_function(pvera_latent, (h, c.operands[1], r, *nd["sample"].args[2:6],
                                                   *nd["kl"].args[2:4], x, a))
        tag_node(z, c, "sampling", "latent", "inference")
        nd["sample"].replace_all_uses_with(z)
        by_b.setdefault(_key(c.operands[2]), []).append((c, z))
    for pairs in by_b.values():
        if len(pairs) == 1:
            _site_apply(*pairs[0], None)
        else:
            members = [c for c, _ in pairs]
            _products(gm, members, latent_products, (members[0].operands[2], *[z for _, z in pairs]), {})
    for c in chains:
        c.erase(graph, ("kl", "scale_b", "xAB", "sample", "mu", "logvar", "scale_d"))


def _key(b: Any) -> str:
    """A ``B`` slice operand as a grouping key (a node, or a constant)."""
    return b.name if isinstance(b, Node) else repr(b)


def lower_for_inference(gm: GraphModule, chains: list[Chain], form: str = "batched",
                        tokens: Optional[int] = None) -> int:
    """Give every chain of ``gm`` its inference form (``"batched"`` or ``"site"``); returns how many site calls
    changed. ``tokens``: per call, as the plan assumes (1, decoding, when not given)."""
    if form not in FORMS:
        raise ValueError(f"inference form {form!r} is not one of {list(FORMS)}")
    groups: dict[tuple, list[Chain]] = {}
    for c in chains:  # a group: one h, one adapter, one B slice (PVeRA: one h)
        key: tuple = (c.h.name, c.adapter)
        if not c.state.method.probabilistic:
            key += (_key(c.operands[2]),)
        groups.setdefault(key, []).append(c)
    for members in groups.values():
        st = members[0].state
        if st.method.probabilistic:
            _lower_pvera(gm, members)
            plan = "site"
        else:
            plan = inference_plan(tokens or 1, st.config.r, members[0].site.out_features, len(members), form)
            _tail(gm, members, plan)
        logger.debug("lower (inference): %s at %s (%d sites): %s", members[0].adapter, members[0].site.name,
                     len(members), plan)
    return len(chains)


def flatten_reads(gm: GraphModule) -> None:
    """Make each graph of the inference tree ``gm`` read a deep attribute (six ``__getattr__`` calls, ~1 ms a
    forward of 4 layers at one token) through its owner module in the graph's instance dict
    (``self.vera_fx_read_3.vera_lambda_d``: a replaced tensor is still read live; ``bind_flat_reads``)."""
    for g in graph_modules(gm):
        names: dict[str, str] = g.meta.setdefault(FLAT_KEY, {})
        by_path = {path: flat for flat, path in names.items()}
        reads = [n for n in g.graph.nodes if n.op == "get_attr" and n.target.count(".") >= 2]
        for n in reads:
            owner, _, leaf = n.target.rpartition(".")
            if owner not in by_path:
                by_path[owner] = f"vera_fx_read_{len(names)}"
                names[by_path[owner]] = owner
            n.target = f"{by_path[owner]}.{leaf}"
        bind_flat_reads(g, recurse=False)
        if reads:
            g.recompile()


def bind_flat_reads(gm: GraphModule, recurse: bool = True) -> None:
    """Put the owner module of every flattened read in its graph's instance dict, as the tree holds it now."""
    for g in graph_modules(gm) if recurse else [gm]:
        for flat, path in g.meta.get(FLAT_KEY, {}).items():
            try:
                g.__dict__[flat] = g.get_submodule(path)
            except AttributeError:  # a path of another version of the tree (an adapter since deleted)
                g.__dict__.pop(flat, None)
