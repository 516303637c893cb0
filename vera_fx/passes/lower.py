"""Lower pass: per site group, pick how the adapter is computed in a training step.

A *site group* is the sites that read one tensor ``x`` with one adapter (q/k/v, gate/up): after the share pass
they share ``h = x @ A.T``. Each group gets one of three paths:

- ``activation``: the emitter's plain nodes (``h * lambda_d -> @ B.T -> * lambda_b``); autograd keeps ``u = z @
  B.T`` (out values per token) per site, PVeRA also its latent, noise and KL intermediates.
- ``lean``: one ``vera_fx::lean_add`` custom op per site (vera_fx/methods/lean.py; it replaces the site's
  ``y + delta`` node) that keeps only the group's shared ``h`` (and PVeRA's noise) and recomputes the rest in
  backward: one extra tokens x r x out product per site, for out (+ 5 r for PVeRA) fewer saved values per token
  and site.
- ``weight``: ``W' = W + (lambda_b * B) @ (lambda_d * A)`` folded for the step in front of the base call, so the
  base matmul computes both (VeRA without dropout on dense ``linear`` sites only: the fold is exact there).

The cost model (``path_costs``) counts multiply-adds of one training step (forward + backward, elementwise
work ignored) for ``T`` tokens, a group's ``in`` and its sites' ``out``, with ``rows`` rows of A (r; 2r for
PVeRA) and rank ``r``:

- peft (PEFT's modules, the reference): ``sum (2 T in rows + 2 T r out)``: x·Aᵀ per site;
- activation: ``2 T in rows`` (x·Aᵀ and its input gradient, once per group) ``+ sum 2 T r out`` (z·Bᵀ and its
  gradient, per site);
- lean: activation ``+ sum T r out`` (the ``gᵀ z`` product for lambda_b's gradient);
- weight: ``sum (3 out r in + T out in)`` (the fold, the gradients of its two factors, and ``gᵀ x`` for the
  folded weight's gradient); the input gradient goes through ``W'`` at the base's own cost.

``auto`` keeps a graph's step within PEFT's arithmetic and spends what is left on memory. It takes the weight
path for a group where allowed and cheaper than the activation path; every other group starts on the
activation path. What a graph's auto groups save against PEFT (the share pass's x·Aᵀ, the weight path's
difference) is its *budget*; ``choose_lean`` then makes lean the sites whose extra products fit the budget and
drop the most saved values (out per token for VeRA, out + 5 r for PVeRA): a small knapsack, solved exactly.
In a Llama block this makes q/k/v and q/v lean (their share saving pays for their extra products exactly) and
at all-linear about half the block's out-width; ``lowering="lean"`` makes every site lean (the fewest saved
values, a few percent more arithmetic than PEFT at all-linear). Every term is linear in ``T``, so the lean
choice holds at any batch size; ``T`` (``DEFAULT_TOKENS``, 1024, unless the setting names it) only moves the
weight decision. A block graph decides on its own sites, so blocks with one structure keep one code.

The setting lives in ``gm.meta["vera_fx_lowering"]`` (``transform(..., lowering=...)``,
``vera_fx.set_lowering``), never in the adapter's config, so adapter_config.json stays PEFT's. Lowered nodes
keep their ``vera_fx`` tags (site, adapter, role, base) plus ``"path"``, so inspection, merge and
``remove_adapter_nodes`` work on them as on plain nodes. The pass only rewrites plain chains: re-lowering
with another setting re-emits the adapters (``vera_fx.set_lowering``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..methods import CONTAINER
from ..methods.lean import lean_site, pvera_lean_noise
from ..sites import ADAPTER_KEY, SITE_KEY, Site, as_graph_module, block_prefix, graph_modules, read_graph_sites

__all__ = ["LowerPass", "lower_adapters", "path_costs", "choose_path", "choose_lean", "plan_auto", "lowering_setting",
           "check_lowering", "LOWERING_KEY", "PATHS", "MODES", "DEFAULT_TOKENS", "GroupShape"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

LOWERING_KEY = "vera_fx_lowering"
PATHS = ("activation", "lean", "weight")
MODES = ("auto", *PATHS)
DEFAULT_TOKENS = 1024

# Tag names of the emitter's per-site chain after h (vera_fx/methods/{vera,pvera}.py).
_CHAIN = {"scale_d", "mu", "logvar", "sample", "kl", "xAB", "scale_b"}
Lowering = Union[str, dict]


@dataclass(frozen=True)
class GroupShape:
    """What the cost model sees of a site group: tokens, the shared input width, A's rows, the rank and the
    output width of each site."""

    tokens: int
    in_features: int
    rows: int
    r: int
    outs: tuple[int, ...]


def path_costs(g: GroupShape) -> dict[str, int]:
    """Multiply-adds of one training step (forward + backward) of the group's adapter work, per path, and
    PEFT's for the same sites (``"peft"``)."""
    t, i, rows, r = g.tokens, g.in_features, g.rows, g.r
    b_side = sum(2 * t * r * o for o in g.outs)
    activation = 2 * t * i * rows + b_side
    lean = activation + sum(t * r * o for o in g.outs)
    weight = sum(3 * o * r * i + t * o * i for o in g.outs)
    peft = len(g.outs) * 2 * t * i * rows + b_side
    return {"activation": activation, "lean": lean, "weight": weight, "peft": peft}


def choose_path(g: GroupShape, weight_allowed: bool) -> str:
    """``auto``'s first choice for a group: ``"weight"`` where allowed and cheaper than the activation path,
    else ``"activation"`` (``choose_lean`` then moves sites to the lean path within the graph's budget)."""
    c = path_costs(g)
    return "weight" if weight_allowed and c["weight"] < c["activation"] else "activation"


def plan_auto(shapes: list[GroupShape], weight_allowed: list[bool]) -> list[list[str]]:
    """``auto``'s path for every site of one graph's auto groups (``shapes[i].outs`` order): ``choose_path`` per
    group, then ``choose_lean`` over the activation sites within the budget of what the groups save against
    PEFT."""
    firsts = [choose_path(g, allowed) for g, allowed in zip(shapes, weight_allowed)]
    costs = [path_costs(g) for g in shapes]
    budget = sum(c["peft"] - c[first] for c, first in zip(costs, firsts))
    plan = [[first] * len(g.outs) for g, first in zip(shapes, firsts)]
    where: list[tuple[int, int]] = []
    items: list[tuple[int, int]] = []
    for gi, (g, first) in enumerate(zip(shapes, firsts)):
        if first != "activation":
            continue
        latent = 5 * g.r if g.rows > g.r else 0  # PVeRA's lean op keeps none of its latent, noise and KL values
        for si, o in enumerate(g.outs):
            where.append((gi, si))
            items.append((g.tokens * g.r * o, o + latent))
    for idx in choose_lean(items, budget):
        gi, si = where[idx]
        plan[gi][si] = "lean"
    return plan


def choose_lean(items: list[tuple[int, int]], budget: int, max_states: int = 4096) -> set[int]:
    """Indices of ``items`` (extra multiply-adds, saved values) to make lean: the most saved values whose extra
    work sums to at most ``budget``. Exact over the distinct item kinds (a site repeats per layer), by a Pareto
    frontier of (work, saved) pairs; ties go to less work, then to the earlier sites."""
    kinds: dict[tuple[int, int], list[int]] = {}
    for idx, item in enumerate(items):
        if 0 <= item[0] <= budget and item[1] > 0:
            kinds.setdefault(item, []).append(idx)
    order = sorted(kinds, key=lambda k: (-k[1] / max(k[0], 1), k))
    frontier: list[tuple[int, int, tuple[int, ...]]] = [(0, 0, ())]  # (work, saved, count per kind so far)
    for cost, value in order:
        n = len(kinds[(cost, value)])
        grown = [(w + k * cost, v + k * value, counts + (k,)) for w, v, counts in frontier for k in range(n + 1)
                 if w + k * cost <= budget]
        grown.sort(key=lambda s: (s[0], -s[1]))
        frontier = []
        for state in grown:  # keep a state only if it saves more than every cheaper one
            if not frontier or state[1] > frontier[-1][1]:
                frontier.append(state)
        if len(frontier) > max_states:  # never reached by a model's few site kinds; bounds a pathological case
            frontier = frontier[-max_states:]
    best = max(frontier, key=lambda s: (s[1], -s[0]))
    return {idx for kind, k in zip(order, best[2]) for idx in kinds[kind][:k]}


def check_lowering(lowering: Lowering, tokens: Optional[int] = None) -> dict[str, Any]:
    """Validate a lowering setting: a mode in ``MODES`` or a dict ``{site name: mode}`` (others ``auto``)."""
    if isinstance(lowering, str):
        if lowering not in MODES:
            raise ValueError(f"lowering={lowering!r} is not one of {list(MODES)}; e.g. lowering='auto'")
    elif isinstance(lowering, dict):
        bad = {k: v for k, v in lowering.items() if not isinstance(k, str) or v not in MODES}
        if bad:
            raise ValueError(f"lowering={lowering!r}: entries {bad} are not site name -> one of {list(MODES)}")
    else:
        raise TypeError(f"lowering must be one of {list(MODES)} or a dict {{site name: mode}}, got {lowering!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens={tokens!r} is invalid: the tokens per step for the cost model, a positive int")
    return {"mode": lowering if isinstance(lowering, str) else dict(lowering), "tokens": tokens}


def lowering_setting(gm: GraphModule) -> dict[str, Any]:
    """The graph's lowering setting (``{"mode": "auto", "tokens": None}`` when none was set)."""
    return gm.meta.get(LOWERING_KEY) or {"mode": "auto", "tokens": None}


@dataclass
class _Chain:
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


def _chains(gm: GraphModule, redecide: bool = False) -> list[_Chain]:
    """The plain chains of ``gm``'s own graph not yet decided (with ``redecide``: those kept on the activation
    path by an earlier run too)."""
    container = getattr(gm, CONTAINER, None)
    if container is None:
        return []
    sites = {s.base.name: s for s in read_graph_sites(gm)}  # this graph's own sites (a block's too)
    found: dict[tuple[str, str], dict[str, Node]] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get(ADAPTER_KEY)
        if tag and tag.get("name") in _CHAIN and tag.get("adapter") in container and (
                not tag.get("path") or (redecide and tag["path"] == "activation")):
            found.setdefault((tag["base"], tag["adapter"]), {})[tag["name"]] = n
    out = []
    for (base, adapter), nodes in found.items():
        state = container[adapter]
        need = {"scale_d", "xAB", "scale_b"} | ({"mu", "logvar", "sample", "kl"} if state.method.probabilistic
                                                  else set())
        if base in sites and need <= set(nodes) and len(nodes["scale_b"].users) == 1:
            out.append(_Chain(sites[base], adapter, state, nodes))
    return out


def _weight_root(node: Node) -> Node:
    """The get_attr under a stack of weight-path folds (``W + dW1 + dW2`` -> ``W``)."""
    while (node.meta.get(ADAPTER_KEY) or {}).get("path") == "weight":
        node = node.args[0]
    return node


def _weight_blocker(gm: GraphModule, c: _Chain) -> Optional[str]:
    """Why chain ``c`` cannot take the weight path (None when it can)."""
    s, cfg = c.site, c.state.config
    if c.state.method.probabilistic:
        return "the adapter samples its latent (PVeRA), which no fixed weight reproduces"
    if cfg.dropout > 0.0:
        return f"dropout={cfg.dropout} acts on the adapter's input only"
    if s.kind != "linear" or s.base.target is not aten.linear.default or len(s.base.args) < 2:
        return f"site kind {s.kind!r} has no dense (out, in) weight argument"
    root = _weight_root(s.base.args[1])
    prefix = block_prefix(gm)  # a block's get_attr targets are relative to the block; site weights are full
    local = s.weight[len(prefix) + 1:] if prefix and s.weight and s.weight.startswith(prefix + ".") else s.weight
    if root.op != "get_attr" or root.target != local:
        return "its weight is computed in the graph"
    if c.h.args[0] is not s.input:
        return "its adapter input is cast or changed"
    if any(not u.meta.get(ADAPTER_KEY) and (u.meta.get(SITE_KEY) or {}).get("name") != s.name for u in root.users):
        return f"its weight {s.weight!r} is read by other calls (tied weights)"
    try:
        w: Optional[torch.Tensor] = gm.get_parameter(local)
    except AttributeError:
        w = None
    lam = c.state.site_parameters(s.name)[f"{c.state.method.prefix}_lambda_b"]
    if w is None or w.dtype != lam.dtype:
        return "its weight is not a parameter of the adapter's dtype"
    return None


def _tag(node: Node, c: _Chain, role: str, name: str, path: str) -> Node:
    node.meta[ADAPTER_KEY] = {"site": c.site.name, "adapter": c.adapter, "role": role, "base": c.site.base.name,
                              "name": name, "path": path}
    return node


def _erase_chain(gm: GraphModule, c: _Chain) -> None:
    for name in ("scale_b", "xAB", "scale_d"):
        gm.graph.erase_node(c.nodes[name])


def _drop_unused(gm: GraphModule, nodes: list[Node], base: str) -> None:
    """Erase adapter nodes among ``nodes`` (and their inputs) that nothing reads any more; a shared node that
    is still read forgets ``base``."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        tag = n.meta.get(ADAPTER_KEY)
        if n.graph is not gm.graph or not tag or n.op not in ("get_attr", "call_function"):
            continue
        if n.op == "call_function" and n.target not in (aten.slice.Tensor, aten.linear.default, aten._to_copy.default):
            continue
        if n.users:
            if "bases" in tag:
                tag["bases"] = [b for b in tag["bases"] if b != base]
            continue
        stack.extend(a for a in n.all_input_nodes)
        gm.graph.erase_node(n)


def _lower_lean(gm: GraphModule, c: _Chain, traced_when_compiled: bool = False) -> None:
    graph, nd, add = gm.graph, c.nodes, c.add
    h, lam_d = nd["scale_d"].args
    b, lam_b = nd["xAB"].args[1], nd["scale_b"].args[1]
    eps: Optional[Node] = None
    r = c.state.config.r
    if c.state.method.probabilistic:
        # The sample and KL nodes are retargeted in place: same names, same place in the RNG order.
        eps = nd["sample"]
        _, _, training, switch, gen, groups = eps.args
        eps.target, eps.args = pvera_lean_noise, (h, r, training, switch, gen, groups)
        kl = nd["kl"]  # records a term computed on first read (LazyKL) from h, which the lean op keeps
        kl.args = (h, lam_d, *kl.args[2:4], r)
        for n in (eps, kl):
            n.meta[ADAPTER_KEY]["path"] = "lean"
    y = add.args[0]  # the add node becomes the op (its name and tags stay: walkers read y as its args[0])
    add.target = lean_site
    add.args, add.kwargs = (y, h, lam_d, b, lam_b, eps, r, c.state.method.probabilistic, traced_when_compiled), {}
    add.meta[ADAPTER_KEY]["path"] = "lean"
    for name in ("scale_b", "xAB", "logvar", "mu", "scale_d"):
        if name in nd:
            graph.erase_node(nd[name])


def _lower_weight(gm: GraphModule, c: _Chain) -> None:
    graph, nd, base, add = gm.graph, c.nodes, c.site.base, c.add
    h = c.h
    lam_d, lam_b = nd["scale_d"].args[1], nd["scale_b"].args[1]
    a, b = h.args[1], nd["xAB"].args[1]

    def copy(n: Node, role: str, name: str) -> Node:  # a get_attr (+ slice) copied in front of the base call
        if n.op == "get_attr":
            with graph.inserting_before(base), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a block view's projections live in the root state
                new = graph.get_attr(n.target)
            return _tag(new, c, role, name, "weight")
        src = copy(n.args[0], role, name)
        with graph.inserting_before(base):
            new = graph.call_function(n.target, (src, *n.args[1:]))
        return _tag(new, c, role, f"{name}_slice", "weight")

    def call(fn: Any, args: tuple, role: str, name: str) -> Node:
        with graph.inserting_before(base):
            new = graph.call_function(fn, args)
        return _tag(new, c, role, name, "weight")

    lb, ld = copy(lam_b, "lambda", "lambda_b"), copy(lam_d, "lambda", "lambda_d")
    a2, b2 = copy(a, "projection", "A"), copy(b, "projection", "B")
    bs = call(aten.mul.Tensor, (b2, call(aten.unsqueeze.default, (lb, -1), "adapter", "lambda_b_col")),
              "adapter", "scaled_B")
    ad = call(aten.mul.Tensor, (a2, call(aten.unsqueeze.default, (ld, -1), "adapter", "lambda_d_col")),
              "adapter", "scaled_A")
    dw = call(aten.mm.default, (bs, ad), "adapter", "delta_weight")
    folded = call(aten.add.Tensor, (base.args[1], dw), "output", "add")
    base.args = (base.args[0], folded, *base.args[2:])
    y = add.args[0]
    add.replace_all_uses_with(y)
    graph.erase_node(add)
    _erase_chain(gm, c)
    _drop_unused(gm, [h, lam_d, lam_b, b, a], base.name)


def lower_adapters(gm: GraphModule, setting: Optional[dict[str, Any]] = None, recompile: bool = True,
                   redecide: bool = False) -> int:
    """Lower every undecided plain adapter chain of ``gm``'s own graph by its group's path; returns how many
    site calls changed.

    Reads the setting from ``gm.meta["vera_fx_lowering"]`` unless ``setting`` is given (a block graph gets its
    root's). Chains kept on the activation path are tagged so, and a later run (another adapter's emission)
    leaves them alone, since a subset of a graph's sites would get another plan; ``redecide`` plans them again
    (a new setting). Recompiles ``gm`` when anything changed, unless ``recompile=False`` (the caller does).
    """
    chains = _chains(gm, redecide)
    if not chains:
        return 0
    setting = setting or lowering_setting(gm)
    mode, tokens = setting["mode"], setting.get("tokens") or DEFAULT_TOKENS
    groups: dict[tuple[str, str, str], list[_Chain]] = {}
    for c in chains:  # a per-site override splits its group: each part is decided on its own
        want = mode.get(c.site.name, "auto") if isinstance(mode, dict) else mode
        groups.setdefault((c.h.name, c.adapter, want), []).append(c)
    decided: list[tuple[list[_Chain], str, bool]] = []  # (chains, path, chosen by auto)
    auto: list[tuple[list[_Chain], GroupShape, bool]] = []
    fallbacks: dict[str, str] = {}
    for (_, _, want), members in groups.items():
        blockers = [b for b in (_weight_blocker(gm, c) for c in members) if b is not None]
        if want == "auto":
            st = members[0].state
            shape = GroupShape(tokens, members[0].site.in_features, st.method.latent_rows(st.config), st.config.r,
                               tuple(c.site.out_features for c in members))
            auto.append((members, shape, not blockers))
            continue
        if want == "weight" and blockers:
            for c in members:
                fallbacks[c.site.name] = blockers[0]
            want = "lean"
        decided.append((members, want, False))
    plan = plan_auto([shape for _, shape, _ in auto], [allowed for _, _, allowed in auto])
    decided.extend(([c], path, True) for (members, _, _), paths in zip(auto, plan) for c, path in zip(members, paths))
    changed = 0
    for members, want, by_auto in decided:
        if want == "activation":  # decided: a later run (another adapter's emission) leaves these chains alone
            for c in members:
                for n in (*c.nodes.values(), c.add):
                    n.meta[ADAPTER_KEY]["path"] = "activation"
            continue
        for c in members:
            if want == "weight":
                _lower_weight(gm, c)
            else:  # under torch.compile auto's lean sites trace the op's forward and backward (see lean_site)
                _lower_lean(gm, c, traced_when_compiled=by_auto)
            changed += 1
        logger.debug("lower: %s at %s (%d sites): %s path", members[0].adapter, members[0].site.name, len(members),
                     want)
    if fallbacks:
        detail = "; ".join(f"{s!r}: {why}" for s, why in list(fallbacks.items())[:5])
        warnings.warn(f"lowering='weight' cannot fold {len(fallbacks)} site(s), lowered to the lean path instead: "
                      f"{detail}", UserWarning, stacklevel=3)
    if changed and recompile:
        gm.graph.lint()
        gm.recompile()
    return changed


class LowerPass(PassBase):
    """The lower pass as a torch.fx pass (runs after inject and share; a no-op on an already lowered graph)."""

    def __init__(self, lowering: Optional[Lowering] = None, tokens: Optional[int] = None) -> None:
        super().__init__()
        self.setting = None if lowering is None else check_lowering(lowering, tokens)

    def call(self, graph_module: GraphModule) -> PassResult:
        redecide = self.setting is not None and self.setting != lowering_setting(graph_module)
        if self.setting is not None:
            graph_module.meta[LOWERING_KEY] = self.setting
        setting = lowering_setting(graph_module)  # the root's setting, for every graph of the tree
        changed = sum(lower_adapters(g, setting, redecide=redecide)
                      for g in graph_modules(as_graph_module(graph_module, "LowerPass")))
        return PassResult(graph_module, changed > 0)

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()
