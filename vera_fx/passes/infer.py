"""The inference form of a graph's adapters: what a graph run in eval mode or without gradients computes.

A graph built for inference (its root's ``gm.meta["vera_fx_inference"]`` names the form; the model object
builds such a twin of each captured graph, vera_fx/variants.py) never runs a training plan: nothing is saved
for backward, so the lean, fused and weight paths' trade-offs do not apply. Per site group (the sites of one
adapter that read one ``h = x @ A.T`` and one slice of ``B``) the lower pass emits the calls of
vera_fx/methods/infer.py: one ``group_products`` node (every site's ``h * lambda_d`` at once, one ``mm``
against ``B``) and per site a ``site_add`` (``y + u[k] * lambda_b``, in place into the base output where
allowed). PVeRA's sites keep their sampling nodes (``sample_at_inference`` is a run-time switch) and take
``latent_products`` from their latent, one site at a time.

The cost model (``inference_costs``), per group of ``n`` sites of width ``out`` reading one ``B`` slice
(``out x r``) with ``T`` tokens per call: both forms make the same ``n T r out`` multiply-adds; the per-site
form reads ``B`` ``n`` times and makes ``3 n`` calls (scale, product, add), the batched form reads it once and
makes ``n + 5`` (stack, view, scale, product, unbind; the adds) and forms ``n r`` values more (the stacked
``lambda_d``). A call is priced at ``CALL_COST`` multiply-add equivalents, a value of ``B`` read at one. So a
group of three batches at any width, a pair where ``B`` is larger than a call (``out r`` above about 4096:
every real model), never a single site. ``form="site"`` (for measurement) keeps every group per site. Folding
``dW`` into ``W`` per call (the training weight path) would cost ``out r in`` multiply-adds and a pass over
``out x in`` values: it pays only when ``T > in``, and is not an inference form here.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch.fx import GraphModule, Node

from ..methods.infer import group_products, latent_products, site_add, site_products
from ..sites import ADAPTER_KEY
from .chains import Chain, hoist, inplace_target, tag_node

logger = logging.getLogger(__name__)

INFERENCE_KEY = "vera_fx_inference"  # root gm.meta: the inference form this graph tree is built in
FORMS = ("batched", "site")
# The form graphs are built in unless the object says otherwise (``m.inference_form``). Per site: on the 2-core
# CPU (quiet, benchmarks/inference.py, Llama-like hidden 1024, r=256) the batched form's stack and unbind cost
# more than reading B once saves: per-site products ran 0.96-0.98x the batched form's time at decode, 0.99x at
# prefill, for every group; the batched form stays selectable for measurement (and devices with costlier calls).
DEFAULT_FORM = "site"
CALL_COST = 4096  # multiply-add equivalents of one eager op call (~5-10 us on the 2-core CPU, ~1 GMAC/s/core)


def inference_costs(tokens: int, r: int, out: int, n: int) -> dict[str, int]:
    """Multiply-add equivalents of ``n`` sites (``out`` wide, one ``B`` slice, rank ``r``) at ``tokens`` tokens
    per call, per form: the products, one value per value of ``B`` read, ``CALL_COST`` per call."""
    products = n * tokens * r * out
    return {"site": products + n * out * r + 3 * n * CALL_COST,
            "batched": products + out * r + n * r + (n + 5) * CALL_COST}


def inference_plan(tokens: int, r: int, out: int, n: int, form: str = "batched") -> str:
    """The form of one group: ``"site"`` when asked or when batching does not cost less (a single site)."""
    if form == "site" or n < 2:
        return "site"
    costs = inference_costs(tokens, r, out, n)
    return "batched" if costs["batched"] < costs["site"] else "site"


def _lower_batched(gm: GraphModule, members: list[Chain]) -> None:
    """One ``group_products`` node for VeRA sites sharing ``h`` and ``B``, then a ``site_add`` per site."""
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    first = min((c.add for c in members), key=order.__getitem__)
    h, b = members[0].h, members[0].nodes["xAB"].args[1]
    lambdas = [c.nodes["scale_d"].args[1] for c in members]
    moved: set[Node] = set()
    for n in (h, b, *lambdas):
        hoist(n, first, order, moved)
    with graph.inserting_before(first):
        u = graph.call_function(group_products, (h, b, *lambdas))
    tag_node(u, members[0], "adapter", "products", "inference")
    u.meta[ADAPTER_KEY]["bases"] = [c.site.base.name for c in members]
    for k, c in enumerate(members):
        _retarget_add(c, u, k)
        for name in ("scale_b", "xAB", "scale_d"):
            graph.erase_node(c.nodes[name])


def _lower_site(gm: GraphModule, c: Chain) -> None:
    """One site alone: VeRA's ``site_products``, PVeRA's ``latent_products`` of its latent."""
    graph, nd = gm.graph, c.nodes
    b = nd["xAB"].args[1]
    probabilistic = c.state.method.probabilistic
    with graph.inserting_before(c.add):
        if probabilistic:  # the sampling nodes stay: sample_at_inference is read at run time
            u = graph.call_function(latent_products, (b, nd["xAB"].args[0]))
        else:
            u = graph.call_function(site_products, (c.h, b, nd["scale_d"].args[1]))
    tag_node(u, c, "adapter", "products", "inference")
    _retarget_add(c, u, None)
    for name in ("scale_b", "xAB") if probabilistic else ("scale_b", "xAB", "scale_d"):
        graph.erase_node(nd[name])


def _retarget_add(c: Chain, u: Node, k: Optional[int]) -> None:
    add = c.add  # the add node becomes the site's add (its name and tags stay: walkers read y as its args[0])
    y, lam_b = add.args[0], c.nodes["scale_b"].args[1]
    add.target = site_add
    add.args, add.kwargs = (y, u, k, lam_b, inplace_target(y)), {}
    add.meta[ADAPTER_KEY]["path"] = "inference"


def lower_for_inference(gm: GraphModule, chains: list[Chain], form: str = "batched",
                        tokens: Optional[int] = None) -> int:
    """Give every chain of ``gm`` its inference form (``form``: ``"batched"`` or ``"site"``); returns how many
    site calls changed. ``tokens``: the tokens per call the plan assumes (1, decoding, when not given)."""
    if form not in FORMS:
        raise ValueError(f"inference form {form!r} is not one of {list(FORMS)}")
    groups: dict[tuple[str, str, str], list[Chain]] = {}
    for c in chains:
        b = c.nodes["xAB"].args[1]
        groups.setdefault((c.h.name, c.adapter, b.name if isinstance(b, Node) else repr(b)), []).append(c)
    for members in groups.values():
        st = members[0].state
        plan = inference_plan(tokens or 1, st.config.r, members[0].site.out_features, len(members), form)
        if plan == "batched" and not st.method.probabilistic:
            _lower_batched(gm, members)
        else:
            for c in members:
                _lower_site(gm, c)
        logger.debug("lower (inference): %s at %s (%d sites): %s", members[0].adapter, members[0].site.name,
                     len(members), plan)
    return len(chains)
