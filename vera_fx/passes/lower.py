"""Lower pass: per site group, pick how the adapter is computed in a training step.

A *site group* is the sites that read one tensor ``x`` with one adapter (q/k/v, gate/up): after the share pass
they share ``h = x @ A.T``. Each site gets one of these paths:

- ``activation``: the emitter's plain nodes (``h * lambda_d -> @ B.T -> * lambda_b -> + y``); autograd keeps
  ``u = z @ B.T`` (out values per token) per site, PVeRA also its latent, noise and KL intermediates.
- ``fused``: the same products as one ``fused_site`` call (vera_fx/methods/fused.py) with its own backward: one
  in-place pass over the tokens x out tensor where the plain nodes make two, two fewer in backward; it keeps
  what the plain path keeps, PVeRA less: its KL term is recorded as on the lean path, from ``h`` when read
  (under torch.compile and autocast the tail is the plain nodes' ops).
- ``lean``: one ``vera_fx::lean_add`` custom op per site (vera_fx/methods/lean.py; it replaces the site's
  ``y + delta`` node) that keeps only the group's shared ``h`` (and PVeRA's noise) and recomputes the rest in
  backward: one extra tokens x r x out product per site, for out (+ 5 r for PVeRA) fewer saved values per token
  and site.
- ``weight``: the base call and its adapter as one call (vera_fx/methods/fold.py): with ``T >= in`` tokens it
  folds ``W' = W + (lambda_b * B * lambda_d) @ A`` for the call and its backward, so the base's products carry
  the adapter (``d h @ A`` skipped too) and the lambdas' gradients cost one ``gᵀ h`` product; with fewer tokens
  (decoding) it is the lean op with the base call inside. It keeps only ``h``, like the lean path (VeRA without
  dropout on dense ``linear`` and GPT-2 ``Conv1D`` sites whose weight is frozen: the fold is exact there). A
  planned call may keep its ``W'`` for backward instead of folding again (``"kept"`` in a plan; the fold node's
  tag says ``keep``): out x in values, with ``T >= in`` no more than the plain path's ``u``, for one fold less.

The cost model (``path_costs``, ``extra_products``) counts multiply-adds of one training step (forward +
backward) for ``T`` tokens, a group's ``in`` and its sites' ``out``, with ``rows`` rows of A (r; 2r for PVeRA)
and rank ``r``:

- peft (PEFT's modules, the reference): ``sum (2 T in rows + 2 T r out)``: x·Aᵀ per site;
- activation and fused: ``2 T in rows`` (x·Aᵀ and its input gradient, once per group) ``+ sum 2 T r out`` (z·Bᵀ
  and its gradient, per site);
- lean: activation ``+ sum T r out`` (the ``gᵀ z`` product for lambda_b's gradient);
- weight, ``T >= in``: ``T in rows + sum (2 out r in + T out r)`` (x·Aᵀ, the two folds, ``gᵀ h``; one fold when
  ``W'`` is kept); the input gradient goes through ``W'`` at the base's own cost. With ``T < in`` it costs what
  lean does.

Besides the products, the activation path makes a few elementwise passes over each site's tokens x out
tensor (lambda_b's scale and its gradient, the add, lambda_b's gradient product) that the other paths make
fewer of: ``pass_cost`` prices them in multiply-add equivalents per value (beyond 4 MiB 256 for the lean and
weight paths, 192 for the fused tail; within it 64 for the folding call and the fused tail, none for the lean
op, whose call costs about what the passes do, nor for a weight call that does not fold; measured 100-600 on
the 2-core machine, and a GPU pays relatively more), and a fold's own pass over ``W'`` (32 per value).

``auto`` keeps a graph's step within PEFT's work and spends what is left on memory: what the activation path
saves against PEFT (the share pass's x·Aᵀ) is the graph's *budget*, and ``choose_options`` picks per group one
of its Pareto-best plans (``group_options`` over ``site_choices``: per site fused, or weight / kept where the
weight path is allowed, else lean) that keep the most values off the saved tensors with the extra work, less
the passes skipped, within the budget: a multiple-choice knapsack, solved exactly. On a Llama-like block at
r=256 that lowers every site (hidden 512 with 512 tokens, hidden 2048 with 1024); at r=1024 and hidden 2048
all but q and k, which stay fused. ``fast`` takes per group the plan of least work (memory: at most the
activation path's): at hidden 512 with 512 tokens folding calls that keep ``W'`` and a fused down_proj.
``lowering="lean"`` makes every site lean, ``"fused"`` every site fused. ``T`` (``DEFAULT_TOKENS``, 1024, unless
the setting names it) moves the plan; the weight call decides fold or not from the tokens it sees. A block
graph decides on its own sites, so blocks with one structure keep one code.

The setting lives in the adapter set's flags (``AdapterFlags.lowering``: ``transform(..., lowering=...)``,
``vera_fx.set_lowering``), never in the adapter's config, so adapter_config.json stays PEFT's. Lowered nodes
keep their ``vera_fx`` tags (site, adapter, role, base) plus ``"path"``, so inspection, merge and
``remove_adapter_nodes`` work on them as on plain nodes. The pass rewrites only the chains the emitter hands
it (inject runs it on what it just emitted; nothing searches a graph for chains): another setting re-emits the
adapters (``vera_fx.set_lowering``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.fx import GraphModule, Node

from ..methods.fold import fold_argument, weight_fold, weight_site, weight_site_t
from ..methods.fused import fused_site
from ..methods.lean import lean_site, pvera_lean_noise
from ..sites import ADAPTER_KEY, SITE_KEY, block_prefix
from ..versions import adapter_flags
from .chains import Chain, hoist, inplace_target, tag_node
from .knapsack import choose_options
from .infer import INFERENCE_KEY, lower_for_inference

logger = logging.getLogger(__name__)
aten = torch.ops.aten

PATHS = ("activation", "fused", "lean", "weight")
MODES = ("auto", "fast", *PATHS)
DEFAULT_TOKENS = 1024

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
    value_bytes: int = 4


# Elementwise passes: per tokens x out value the activation path reads and writes it a few times (lambda_b's
# scale and its gradient, the add, lambda_b's gradient product) where the lean op and the folding call only run
# products and the fused tail runs two passes of the four. Counted as multiply-add equivalents per value a path
# saves against the activation path, measured on a 2-core EPYC (L2 1 MiB per core, L3 32 MiB;
# benchmarks/train_step.py and per-site timings): 250-600 for a tensor beyond the cache (the fused tail about
# 400); for one within it about 150 for the folding call, 90-190 for the fused tail and none for the lean op
# (its call costs what the passes do). GPUs pay relatively more for a pass. The model takes the low ends.
PASS_COST_CACHED = 64
PASS_COST = 256
PASS_COST_FUSED_CACHED = 64
PASS_COST_FUSED = 192
CACHE_BYTES = 4 << 20
# A fold reads W and writes a fresh W' (out x in values) besides its product: measured 40-165 multiply-add
# equivalents per value of W' on the same machine (a fold costs about 1.3x its product there); the model takes 32
# (a step of today's benchmark shape planned with 0, 16, 32 and 64 measured 1.02, 0.98, 0.97 and 0.96x PEFT).
FOLD_PASS_COST = 32


def pass_cost(g: GroupShape, out: int, path: str = "weight") -> int:
    """Multiply-add equivalents ``path`` (``"fused"``, ``"lean"``, ``"weight"`` or ``"kept"``) saves per value of a
    site's tokens x out tensor against the activation path's elementwise passes (see ``PASS_COST``)."""
    cached = g.tokens * out * g.value_bytes <= CACHE_BYTES
    if path in ("weight", "kept") and g.tokens < g.in_features:
        path = "lean"  # a call that does not fold is the lean op with the base call inside
    if path == "fused":
        return PASS_COST_FUSED_CACHED if cached else PASS_COST_FUSED
    if not cached:
        return PASS_COST
    return 0 if path == "lean" else PASS_COST_CACHED


def extra_products(g: GroupShape, out: int, path: str) -> int:
    """Multiply-adds one site (``out`` wide) of ``g`` adds when it leaves the activation path for ``path``
    (negative where it saves some): none for the fused tail; the lean op's ``gᵀ z``; a folding call's two out x r
    x in folds and ``gᵀ h`` instead of ``z·Bᵀ`` and its gradient, one fold for a call that keeps ``W'``
    (``"kept"``; with ``T < in`` either is the lean op). A group whose every site folds also skips ``d h @ A``
    (``T in rows``, not counted here)."""
    t, i, r = g.tokens, g.in_features, g.r
    if path in ("weight", "kept") and t >= i:
        return (1 if path == "kept" else 2) * out * r * i + t * out * r - 2 * t * r * out
    if path == "fused":
        return 0
    return t * r * out


def path_costs(g: GroupShape) -> dict[str, int]:
    """Multiply-adds of one training step (forward + backward) of the group's adapter work, per path (every site
    of the group on it; ``"kept"``: the folding call keeping ``W'``), and PEFT's for the same sites (``"peft"``)."""
    t, i, rows, r = g.tokens, g.in_features, g.rows, g.r
    b_side = sum(2 * t * r * o for o in g.outs)
    activation = 2 * t * i * rows + b_side
    costs = {"activation": activation, "fused": activation}
    for path in ("lean", "weight", "kept"):
        bonus = t * i * rows if path != "lean" and t >= i else 0
        costs[path] = activation + sum(extra_products(g, o, path) for o in g.outs) - bonus
    costs["peft"] = len(g.outs) * 2 * t * i * rows + b_side
    return costs


def site_choices(g: GroupShape, out: int, weight_allowed: bool) -> list[tuple[str, int, int]]:
    """One site's candidate paths as ``(path, work, saved)``: work in multiply-adds over the activation path less
    the elementwise passes it skips (``pass_cost``), saved in values per step kept off the saved tensors against
    the activation path. The fused tail keeps what the activation path keeps; the weight path keeps nothing
    (``h`` is the group's), ``"kept"`` (``T >= in`` only) its out x in ``W'``; the lean op nothing (PVeRA: nor its
    ``5 r`` latent, noise and KL values per token). Where the weight path is allowed it replaces the lean op
    (with ``T < in`` the folding call is the lean op)."""
    t, i, r = g.tokens, g.in_features, g.r
    choices = [("fused", -pass_cost(g, out, "fused") * t * out, 0)]
    if weight_allowed:
        folds = FOLD_PASS_COST * out * i if t >= i else 0  # per fold: W' written, W read
        work = extra_products(g, out, "weight") - pass_cost(g, out, "weight") * t * out + 2 * folds
        choices.append(("weight", work, t * out))
        if t >= i:
            choices.append(("kept", work - out * r * i - folds, t * out - out * i))
    else:
        latent = 5 * r if g.rows > r else 0
        choices.append(("lean", extra_products(g, out, "lean") - pass_cost(g, out, "lean") * t * out,
                        t * (out + latent)))
    return choices


def _pareto(options: list[tuple[int, int, tuple[str, ...]]]) -> list[tuple[int, int, tuple[str, ...]]]:
    """The options that save more than every cheaper one, cheapest first (ties: the one that moves the earlier
    sites off the fused tail)."""
    best: list[tuple[int, int, tuple[str, ...]]] = []
    for opt in sorted(options, key=lambda o: (o[0], -o[1], tuple(p == "fused" for p in o[2]))):
        if not best or opt[1] > best[-1][1]:
            best.append(opt)
    return best


def group_options(g: GroupShape, weight_allowed: bool) -> list[tuple[int, int, tuple[str, ...]]]:
    """A group's candidate plans ``(work, saved, path per site)`` (``site_choices`` per site), the Pareto-best ones
    (more saved only for more work), cheapest first; a group whose every site folds (``T >= in``) also skips
    ``d h @ A`` (``T in rows`` less work). Exact for any number of sites: a frontier per site, kept apart for
    the plans in which every site so far folds."""
    t, i, rows = g.tokens, g.in_features, g.rows
    folding = {"weight", "kept"} if t >= i else set()
    states: dict[bool, list[tuple[int, int, tuple[str, ...]]]] = {True: [(0, 0, ())], False: []}
    for out in g.outs:
        grown: dict[bool, list[tuple[int, int, tuple[str, ...]]]] = {True: [], False: []}
        for all_fold, options in states.items():
            for work, saved, paths in options:
                for path, w, sv in site_choices(g, out, weight_allowed):
                    grown[all_fold and path in folding].append((work + w, saved + sv, (*paths, path)))
        states = {k: _pareto(v) for k, v in grown.items()}
    bonus = t * i * rows if folding else 0
    return _pareto([(w - bonus, sv, p) for w, sv, p in states[True]] + states[False])


def plan_auto(shapes: list[GroupShape], weight_allowed: list[bool], objective: str = "memory") -> list[list[str]]:
    """The path of every site of one graph's planned groups (``shapes[i].outs`` order). ``"memory"`` (``auto``):
    the plan that keeps the most values off the saved tensors within the budget of what the activation path
    saves against PEFT (the share pass's x·Aᵀ), so the step stays within PEFT's work. ``"time"`` (``fast``):
    per group the least work. Paths: ``fused``, ``lean``, ``weight`` and ``kept`` (the weight path keeping
    ``W'``)."""
    options = [group_options(g, allowed) for g, allowed in zip(shapes, weight_allowed)]
    if objective == "time":
        return [list(opts[0][2]) for opts in options]
    budget = sum(c["peft"] - c["activation"] for c in map(path_costs, shapes))
    picks = choose_options([[(w, s) for w, s, _ in opts] for opts in options], budget)
    return [list(opts[k][2]) for opts, k in zip(options, picks)]


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
    """The graph's lowering setting (``{"mode": "auto", "tokens": None}`` when none was set), with the
    ``"inference"`` form of a graph built for inference (``gm.meta["vera_fx_inference"]``: the variant's own)."""
    setting = adapter_flags(gm).lowering or {"mode": "auto", "tokens": None}
    form = gm.meta.get(INFERENCE_KEY)
    return {**setting, "inference": form} if form else setting


def _weight_blocker(gm: GraphModule, c: Chain) -> Optional[str]:
    """Why chain ``c`` cannot take the weight path (None when it can)."""
    s, cfg = c.site, c.state.config
    if c.state.method.probabilistic:
        return "the adapter samples its latent (PVeRA), which no fixed weight reproduces"
    if cfg.dropout > 0.0:
        return f"dropout={cfg.dropout} acts on the adapter's input only"
    fold = fold_argument(s.base)
    if fold is not None:
        first = (fold.meta.get(ADAPTER_KEY) or {}).get("adapter") if isinstance(fold, Node) else None
        return f"its call folds adapter {first!r} already (one adapter folds per call)"
    dense = s.kind == "linear" and s.base.target is aten.linear.default and len(s.base.args) >= 2
    conv1d = s.kind == "conv1d" and s.base.target is aten.addmm.default and len(s.base.args) == 3
    if not (dense or conv1d):
        return f"site kind {s.kind!r} has no dense weight argument"
    root = s.base.args[2] if conv1d else s.base.args[1]
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
    if w.requires_grad:
        return f"its weight {s.weight!r} trains (requires_grad=True)"
    return None


def _erase_chain(gm: GraphModule, c: Chain) -> None:
    for name in ("scale_b", "xAB", "scale_d"):
        gm.graph.erase_node(c.nodes[name])


def _lower_lean(gm: GraphModule, c: Chain, traced_when_compiled: bool = False) -> None:
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


def _lower_fused(gm: GraphModule, c: Chain) -> None:
    """The chain after ``h`` (VeRA) or after the sample (PVeRA) as one ``fused_site`` call (the add node becomes
    it, as for the lean op)."""
    graph, nd, add = gm.graph, c.nodes, c.add
    h, lam_d = nd["scale_d"].args
    b, lam_b = nd["xAB"].args[1], nd["scale_b"].args[1]
    y = add.args[0]
    inplace = inplace_target(y)
    if c.state.method.probabilistic:  # from the sampled latent: the sampling nodes stay
        kl = nd["kl"]  # the KL term as the lean path records it: from h, computed when read (LazyKL)
        kl.args = (h, lam_d, *kl.args[2:4], c.state.config.r)
        kl.meta[ADAPTER_KEY]["path"] = "fused"
        z, lam_d = nd["xAB"].args[0], None
        erase = ("scale_b", "xAB")
    else:
        z = h
        erase = ("scale_b", "xAB", "scale_d")
    add.target = fused_site
    add.args, add.kwargs = (y, z, lam_d, b, lam_b, inplace), {}
    add.meta[ADAPTER_KEY]["path"] = "fused"
    for name in erase:
        graph.erase_node(nd[name])


def _lower_weight(gm: GraphModule, c: Chain, keep: bool = False) -> None:
    graph, nd, base, add = gm.graph, c.nodes, c.site.base, c.add
    h, lam_d = nd["scale_d"].args
    b, lam_b = nd["xAB"].args[1], nd["scale_b"].args[1]
    order, moved = {n: k for k, n in enumerate(graph.nodes)}, set()
    for n in (h, b, lam_d, lam_b):  # emitted after the base call (h after the group's first site): now its inputs
        hoist(n, base, order, moved)
    conv1d = c.site.kind == "conv1d"  # addmm(bias, view(x), W) with W stored (in, out)
    with graph.inserting_before(base):
        fold = graph.call_function(weight_fold, (base.args[2] if conv1d else base.args[1], h, h.args[1], b, lam_d,
                                                 lam_b, keep))
    tag_node(fold, c, "output", "add", "weight")
    fold.meta[ADAPTER_KEY]["keep"] = keep
    if conv1d:
        base.target, base.args, base.kwargs = weight_site_t, (base.args[0], base.args[1], fold), {}
    else:
        bias = base.args[2] if len(base.args) > 2 else base.kwargs.get("bias")
        base.target, base.args, base.kwargs = weight_site, (base.args[0], fold, bias), {}
    add.replace_all_uses_with(add.args[0])
    graph.erase_node(add)
    _erase_chain(gm, c)


def lower_adapters(gm: GraphModule, chains: list[Chain], setting: Optional[dict[str, Any]] = None,
                   recompile: bool = True) -> int:
    """Lower ``chains`` (the plain chains just emitted into ``gm``'s own graph, ``emitted_chain``) by their
    groups' paths; returns how many site calls changed.

    Reads the root's setting (``lowering_setting``) unless ``setting`` is given (a block graph gets its
    root's). A graph built for inference (the setting's ``"inference"`` form, see ``lowering_setting``) gets the
    inference form of vera_fx/passes/infer.py, never a training plan. Only the chains handed over are planned:
    another adapter's emission leaves the sites lowered before alone (a subset of a graph's sites would get
    another plan); another setting re-emits (``vera_fx.set_lowering``). Recompiles ``gm`` when anything changed,
    unless ``recompile=False`` (the caller does).
    """
    if not chains:
        return 0
    setting = setting or lowering_setting(gm)
    if setting.get("inference"):
        changed = lower_for_inference(gm, chains, setting["inference"])
    else:
        changed = _lower_training(gm, chains, setting)
    if changed and recompile:
        gm.graph.lint()
        gm.recompile()
    return changed


def _lower_training(gm: GraphModule, chains: list[Chain], setting: dict[str, Any]) -> int:
    """The training plan of ``chains`` by ``setting`` (see the module docstring); returns the sites changed."""
    mode, tokens = setting["mode"], setting.get("tokens") or DEFAULT_TOKENS
    groups: dict[tuple[str, str, str], list[Chain]] = {}
    for c in chains:  # a per-site override splits its group: each part is decided on its own
        want = mode.get(c.site.name, "auto") if isinstance(mode, dict) else mode
        groups.setdefault((c.h.name, c.adapter, want), []).append(c)
    decided: list[tuple[list[Chain], str, bool]] = []  # (chains, path, planned by auto or fast)
    planned: dict[str, list[tuple[list[Chain], GroupShape, bool]]] = {"auto": [], "fast": []}
    fallbacks: dict[str, str] = {}
    for (_, _, want), members in groups.items():
        blockers = [b for b in (_weight_blocker(gm, c) for c in members) if b is not None]
        if want in planned:
            st = members[0].state
            lam = st.site_parameters(members[0].site.name)[f"{st.method.prefix}_lambda_b"]
            shape = GroupShape(tokens, members[0].site.in_features, st.method.latent_rows(st.config), st.config.r,
                               tuple(c.site.out_features for c in members), lam.element_size())
            planned[want].append((members, shape, not blockers))
            continue
        if want == "weight" and blockers:
            for c in members:
                fallbacks[c.site.name] = blockers[0]
            want = "lean"
        decided.append((members, want, False))
    for mode, groups_of_mode in planned.items():
        plan = plan_auto([shape for _, shape, _ in groups_of_mode], [ok for _, _, ok in groups_of_mode],
                         "memory" if mode == "auto" else "time")
        decided.extend(([c], path, True) for (members, _, _), paths in zip(groups_of_mode, plan)
                       for c, path in zip(members, paths))
    changed = _apply_paths(gm, decided)
    if fallbacks:
        detail = "; ".join(f"{s!r}: {why}" for s, why in list(fallbacks.items())[:5])
        warnings.warn(f"lowering='weight' cannot fold {len(fallbacks)} site(s), lowered to the lean path instead: "
                      f"{detail}", UserWarning, stacklevel=4)
    return changed


def _apply_paths(gm: GraphModule, decided: list[tuple[list[Chain], str, bool]]) -> int:
    """Rewrite each decided group's chains to its path; returns the sites changed."""
    changed = 0
    for members, want, by_auto in decided:
        if want == "activation":  # tagged for inspection (lowering_report reads each site's path)
            for c in members:
                for n in (*c.nodes.values(), c.add):
                    n.meta[ADAPTER_KEY]["path"] = "activation"
            continue
        for c in members:
            if want in ("weight", "kept"):
                _lower_weight(gm, c, keep=want == "kept")
            elif want == "fused":
                _lower_fused(gm, c)
            else:  # under torch.compile auto's lean sites trace the op's forward and backward (see lean_site)
                _lower_lean(gm, c, traced_when_compiled=by_auto)
            changed += 1
        logger.debug("lower: %s at %s (%d sites): %s path", members[0].adapter, members[0].site.name, len(members),
                     want)
    return changed
