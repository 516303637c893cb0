"""Merge pass: fold deterministic adapters into their sites' weights and erase their nodes; unmerge; bake them
into the model (``merge_into``). Copy-on-merge: merge installs new tensors (a bitsandbytes site: a new requantized
layer) and keeps the originals in ``flags.folded`` for an exact unmerge. Atomic: all is computed and checked first,
and a failure while rewriting restores graphs, weights and layers (``rollback``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..quantized import QUANTIZED_KINDS, dequantized_weight, requantized, rounding_error, set_slot
from ..sites import (ADAPTER_KEY, LINEAR_KINDS, Site, as_graph_module, graph_modules, model_info, qualified_name,
                     read_sites)
from ..state import MTS_TAG, active_adapters, adapters_disabled, adapters_of, merged_adapters, mutation
from ..versions import adapter_flags
from .inject import emit_adapter, remove_adapter_nodes

logger = logging.getLogger(__name__)

_USER_LEVEL = 4  # warnings' stacklevel from a pass's call(): call, PassBase.__call__, merge, user
Slot = Union[torch.Tensor, nn.Module]  # what a merge replaces: a weight tensor, or a bitsandbytes site's layer


def get_tensor(module: nn.Module, qualname: str) -> torch.Tensor:
    """The parameter or buffer at ``qualname``; AttributeError when it is neither."""
    try:
        return module.get_parameter(qualname)
    except AttributeError:
        return module.get_buffer(qualname)


def _layer_path(weight: str) -> str:
    return weight.rpartition(".")[0]


def _slot(module: nn.Module, weight: str, layer: bool) -> Slot:
    """What a merge replaces for the weight ``weight``: its bitsandbytes layer (``layer``), else the tensor."""
    return module.get_submodule(_layer_path(weight)) if layer else get_tensor(module, weight)


def _install(module: nn.Module, weight: str, value: Slot) -> Slot:
    """Put ``value`` (a new object: other holders keep the old one) in the slot of ``weight``; returns the old."""
    return set_slot(module, _layer_path(weight) if isinstance(value, nn.Module) else weight, value)


def like(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` wrapped as ``old`` is: a Parameter with its requires_grad, or a plain tensor."""
    return nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data


def add_deltas(acc: torch.Tensor, gm: GraphModule, site: Site, adapters: tuple[str, ...],
               sign: float = 1.0) -> torch.Tensor:
    """``acc += sign * ΔW`` of each adapter at ``site``, in place, float32, in the weight's layout."""
    container = adapters_of(gm)
    for a in adapters:
        with torch.no_grad():
            delta = container[a].method.delta_weight(container[a], site).detach()
        delta = delta.T if site.fan_in_fan_out else delta
        if tuple(delta.shape) != tuple(acc.shape):
            raise ValueError(f"site {site.name!r}: the adapter's delta has shape {tuple(delta.shape)} but the weight "
                             f"{site.weight!r} has shape {tuple(acc.shape)}; the graph's weight was replaced by one "
                             "of another shape: capture and transform the model again")
        acc.add_(delta.to(device=acc.device, dtype=torch.float32), alpha=sign)
    return acc


@dataclass
class Folded:
    """A merged weight or quantized layer: what it replaced (put back by unmerge) and what merge installed."""

    site: str
    adapters: tuple[str, ...]
    original: Slot
    merged: Slot
    version: int = -1  # a tensor's merged._version when installed: a later in-place change shows up here

    @property
    def is_layer(self) -> bool:
        return isinstance(self.merged, nn.Module)

    def __deepcopy__(self, memo: dict) -> "Folded":
        merged = copy.deepcopy(self.merged, memo)  # a copy of a tensor starts a fresh version counter
        version = merged._version if not self.is_layer and self.merged._version == self.version else -1
        return Folded(self.site, self.adapters, copy.deepcopy(self.original, memo), merged, version)


@dataclass
class _Fold:
    """One weight to fold, its site (first call) and adapters; ``original``: a merged quantized site's own layer."""

    weight: str
    site: Site
    adapters: tuple[str, ...]
    original: Optional[nn.Module] = None

    @property
    def layer(self) -> bool:
        return self.site.kind in QUANTIZED_KINDS


def _check_names(gm: GraphModule, adapter_names: Optional[Iterable[str]]) -> tuple[str, ...]:
    container = adapters_of(gm)
    if len(container) == 0:
        raise ValueError("this graph has no adapter to merge: create one with vera_fx.transform(model, config)")
    if adapters_disabled(gm):
        raise ValueError("the adapters are disabled (inside `with vera_fx.disable_adapters(gm)`): the graph computes "
                         "the base model, so there is nothing to merge; merge after the block")
    if adapter_names is None:
        return tuple(active_adapters(gm))
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple, set)):
        raise TypeError(f"adapter_names must be a list of adapter names or None, got {adapter_names!r}; "
                        f"e.g. adapter_names=[{next(iter(container))!r}]")
    unknown = [a for a in adapter_names if a not in container]
    if unknown:
        raise ValueError(f"adapter_names={list(adapter_names)!r}: {unknown} not on this graph; adapters: "
                         f"{sorted(container)}")
    return tuple(dict.fromkeys(adapter_names))


def _unmergeable(readers: dict[str, list[Node]], calls: list[Site], adapters: tuple[str, ...]) -> Optional[str]:
    """Why the weight of a site (all its calls) cannot take ``adapters``, or None (``readers``: by get_attr target)."""
    site = calls[0]
    if site.kind not in LINEAR_KINDS:
        return f"its kind {site.kind!r} has no weight vera_fx can merge into"
    if site.weight is None or any(c.weight != site.weight for c in calls):
        return "its weight is computed in the graph, not read from a parameter"
    missing = [a for a in adapters for c in calls if a not in c.adapters]
    if missing:
        return f"adapter(s) {sorted(set(missing))} are attached to only some of its calls"
    if site.kind in QUANTIZED_KINDS:
        return None  # merged into a new bitsandbytes layer at its path
    bases = {c.base for c in calls}
    others = [u.name for u in readers.get(site.weight, []) if u not in bases and not u.meta.get(ADAPTER_KEY)]
    if others:
        return (f"its weight {site.weight!r} is also read by {others[:3]} (tied weights); untie it or leave the "
                "site out of target_modules")
    return None


def _plan(gm: GraphModule, names: tuple[str, ...]) -> tuple[list[_Fold], dict[str, str]]:
    """The weights to fold for ``names`` (adapters attached and not sampling), and skipped site -> reason."""
    calls_by_site: dict[str, list[Site]] = {}
    for s in read_sites(gm):
        calls_by_site.setdefault(s.name, []).append(s)
    readers: dict[str, list[Node]] = {}
    for g in graph_modules(gm):
        for n in g.graph.find_nodes(op="get_attr"):
            readers.setdefault(qualified_name(g, str(n.target)), []).extend(n.users)
    folds: list[_Fold] = []
    skipped: dict[str, str] = {}
    for name, calls in calls_by_site.items():
        attached = tuple(a for a in names if any(a in c.adapters for c in calls))
        samples = tuple(a for a in attached if a in calls[0].sampling)
        if samples:
            skipped[name] = f"adapter(s) {list(samples)} sample at inference"
        deterministic = tuple(a for a in attached if a not in samples)
        if not deterministic:
            continue
        reason = _unmergeable(readers, calls, deterministic)
        if reason is not None:
            skipped[name] = reason
            continue
        folds.append(_Fold(calls[0].weight, calls[0], deterministic))
    return folds, skipped


def _merged(gm: GraphModule, folds: list[_Fold], safe_merge: bool, templates: Optional[dict[str, nn.Module]] = None,
            biases: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Slot]:
    """Weight qualname -> what replaces it, nothing installed: ``W + sum(ΔW)``; for a bitsandbytes site a new layer,
    quantized like ``templates[path]`` (default: its own) with ``biases[path]``, its rounding error logged."""
    out: dict[str, Slot] = {}
    worst: tuple[float, float, str] = (-1.0, 0.0, "")
    layers = sum(f.layer for f in folds)
    for f in folds:
        site, old = f.site, f.original if f.original is not None else _slot(gm, f.weight, f.layer)
        if not f.layer:
            acc = add_deltas(old.detach().to(torch.float32, copy=True), gm, site, f.adapters)
            _check_finite(safe_merge, acc, site, f.adapters, repr(f.weight))
            out[f.weight] = like(old, acc.to(old.dtype))
            continue
        path, dense = _layer_path(f.weight), dequantized_weight(old).to(torch.float32)
        delta = add_deltas(torch.zeros(site.out_features, site.in_features, device=dense.device), gm, site, f.adapters)
        dense += delta
        _check_finite(safe_merge, dense, site, f.adapters, f"its dequantized {site.kind} weight")
        out[f.weight] = requantized((templates or {}).get(path, old), dense, (biases or {}).get(path))
        error, update = rounding_error(old, out[f.weight], delta)
        logger.debug("merge: %s (%s): requantized; rounding error %.3g (update at most %.3g)", site.name, site.kind,
                     error, update)
        worst = max(worst, (error, update, site.name))
    if layers:
        logger.info("merge: requantized %d bitsandbytes site(s); rounding error (max |merged - unmerged| output on "
                    "a probe) %.3g at %r, where the update is at most %.3g", layers, worst[0], worst[2], worst[1])
    return out


def _check_finite(safe_merge: bool, merged: torch.Tensor, site: Site, adapters: tuple[str, ...], what: str) -> None:
    """``safe_merge``'s check."""
    if safe_merge and not bool(torch.isfinite(merged).all()):
        raise ValueError(f"safe_merge=True: merging adapter(s) {list(adapters)} into site {site.name!r} gives "
                         f"non-finite values in {what}; nothing was changed. Check that adapter's lambdas "
                         "(vera_fx_adapters.<adapter>.sites.<site>) for NaN/inf, e.g. from a diverged run")


@contextlib.contextmanager
def rollback(gm: GraphModule, slots: Iterable[tuple[str, bool]]) -> Iterator[None]:
    """Put ``gm``'s graphs, the ``(weight, layer)`` slots and the merge records back if the block raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec deprecation inside deepcopy
        graphs = [(g, copy.deepcopy(g.graph)) for g in graph_modules(gm)]
    saved = {w: _slot(gm, w, layer) for w, layer in slots}
    flags = adapter_flags(gm)
    records = (dict(flags.merged), dict(flags.folded))
    try:
        yield
    except BaseException:
        for g, graph in graphs:
            g.graph = graph  # the setter recompiles
        for w, value in saved.items():
            _install(gm, w, value)
        flags.merged, flags.folded = records
        raise


class MergePass(PassBase):
    """Fold ``adapter_names`` (default: the active adapters) into their sites' weights; erase their nodes."""

    def __init__(self, adapter_names: Optional[Iterable[str]] = None, safe_merge: bool = False) -> None:
        super().__init__()
        self.adapter_names = adapter_names
        self.safe_merge = safe_merge

    def call(self, graph_module: GraphModule) -> PassResult:
        gm = graph_module
        names = _check_names(gm, self.adapter_names)
        folds, skipped = _plan(gm, names)
        if skipped:
            warnings.warn(f"merge cannot fold at {len(skipped)} site(s), left as adapter nodes: "
                          + "; ".join(f"{name!r}: {why}" for name, why in skipped.items()), UserWarning,
                          stacklevel=_USER_LEVEL)
        if not folds:
            already = sorted(merged_adapters(gm) & set(names))
            msg = f"merge: nothing to fold for adapters {list(names)}" + (
                f" ({already} already merged: call vera_fx.unmerge first to merge again)" if already else
                " (an inactive adapter has no nodes: vera_fx.set_adapter it first)")
            if self.adapter_names is not None:
                warnings.warn(msg, UserWarning, stacklevel=_USER_LEVEL)
            else:
                logger.info(msg)
            return PassResult(gm, False)
        new = _merged(gm, folds, self.safe_merge)
        flags = adapter_flags(gm)
        with rollback(gm, [(f.weight, f.layer) for f in folds]):  # which puts the records back too
            for f in folds:
                value = new[f.weight]
                old = _install(gm, f.weight, value)
                prev = flags.folded.get(f.weight)  # a site merged before keeps its first original: the graph's own
                flags.folded[f.weight] = Folded(f.site.name, (prev.adapters if prev else ()) + f.adapters,
                                                prev.original if prev else old, value,
                                                -1 if f.layer else value._version)
                flags.merged[f.site.name] = flags.merged.get(f.site.name, ()) + f.adapters
            remove_adapter_nodes(gm, {a: {f.site.name for f in folds if a in f.adapters} for a in names})
        logger.info("merge: folded %s into %d weights", sorted({a for f in folds for a in f.adapters}), len(folds))
        return PassResult(gm, True)


class UnmergePass(PassBase):
    """Put back every merged weight and re-emit the merged adapters' nodes."""

    def call(self, graph_module: GraphModule) -> PassResult:
        gm = graph_module
        flags = adapter_flags(gm)
        folded = dict(flags.folded)
        if not folded:
            logger.info("unmerge: nothing is merged")
            return PassResult(gm, False)
        restored = {q: rec.original if rec.is_layer else self._restored(gm, q, rec) for q, rec in folded.items()}
        merged_meta = dict(flags.merged)
        with rollback(gm, [(q, rec.is_layer) for q, rec in folded.items()]):
            for q, value in restored.items():
                _install(gm, q, value)
            for a in adapters_of(gm):
                sites = {s for s, ads in merged_meta.items() if a in ads}
                if sites:
                    emit_adapter(gm, a, sites)
            flags.merged, flags.folded = {}, {}
        layers = sum(rec.is_layer for rec in folded.values())
        logger.info("unmerge: restored %d weights and %d quantized layers", len(folded) - layers, layers)
        return PassResult(gm, True)

    @staticmethod
    def _restored(gm: GraphModule, qualname: str, rec: Folded) -> torch.Tensor:
        """The original tensor when the merged one is untouched; else the current one minus the deltas."""
        current, orig = get_tensor(gm, qualname), rec.original
        if current is rec.merged and current._version == rec.version and orig.shape == current.shape:
            if orig.dtype == current.dtype and orig.device == current.device:
                return orig
            return like(current, orig.detach().to(device=current.device, dtype=current.dtype))
        warnings.warn(f"unmerge: the merged weight {qualname!r} (site {rec.site!r}) was changed after merge; "
                      "restoring it by subtracting the adapters' current delta (exact only up to rounding)",
                      UserWarning, stacklevel=_USER_LEVEL + 1)
        site = next(s for s in read_sites(gm) if s.name == rec.site)
        acc = add_deltas(current.detach().to(torch.float32, copy=True), gm, site, rec.adapters, sign=-1.0)
        return like(current, acc.to(current.dtype))


@mutation
def merge(gm: GraphModule, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> GraphModule:
    """Fold the active (or the named) deterministic adapters into the base weights; returns ``gm``. Sites that
    sample at inference and tied weights stay as adapter nodes, with a warning; the captured model is never
    changed; ``safe_merge=True`` refuses a non-finite merged weight. Atomic; merging a merged adapter is a no-op."""
    if not isinstance(safe_merge, bool):
        raise TypeError(f"safe_merge must be a bool, got {safe_merge!r}")
    MergePass(adapter_names, safe_merge)(as_graph_module(gm, "merge"))
    return gm


@mutation
def unmerge(gm: GraphModule) -> GraphModule:
    """Undo every merge: the original weights go back (exact; one changed since, by subtraction, with a warning)
    and the adapter nodes are re-emitted."""
    UnmergePass()(as_graph_module(gm, "unmerge"))
    return gm
def _baked_tensors(model: nn.Module, gm: GraphModule, folded: dict[str, torch.Tensor],
                   problems: list[str]) -> dict[str, torch.Tensor]:
    """Model parameter name -> the value ``merge_into`` writes (folded, trained or converted), problems appended."""
    reads: dict[str, str] = {}  # model parameter -> the tensor the base graph reads for it (modules_to_save copies)
    for g in graph_modules(gm):
        for n in g.graph.find_nodes(op="get_attr"):
            target, mts = qualified_name(g, str(n.target)), n.meta.get(MTS_TAG)
            try:
                if not n.meta.get(ADAPTER_KEY) and isinstance(get_tensor(gm, target), nn.Parameter):
                    reads[qualified_name(g, str(mts["target"])) if mts else target] = target
            except AttributeError:
                continue  # not a tensor attribute (the ``training`` flags)
    new: dict[str, torch.Tensor] = {}
    for model_name, graph_name in reads.items():
        value = folded[graph_name] if graph_name in folded else get_tensor(gm, graph_name).detach()
        try:
            mp = model.get_parameter(model_name)
        except AttributeError:
            problems.append(f"{model_name!r}: no such parameter on {type(model).__name__}")
            continue
        if tuple(mp.shape) != tuple(value.shape):
            problems.append(f"{model_name!r}: shape {tuple(mp.shape)} on the model, {tuple(value.shape)} on the "
                            "graph")
        elif graph_name in folded or value.data_ptr() != mp.data_ptr() or value.dtype != mp.dtype:
            new[model_name] = value
    ties: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(name)
    for model_name in new:
        others = [n for n in ties.get(id(model.get_parameter(model_name)), []) if n != model_name and n not in new]
        if others:
            problems.append(f"{model_name!r} is tied to {others}: writing it would change those too; untie the "
                            "weights (e.g. tie_word_embeddings=False) or leave that site out of target_modules")
    return new


def _baked_layers(model: nn.Module, gm: GraphModule, folds: list[_Fold], safe_merge: bool,
                  problems: list[str]) -> dict[str, nn.Module]:
    """For ``merge_into``: layer path -> new layer for ``model`` (the graph's unmerged layer plus every adapter's
    update, one rounding, quantized like ``model``'s layer), problems appended."""
    plans = {f.weight: f for f in folds if f.layer}
    records = {w: rec for w, rec in adapter_flags(gm).folded.items() if rec.is_layer}
    sites = {s.weight: s for s in read_sites(gm)} if records else {}
    for weight, rec in records.items():
        planned = plans.get(weight)
        plans[weight] = _Fold(weight, planned.site if planned else sites[weight],
                              rec.adapters + (planned.adapters if planned else ()), rec.original)
    templates: dict[str, nn.Module] = {}
    biases: dict[str, torch.Tensor] = {}
    for weight, f in plans.items():
        path = _layer_path(weight)
        layer = f.original if f.original is not None else gm.get_submodule(path)
        try:
            mine = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path!r}: no such layer on {type(model).__name__}")
            continue
        if type(mine) is not type(layer) or (mine.out_features, mine.in_features) != (layer.out_features,
                                                                                        layer.in_features):
            problems.append(f"{path!r}: a {type(mine).__name__} on the model, a {type(layer).__name__} "
                            f"{layer.out_features}x{layer.in_features} on the graph")
            continue
        templates[path] = mine
        bias = gm.get_submodule(path).bias
        if bias is not None and mine.bias is not None and bias is not mine.bias:
            biases[path] = nn.Parameter(bias.detach().clone(), requires_grad=mine.bias.requires_grad)
    if problems:
        return {}
    new = _merged(gm, list(plans.values()), safe_merge, templates, biases)
    return {_layer_path(w): m for w, m in new.items()}


def merge_into(model: nn.Module, gm: GraphModule, safe_merge: bool = False) -> nn.Module:
    """Write ``gm``'s adapted weights into ``model`` (the module ``gm`` was captured from), so ``model`` alone
    computes what ``gm`` computes in eval mode; returns ``model``. Active adapters not merged in ``gm`` are folded
    on the way (``gm`` is not changed); trained base parameters are copied too; the model keeps its Parameter
    objects. Everything is checked first; a site that cannot be baked raises ValueError naming it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge_into takes the nn.Module gm was captured from as model, got {type(model).__name__}")
    gm = as_graph_module(gm, "merge_into")
    if not isinstance(safe_merge, bool):
        raise TypeError(f"safe_merge must be a bool, got {safe_merge!r}")
    names = () if adapters_disabled(gm) or not len(adapters_of(gm)) else tuple(active_adapters(gm))
    folds, skipped = _plan(gm, names) if names else ([], {})
    if skipped:  # baking the rest would return a model without the adapter at these sites
        raise ValueError(f"merge_into cannot bake the adapters into {len(skipped)} site(s); nothing was written: "
                         + "; ".join(f"{name!r}: {why}" for name, why in skipped.items()))
    problems: list[str] = []
    layers = _baked_layers(model, gm, folds, safe_merge, problems)
    new = _baked_tensors(model, gm, _merged(gm, [f for f in folds if not f.layer], safe_merge), problems)
    if problems:
        captured_from = model_info(gm).get("class")
        raise ValueError(f"merge_into: the graph (captured from {captured_from}) does not fit "
                         f"{type(model).__name__}; nothing was written: " + "; ".join(problems[:5]) +
                         (f" ... ({len(problems)} problems)" if len(problems) > 5 else ""))
    with torch.no_grad():
        for model_name, value in new.items():
            mp = model.get_parameter(model_name)
            mp.data = value.detach().to(device=mp.device, dtype=mp.dtype, copy=True)
    for path, layer in layers.items():
        set_slot(model, path, layer)
    logger.info("merge_into: wrote %d parameters and %d quantized layers into %s (%d folded from adapters %s)",
                len(new), len(layers), type(model).__name__, len(folds), list(names))
    return model
