"""Lower pass: per site group (the sites sharing ``h = x @ A.T``: q/k/v, gate/up), how a training step computes
the adapter (``activation``, ``fused``, ``lean`` or ``weight``; ``kept`` keeps the folded ``W'``), chosen by a cost
model of multiply-adds plus measured per-value constants: ``auto`` keeps the step within PEFT's work and saves the
most memory, ``fast`` takes the least work. What each path keeps and costs: docs/architecture.md ("Lowering").
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from torch.fx import GraphModule, Node

from ..methods.fold import fold_argument, weight_fold, weight_site, weight_site_t
from ..methods.lean import fused_site, lean_site
from ..methods.pvera import pvera_lean_noise
from ..sites import ADAPTER_KEY, SITE_KEY, relative_name
from ..versions import adapter_flags
from .chains import Chain, hoist, inplace_target, retarget, tag_node
from .infer import INFERENCE_KEY, lower_for_inference

logger = logging.getLogger(__name__)
aten = torch.ops.aten

MODES = ("auto", "fast", "activation", "fused", "lean", "weight")
DEFAULT_TOKENS = 1024

Plan = tuple[int, int, tuple[str, ...]]  # (work, saved, path per site)


@dataclass(frozen=True)
class GroupShape:
    """What the cost model sees of a site group (``rows``: A's; ``outs``: each site's output width)."""

    tokens: int
    in_features: int
    rows: int
    r: int
    outs: tuple[int, ...]
    value_bytes: int = 4


# Elementwise passes a path skips against the activation path, in multiply-add equivalents per tokens x out
# value, measured on a 2-core EPYC (L2 1 MiB per core, L3 32 MiB; benchmarks/train_step.py and per-site timings):
# 250-600 beyond the cache (the fused tail about 400); within it about 150 for the folding call, 90-190 for the
# fused tail, none for the lean op (its call costs what the passes do). GPUs pay relatively more; the model
# takes the low ends.
PASS_COST_CACHED = 64
PASS_COST = 256
PASS_COST_FUSED_CACHED = 64
PASS_COST_FUSED = 192
CACHE_BYTES = 4 << 20
# A fold reads W and writes W' besides its product: measured 40-165 per value of W' (a fold costs about 1.3x its
# product); 32 (a step of today's benchmark shape planned with 0, 16, 32 and 64 measured 0.96-1.02x PEFT).
FOLD_PASS_COST = 32
MAX_STATES = 4096  # the knapsack's frontier size per stage


State = TypeVar("State", bound=tuple)  # (work, saved, ...)


def pareto(states: list[State], key: Callable[[State], Any]) -> list[State]:
    """The ``(work, saved, ...)`` states that save more than every cheaper one, in ``key`` order (ties by ``key``)."""
    best: list[State] = []
    for st in sorted(states, key=key):
        if not best or st[1] > best[-1][1]:
            best.append(st)
    return best


def _frontier(groups: list[list[tuple[int, int]]], limit: int
              ) -> tuple[list[tuple[int, int, int, int]], list[list[tuple[int, int, int, int]]]]:
    """The Pareto frontier of ``(work, saved)`` over one option per group within ``limit``, and every stage's
    states ``(work, saved, parent state, option)`` to read a choice back."""
    rest = [0] * (len(groups) + 1)  # the least work the groups after each one can add (options may save work)
    for k in range(len(groups) - 1, -1, -1):
        rest[k] = rest[k + 1] + min(w for w, _ in groups[k])
    frontier: list[tuple[int, int, int, int]] = [(0, 0, -1, -1)]
    stages = []
    for k, options in enumerate(groups):
        grown = [(w + ow, s + os, si, oi) for si, (w, s, _, _) in enumerate(frontier)
                 for oi, (ow, os) in enumerate(options) if w + ow + rest[k + 1] <= limit]
        frontier = pareto(grown, lambda st: (st[0], -st[1]))
        if len(frontier) > MAX_STATES:  # a pathological case: an even thinning of the frontier (the best kept)
            frontier = frontier[::-(-len(frontier) // MAX_STATES)] + frontier[-1:]
        stages.append(frontier)
    return frontier, stages


def _read_back(stages: list[list[tuple[int, int, int, int]]], best: int) -> list[int]:
    picks = [0] * len(stages)
    for k in range(len(stages) - 1, -1, -1):
        _, _, parent, option = stages[k][best]
        picks[k], best = option, parent
    return picks


def choose_options(groups: list[list[tuple[int, int]]], budget: int) -> list[int]:
    """One option index per group (options ``(work, saved)``) that saves the most within ``budget`` of work: an
    exact multiple-choice knapsack. Groups with the same options (one per layer) are combined per kind first;
    ties go to less work, then to earlier options."""
    kinds: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for k, options in enumerate(groups):
        kinds.setdefault(tuple(options), []).append(k)
    least = {key: len(members) * min(w for w, _ in key) for key, members in kinds.items()}
    combined = []  # per kind: its frontier over its copies and the stages to read each copy's option back
    for key, members in kinds.items():
        limit = budget - sum(v for other, v in least.items() if other != key)
        combined.append(_frontier([list(key)] * len(members), limit))
    if any(not final for final, _ in combined):  # nothing fits the budget: the least work
        return [min(range(len(options)), key=lambda j: (options[j][0], j)) for options in groups]
    top, top_stages = _frontier([[(w, s) for w, s, _, _ in final] for final, _ in combined], budget)
    best = max(range(len(top)), key=lambda j: (top[j][1], -top[j][0]))
    picks = [0] * len(groups)
    for (key, members), (_, stages), point in zip(kinds.items(), combined, _read_back(top_stages, best)):
        for k, option in zip(members, sorted(_read_back(stages, point), reverse=True)):
            picks[k] = option  # the copies of one kind are interchangeable: the earlier get the later options
    return picks


def pass_cost(g: GroupShape, out: int, path: str = "weight") -> int:
    """Multiply-add equivalents ``path`` saves per tokens x out value against the activation path's passes."""
    cached = g.tokens * out * g.value_bytes <= CACHE_BYTES
    if path == "fused":
        return PASS_COST_FUSED_CACHED if cached else PASS_COST_FUSED
    folds = path in ("weight", "kept") and g.tokens >= g.in_features  # else the lean op (with the base call inside)
    return (PASS_COST_CACHED if folds else 0) if cached else PASS_COST


def extra_products(g: GroupShape, out: int, path: str) -> int:
    """Multiply-adds one site adds on ``path`` over the activation path (a folding call's skipped ``d h @ A`` is
    the group's, not counted here)."""
    t, i, r = g.tokens, g.in_features, g.r
    if path in ("weight", "kept") and t >= i:
        return (1 if path == "kept" else 2) * out * r * i + t * out * r - 2 * t * r * out
    return 0 if path == "fused" else t * r * out


def path_costs(g: GroupShape) -> dict[str, int]:
    """Multiply-adds of one step of the group's adapter work per path (every site on it), and PEFT's (``peft``: x·Aᵀ
    per site, not once per group)."""
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
    """One site's ``(path, work, saved)``: work over the activation path, values kept off the saved tensors (lean:
    PVeRA's ``5 r`` latent, noise and KL values per token too); where the weight path is allowed it replaces lean."""
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


def _pareto(plans: list[Plan]) -> list[Plan]:
    """Ties go to the plan that moves the earlier sites off the fused tail."""
    return pareto(plans, lambda o: (o[0], -o[1], tuple(p == "fused" for p in o[2])))


def group_options(g: GroupShape, weight_allowed: bool) -> list[Plan]:
    """A group's Pareto-best plans ``(work, saved, path per site)``, cheapest first; the plans in which every site
    folds (``T >= in``) are kept apart: they also skip ``d h @ A``."""
    t, i, rows = g.tokens, g.in_features, g.rows
    folding = {"weight", "kept"} if t >= i else set()
    states: dict[bool, list[Plan]] = {True: [(0, 0, ())], False: []}
    for out in g.outs:
        grown: dict[bool, list[Plan]] = {True: [], False: []}
        for all_fold, options in states.items():
            for work, saved, paths in options:
                for path, w, sv in site_choices(g, out, weight_allowed):
                    grown[all_fold and path in folding].append((work + w, saved + sv, (*paths, path)))
        states = {k: _pareto(v) for k, v in grown.items()}
    bonus = t * i * rows if folding else 0
    return _pareto([(w - bonus, sv, p) for w, sv, p in states[True]] + states[False])


def plan_auto(shapes: list[GroupShape], weight_allowed: list[bool], objective: str = "memory") -> list[list[str]]:
    """Every planned site's path: ``"memory"`` (``auto``) saves the most within the work the activation path saves
    against PEFT; ``"time"`` (``fast``) takes each group's least work."""
    options = [group_options(g, allowed) for g, allowed in zip(shapes, weight_allowed)]
    if objective == "time":
        return [list(opts[0][2]) for opts in options]
    budget = sum(c["peft"] - c["activation"] for c in map(path_costs, shapes))
    picks = choose_options([[(w, s) for w, s, _ in opts] for opts in options], budget)
    return [list(opts[k][2]) for opts, k in zip(options, picks)]


def check_lowering(lowering: Union[str, dict], tokens: Optional[int] = None) -> dict[str, Any]:
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
    """The graph's lowering setting, with the ``"inference"`` form of a graph built for inference."""
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
    local = relative_name(gm, s.weight) if s.weight else s.weight  # a block's get_attr targets are relative to it
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


def _lower_tail(gm: GraphModule, c: Chain, path: str, traced_when_compiled: bool = False) -> None:
    """The chain's add node becomes one ``lean_site`` or ``fused_site`` call (PVeRA's KL term: a LazyKL of ``h``)."""
    nd, add, r, pvera = c.nodes, c.add, c.state.config.r, c.state.method.probabilistic
    h, lam_d, b, lam_b = c.operands
    y, eps, erase = add.args[0], None, ["scale_b", "xAB"]
    if pvera:  # lean: the sample node becomes the noise's (same name, same place in the RNG order)
        retarget(nd["kl"], nd["kl"].target, (h, lam_d, *nd["kl"].args[2:4], r), path)
        if path != "fused":
            eps = nd["sample"]
            _, _, training, switch, gen, groups = eps.args
            retarget(eps, pvera_lean_noise, (h, r, training, switch, gen, groups), path)
            erase += ["logvar", "mu"]
    if path == "fused":  # PVeRA: from the sampled latent (the sampling nodes stay)
        z, ld = (nd["xAB"].args[0], None) if pvera else (h, lam_d)
        retarget(add, fused_site, (y, z, ld, b, lam_b, inplace_target(y)), path)
    else:
        retarget(add, lean_site, (y, h, lam_d, b, lam_b, eps, r, pvera, traced_when_compiled), path)
    c.erase(gm.graph, erase if pvera and path == "fused" else erase + ["scale_d"])


def _lower_weight(gm: GraphModule, c: Chain, keep: bool = False) -> None:
    graph, base, add = gm.graph, c.site.base, c.add
    h, lam_d, b, lam_b = c.operands
    hoist((h, b, lam_d, lam_b), base)  # emitted after the base call (h after the group's first site): its inputs
    conv1d = c.site.kind == "conv1d"  # addmm(bias, view(x), W) with W stored (in, out)
    with graph.inserting_before(base):
        fold = graph.call_function(weight_fold, (base.args[2] if conv1d else base.args[1], h, h.args[1], b, lam_d,
                                                 lam_b, keep))
    tag_node(fold, c, "output", "add", "weight")
    fold.meta[ADAPTER_KEY]["keep"] = keep
    if conv1d:
        retarget(base, weight_site_t, (base.args[0], base.args[1], fold))
    else:
        retarget(base, weight_site, (base.args[0], fold, base.args[2] if len(base.args) > 2
                                     else base.kwargs.get("bias")))
    add.replace_all_uses_with(add.args[0])
    graph.erase_node(add)
    c.erase(graph, ("scale_b", "xAB", "scale_d"))


def lower_adapters(gm: GraphModule, chains: list[Chain], setting: Optional[dict[str, Any]] = None) -> int:
    """Lower ``chains`` (just emitted into ``gm``'s own graph) by ``setting`` (default: ``gm``'s), in the inference
    form for a graph built for inference; returns the site calls changed. The caller recompiles."""
    if not chains:
        return 0
    setting = setting or lowering_setting(gm)
    if setting.get("inference"):
        return lower_for_inference(gm, chains, setting["inference"])
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
            fallbacks.update((c.site.name, blockers[0]) for c in members)
            want = "lean"
        decided.append((members, want, False))
    for mode, of_mode in planned.items():
        plan = plan_auto([shape for _, shape, _ in of_mode], [ok for _, _, ok in of_mode],
                         "memory" if mode == "auto" else "time")
        decided.extend(([c], path, True) for (members, _, _), paths in zip(of_mode, plan)
                       for c, path in zip(members, paths))
    changed = 0
    for members, want, by_auto in decided:
        for c in members:
            if want == "activation":  # tagged for inspection (lowering_report reads each site's path)
                for n in (*c.nodes.values(), c.add):
                    n.meta[ADAPTER_KEY]["path"] = "activation"
            elif want in ("weight", "kept"):
                _lower_weight(gm, c, keep=want == "kept")
            else:  # under torch.compile auto's lean sites trace the op's forward and backward (see lean_site)
                _lower_tail(gm, c, want, traced_when_compiled=by_auto)
        changed += 0 if want == "activation" else len(members)
        logger.debug("lower: %s at %s (%d sites): %s path", members[0].adapter, members[0].site.name, len(members),
                     want)
    if fallbacks:
        detail = "; ".join(f"{s!r}: {why}" for s, why in list(fallbacks.items())[:5])
        warnings.warn(f"lowering='weight' cannot fold {len(fallbacks)} site(s), lowered to the lean path instead: "
                      f"{detail}", UserWarning, stacklevel=4)
    return changed
