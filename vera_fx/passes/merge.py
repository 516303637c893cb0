"""Merge pass: fold deterministic adapters into their sites' base weights; unmerge; write into the model.

``MergePass`` computes ``W + ΔW`` for every site it folds (``Method.delta_weight`` in float32, cast back to the
weight's dtype), swaps the new weights in and erases the adapter nodes, so the graph is node for node the
captured base graph. Copy-on-merge: the graph shares weight storage with the user's model, so merge installs new
tensors (or bitsandbytes layers, vera_fx/passes/merge_layers.py) and keeps the originals, which ``UnmergePass``
puts back exactly; ``merge_into`` is the explicit way to bake the adapters into the model. Both passes are
atomic: everything is computed (and, with ``safe_merge``, checked) before anything changes, and a failure while
rewriting restores the previous graphs and weights.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..methods import CONTAINER
from ..quantized import set_layer
from ..sites import ADAPTER_KEY, Site, as_graph_module, graph_modules, model_info, qualified_name, read_sites
from ..state import ADAPTER_MODE, MTS_TAG, active_adapters, adapters_disabled, adapters_of, merged_adapters, mutation
from ..versions import adapter_flags
from .inject import emit_adapter, remove_adapter_nodes
from .merge_layers import (Rollback, add_deltas, baked_layers, check_finite, get_tensor, is_layer_site, layer_path,
                           like, merged_layers, record_fold, set_tensor)

logger = logging.getLogger(__name__)

_DENSE_KINDS = ("linear", "conv1d")
_USER_LEVEL = 4  # warnings' stacklevel from a pass's call(): call, PassBase.__call__, merge, user
ADAPTER_MODE_FLAG = f"{ADAPTER_MODE}.training"


@dataclass
class _Fold:
    """One weight to fold: its qualified name, its site (first call) and the adapters added to it."""

    weight: str
    site: Site
    adapters: tuple[str, ...]


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
    """Why the weight of a site (all its calls) cannot take ``adapters``, or None; ``readers``: get_attr target ->
    the nodes that use it."""
    site = calls[0]
    if site.kind not in _DENSE_KINDS and not is_layer_site(site):
        return f"its kind {site.kind!r} has no weight vera_fx can merge into"
    if site.weight is None or any(c.weight != site.weight for c in calls):
        return "its weight is computed in the graph, not read from a parameter"
    missing = [a for a in adapters for c in calls if a not in c.adapters]
    if missing:
        return f"adapter(s) {sorted(set(missing))} are attached to only some of its calls"
    if is_layer_site(site):
        return None  # merged into a new bitsandbytes layer at its path (merge_layers.py)
    bases = {c.base for c in calls}
    others = [u.name for u in readers.get(site.weight, []) if u not in bases and not u.meta.get(ADAPTER_KEY)]
    if others:
        return (f"its weight {site.weight!r} is also read by {others[:3]} (tied weights); untie it or leave the "
                "site out of target_modules")
    return None


def _plan(gm: GraphModule, names: tuple[str, ...]) -> tuple[list[_Fold], dict[str, str]]:
    """The weights to fold for ``names`` (adapters attached and not sampling), and skipped site -> reason."""
    container = getattr(gm, CONTAINER)
    calls_by_site: dict[str, list[Site]] = {}
    for s in read_sites(gm):
        calls_by_site.setdefault(s.name, []).append(s)
    sampling = {a: set(container[a].method.sampling_sites(container[a])) for a in names}
    readers: dict[str, list[Node]] = {}
    for g in graph_modules(gm):
        for n in g.graph.nodes:
            if n.op == "get_attr":
                readers.setdefault(qualified_name(g, str(n.target)), []).extend(n.users)
    folds: list[_Fold] = []
    skipped: dict[str, str] = {}
    for name, calls in calls_by_site.items():
        attached = tuple(a for a in names if any(a in c.adapters for c in calls))
        samples = tuple(a for a in attached if name in sampling[a])
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


def _folded_weights(gm: GraphModule, folds: list[_Fold], safe_merge: bool) -> dict[str, torch.Tensor]:
    """Weight qualname -> ``W + sum(ΔW)`` (computed in float32, in the weight's dtype) for every dense fold."""
    new = {}
    for f in folds:
        if not is_layer_site(f.site):
            weight = get_tensor(gm, f.weight)
            acc = add_deltas(weight.detach().to(torch.float32, copy=True), gm, f.site, f.adapters)
            if safe_merge:
                check_finite(acc, f.site, f.adapters, repr(f.weight))
            new[f.weight] = acc.to(weight.dtype)
    return new


def _layer_plans(gm: GraphModule, folds: list[_Fold]) -> list[tuple[Site, tuple[str, ...], nn.Module]]:
    return [(f.site, f.adapters, gm.get_submodule(layer_path(f.weight))) for f in folds if is_layer_site(f.site)]


class _GraphPass(PassBase):
    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


class MergePass(_GraphPass):
    """Fold ``adapter_names`` (default: the active adapters) into their sites' weights; erase their nodes."""

    def __init__(self, adapter_names: Optional[Iterable[str]] = None, safe_merge: bool = False) -> None:
        super().__init__()
        self.adapter_names = adapter_names
        self.safe_merge = safe_merge

    def requires(self, graph_module: GraphModule) -> None:
        as_graph_module(graph_module, "merge")
        if not isinstance(self.safe_merge, bool):
            raise TypeError(f"safe_merge must be a bool, got {self.safe_merge!r}")
        _check_names(graph_module, self.adapter_names)

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
        new = _folded_weights(gm, folds, self.safe_merge)
        plans = _layer_plans(gm, folds)
        layers = merged_layers(gm, plans, self.safe_merge)
        with Rollback(gm, new, map(layer_path, layers)):
            flags = adapter_flags(gm)
            merged_meta: dict[str, tuple[str, ...]] = dict(flags.merged)
            folded = dict(flags.folded)
            for site, adapters, _ in plans:
                old = set_layer(gm, layer_path(site.weight), layers[site.weight])
                record_fold(folded, site.weight, site.name, adapters, old, layers[site.weight])
            for f in folds:
                merged_meta[f.site.name] = merged_meta.get(f.site.name, ()) + f.adapters
                if f.weight in new:
                    old = get_tensor(gm, f.weight)
                    value = like(old, new[f.weight])
                    set_tensor(gm, f.weight, value)
                    record_fold(folded, f.weight, f.site.name, f.adapters, old, value)
            for a in names:
                sites = {f.site.name for f in folds if a in f.adapters}
                if sites:
                    remove_adapter_nodes(gm, a, sites)
            for g in graph_modules(gm):  # the training / adapter-mode flags nothing reads any more
                for n in list(g.graph.nodes):
                    if n.op == "get_attr" and n.target in ("training", ADAPTER_MODE_FLAG) and not n.users:
                        g.graph.erase_node(n)
                g.recompile()
            flags.merged, flags.folded = merged_meta, folded
            gm.graph.lint()
            gm.recompile()
        logger.info("merge: folded %s into %d weights", sorted({a for f in folds for a in f.adapters}), len(folds))
        return PassResult(gm, True)


class UnmergePass(_GraphPass):
    """Put back every merged weight and re-emit the merged adapters' nodes."""

    def requires(self, graph_module: GraphModule) -> None:
        as_graph_module(graph_module, "unmerge")

    def call(self, graph_module: GraphModule) -> PassResult:
        gm = graph_module
        flags = adapter_flags(gm)
        folded = dict(flags.folded)
        if not folded:
            logger.info("unmerge: nothing is merged")
            return PassResult(gm, False)
        layers = {q: rec for q, rec in folded.items() if rec.is_layer}
        restored = {q: self._restored(gm, q, rec) for q, rec in folded.items() if q not in layers}
        merged_meta = dict(flags.merged)
        with Rollback(gm, restored, map(layer_path, layers)):
            for q, value in restored.items():
                set_tensor(gm, q, value)
            for q, rec in layers.items():
                set_layer(gm, layer_path(q), rec.original)
            for a in getattr(gm, CONTAINER):
                sites = {s for s, ads in merged_meta.items() if a in ads}
                if sites:
                    emit_adapter(gm, a, sites)
            flags.merged, flags.folded = {}, {}
            gm.graph.lint()
            gm.recompile()
        logger.info("unmerge: restored %d weights and %d quantized layers", len(restored), len(layers))
        return PassResult(gm, True)

    @staticmethod
    def _restored(gm: GraphModule, qualname: str, rec) -> torch.Tensor:  # noqa: ANN001 (a merge_layers.Folded)
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
    """Fold the active (or the named) deterministic adapters into the base weights; returns ``gm`` changed.

    Sites that sample at inference and tied weights stay as adapter nodes, with a warning naming them. A
    bitsandbytes site gets a new requantized layer (its rounding error is logged); the model ``gm`` was captured
    from is never changed. ``safe_merge=True`` raises ValueError naming the site when a merged weight is not
    finite. Atomic; merging an already merged adapter is a no-op.
    """
    MergePass(adapter_names, safe_merge)(as_graph_module(gm, "merge"))
    return gm


@mutation
def unmerge(gm: GraphModule) -> GraphModule:
    """Undo every merge: the original weight tensors go back (exact) and the adapter nodes are re-emitted. A merged
    weight changed in the meantime is restored by subtraction instead, with a warning."""
    UnmergePass()(as_graph_module(gm, "unmerge"))
    return gm


def _graph_reads(gm: GraphModule) -> dict[str, str]:
    """Model parameter name -> the name of the tensor the graph reads in its place, for every parameter the
    base graph reads (a ``modules_to_save`` copy stands in for the parameter it was copied from)."""
    reads: dict[str, str] = {}
    for g, n, target in ((g, n, qualified_name(g, str(n.target))) for g in graph_modules(gm) for n in g.graph.nodes):
        if n.op != "get_attr" or n.meta.get(ADAPTER_KEY) or n.target in ("training", ADAPTER_MODE_FLAG):
            continue
        mts = n.meta.get(MTS_TAG)
        try:
            if isinstance(get_tensor(gm, target), nn.Parameter):
                reads[qualified_name(g, str(mts["target"])) if mts else target] = target
        except AttributeError:
            continue  # not a tensor attribute
    return reads


def _baked_tensors(model: nn.Module, gm: GraphModule, folded: dict[str, torch.Tensor],
                   problems: list[str]) -> dict[str, torch.Tensor]:
    """Model parameter name -> the value ``merge_into`` writes (folded, trained or converted), problems appended."""
    new: dict[str, torch.Tensor] = {}
    for model_name, graph_name in _graph_reads(gm).items():
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


def merge_into(model: nn.Module, gm: GraphModule, safe_merge: bool = False) -> nn.Module:
    """Write ``gm``'s adapted weights into ``model`` (the module ``gm`` was captured from); returns ``model``.

    Afterwards ``model`` alone computes what ``gm`` computes in eval mode (``generate()`` and ``save_pretrained()``
    carry the adapters): merged weights are copied, active adapters not merged in ``gm`` are folded on the way
    (``gm`` is not changed), trained base parameters (``bias``, ``modules_to_save``) are copied too. Every name,
    shape and tie is checked before anything is written; the model keeps its Parameter objects, with new storage;
    a bitsandbytes site gets a new quantized layer. A site that cannot be baked (it samples at inference, tied
    weights) raises ValueError naming it: the model never comes back without an adapter.
    """
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
    folded = _folded_weights(gm, folds, safe_merge)
    layers, problems = baked_layers(model, gm, _layer_plans(gm, folds), safe_merge)
    new = _baked_tensors(model, gm, folded, problems)
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
        set_layer(model, path, layer)
    logger.info("merge_into: wrote %d parameters and %d quantized layers into %s (%d folded from adapters %s)",
                len(new), len(layers), type(model).__name__, len(folds), list(names))
    return model
