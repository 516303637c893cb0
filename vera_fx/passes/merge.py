"""Merge pass: fold deterministic adapters into their sites' base weights; unmerge; write into the model.

``MergePass`` computes ``W + delta`` for every site it folds (``Method.delta_weight``, transposed where the
weight is stored (in, out) as in Conv1D; float32 arithmetic, cast back to the weight's dtype), then swaps the
new weights in and erases the adapter nodes, so the graph is node for node the captured base graph.

Copy-on-merge: the captured graph shares weight storage with the user's model, so merge never writes into
a weight; it installs a new tensor at the weight's name and keeps the original object, which ``UnmergePass``
puts back (exactly, unless the merged weight was changed in the meantime). The user's model is untouched;
``merge_into`` is the explicit way to bake the adapters into it. A bitsandbytes site is merged into a new
quantized layer instead (vera_fx/passes/merge_layers.py, with the tensor helpers and the rollback).

Both passes are atomic: every new weight is computed (and, with ``safe_merge``, checked) before anything
changes, and a failure while rewriting the graph restores the previous graph and weights.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..methods import CONTAINER, AdapterState
from ..quantized import set_layer
from ..sites import ADAPTER_KEY, Site, as_graph_module, block_prefix, graph_modules, model_info, read_sites
from ..state import ADAPTER_MODE, MTS_TAG, active_adapters, adapters_disabled, adapters_of, merged_adapters, mutation
from ..versions import adapter_flags
from .inject import emit_adapter, remove_adapter_nodes
from .merge_layers import (LayerFolded, Rollback, baked_layers, get_tensor, install_layers,
                           is_layer_site, layer_path, like, merged_layers, restore_layers, set_tensor)

logger = logging.getLogger(__name__)

_DENSE_KINDS = ("linear", "conv1d")
# warnings.warn stacklevel from a pass's call() to the caller of merge() / unmerge(): call, PassBase.__call__,
# merge, user.
_USER_LEVEL = 4


@dataclass
class _Fold:
    """One weight to fold: its qualified name, its site (first call) and the adapters added to it."""

    weight: str
    site: Site
    adapters: tuple[str, ...]


@dataclass
class _Folded:
    """A merged weight: the tensor it replaced (restored by unmerge) and the one merge installed."""

    site: str
    adapters: tuple[str, ...]
    original: torch.Tensor
    merged: torch.Tensor
    version: int  # merged._version when installed: a later in-place change shows up here

    def __deepcopy__(self, memo: dict) -> "_Folded":
        merged = copy.deepcopy(self.merged, memo)  # a copy starts a fresh version counter
        return _Folded(self.site, self.adapters, copy.deepcopy(self.original, memo), merged,
                       merged._version if self.merged._version == self.version else -1)


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
    """Why the weight of a site (all its calls) cannot take ``adapters`` (None when it can); ``readers`` maps
    each get_attr target to the nodes that use it."""
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
                readers.setdefault(_qualified(g, str(n.target)), []).extend(n.users)
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


def _delta(state: AdapterState, site: Site, like: torch.Tensor) -> torch.Tensor:
    """The adapter's update in the weight's layout, float32, on the weight's device."""
    with torch.no_grad():
        delta = state.method.delta_weight(state, site).detach()
    if site.fan_in_fan_out:
        delta = delta.T
    if tuple(delta.shape) != tuple(like.shape):
        raise ValueError(f"site {site.name!r}: the adapter's delta has shape {tuple(delta.shape)} but the weight "
                         f"{site.weight!r} has shape {tuple(like.shape)}; the graph's weight was replaced by one of "
                         "another shape: capture and transform the model again")
    return delta.to(device=like.device, dtype=torch.float32)


def _folded_weight(gm: GraphModule, fold: _Fold, weight: torch.Tensor, safe_merge: bool,
                   sign: float = 1.0) -> torch.Tensor:
    """``weight + sign * sum(deltas)`` as a new tensor of the weight's dtype, computed in float32."""
    container = getattr(gm, CONTAINER)
    acc = weight.detach().to(torch.float32, copy=True)
    for a in fold.adapters:
        acc.add_(_delta(container[a], fold.site, acc), alpha=sign)
    if safe_merge and not bool(torch.isfinite(acc).all()):
        raise ValueError(f"safe_merge=True: merging adapter(s) {list(fold.adapters)} into site {fold.site.name!r} "
                         f"gives non-finite values in {fold.weight!r}; nothing was changed. Check that adapter's "
                         "lambdas (vera_fx_adapters.<adapter>.sites.<site>) for NaN/inf, e.g. from a diverged run")
    return acc.to(weight.dtype)


def _qualified(g: GraphModule, target: str) -> str:
    """A get_attr target of graph ``g`` as a name in the root module of its tree."""
    prefix = block_prefix(g)
    return f"{prefix}.{target}" if prefix else target


def _warn_skipped(skipped: dict[str, str], what: str, stacklevel: int) -> None:
    if skipped:
        detail = "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
        warnings.warn(f"{what} at {len(skipped)} site(s), left as adapter nodes: {detail}", UserWarning,
                      stacklevel=stacklevel + 1)


ADAPTER_MODE_FLAG = f"{ADAPTER_MODE}.training"


def _drop_unused_training(gm: GraphModule) -> None:
    """Erase the ``get_attr('training')`` / adapter-mode nodes when nothing reads them any more."""
    for g in graph_modules(gm):
        for n in list(g.graph.nodes):
            if n.op == "get_attr" and n.target in ("training", ADAPTER_MODE_FLAG) and not n.users:
                g.graph.erase_node(n)
        g.recompile()




class MergePass(PassBase):
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
        _warn_skipped(skipped, "merge cannot fold", _USER_LEVEL)
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
        dense = [f for f in folds if not is_layer_site(f.site)]
        new = {f.weight: _folded_weight(gm, f, get_tensor(gm, f.weight), self.safe_merge) for f in dense}
        plans = [(f.site, f.adapters, gm.get_submodule(layer_path(f.weight))) for f in folds if is_layer_site(f.site)]
        layers = merged_layers(gm, plans, self.safe_merge)

        with Rollback(gm, new, map(layer_path, layers)):
            flags = adapter_flags(gm)
            merged_meta: dict[str, tuple[str, ...]] = dict(flags.merged)
            folded: dict[str, object] = dict(flags.folded)
            install_layers(gm, layers, plans, folded)
            for f in folds:
                merged_meta[f.site.name] = merged_meta.get(f.site.name, ()) + f.adapters
            for f in dense:
                old = get_tensor(gm, f.weight)
                value = like(old, new[f.weight])
                set_tensor(gm, f.weight, value)
                prev = folded.get(f.weight)
                folded[f.weight] = _Folded(f.site.name, (prev.adapters if prev else ()) + f.adapters,
                                           prev.original if prev else old, value, value._version)
            for a in names:
                sites = {f.site.name for f in folds if a in f.adapters}
                if sites:
                    remove_adapter_nodes(gm, a, sites)
            _drop_unused_training(gm)
            flags.merged, flags.folded = merged_meta, folded
            gm.graph.lint()
            gm.recompile()
        logger.info("merge: folded %s into %d weights", sorted({a for f in folds for a in f.adapters}), len(folds))
        return PassResult(gm, True)

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


class UnmergePass(PassBase):
    """Put back every merged weight and re-emit the merged adapters' nodes."""

    def requires(self, graph_module: GraphModule) -> None:
        as_graph_module(graph_module, "unmerge")

    def call(self, graph_module: GraphModule) -> PassResult:
        gm = graph_module
        flags = adapter_flags(gm)
        folded: dict[str, object] = dict(flags.folded)
        if not folded:
            logger.info("unmerge: nothing is merged")
            return PassResult(gm, False)
        layers = {q: rec for q, rec in folded.items() if isinstance(rec, LayerFolded)}
        restored = {q: self._restored(gm, q, rec) for q, rec in folded.items() if q not in layers}
        merged_meta = dict(flags.merged)
        with Rollback(gm, restored, map(layer_path, layers)):
            for q, value in restored.items():
                set_tensor(gm, q, value)
            restore_layers(gm, layers)
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
    def _restored(gm: GraphModule, qualname: str, rec: _Folded) -> torch.Tensor:
        """The original tensor when the merged one is untouched; else the current one minus the deltas."""
        current = get_tensor(gm, qualname)
        orig = rec.original
        if current is rec.merged and current._version == rec.version and orig.shape == current.shape:
            if orig.dtype == current.dtype and orig.device == current.device:
                return orig
            return like(current, orig.detach().to(device=current.device, dtype=current.dtype))
        warnings.warn(f"unmerge: the merged weight {qualname!r} (site {rec.site!r}) was changed after merge; "
                      "restoring it by subtracting the adapters' current delta (exact only up to rounding)",
                      UserWarning, stacklevel=_USER_LEVEL + 1)
        site = next(s for s in read_sites(gm) if s.name == rec.site)
        fold = _Fold(qualname, site, rec.adapters)
        return like(current, _folded_weight(gm, fold, current, safe_merge=False, sign=-1.0))

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


@mutation
def merge(gm: GraphModule, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> GraphModule:
    """Fold the active (or the named) deterministic adapters into the base weights; returns ``gm`` changed.

    The graph becomes node for node the captured base graph at the folded sites. Sites that sample at
    inference and tied weights stay as adapter nodes, with a warning naming them. Copy-on-merge: folded
    weights are new tensors and a bitsandbytes site gets a new requantized layer (its rounding error is
    logged), so the model ``gm`` was captured from is never changed.
    ``safe_merge=True`` raises ValueError naming the site when a merged weight is not finite. Atomic: on any
    error ``gm`` is left as it was. Merging an already merged adapter is a no-op (nothing is added twice).
    """
    MergePass(adapter_names, safe_merge)(as_graph_module(gm, "merge"))
    return gm


@mutation
def unmerge(gm: GraphModule) -> GraphModule:
    """Undo every merge: the original weight tensors go back (exact) and the adapter nodes are re-emitted.

    A merged weight changed in the meantime (e.g. by ``load_state_dict``) is restored by subtraction instead,
    with a warning. A graph with nothing merged is returned unchanged.
    """
    UnmergePass()(as_graph_module(gm, "unmerge"))
    return gm


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _graph_reads(gm: GraphModule) -> dict[str, str]:
    """Model parameter name -> the name of the tensor the graph reads in its place, for every parameter the
    base graph reads (a ``modules_to_save`` copy stands in for the parameter it was copied from)."""
    reads: dict[str, str] = {}
    for g, n, target in ((g, n, _qualified(g, str(n.target))) for g in graph_modules(gm) for n in g.graph.nodes):
        if n.op != "get_attr" or n.meta.get(ADAPTER_KEY) or n.target in ("training", ADAPTER_MODE_FLAG):
            continue
        mts = n.meta.get(MTS_TAG)
        model_name = _qualified(g, str(mts["target"])) if mts else target
        try:
            if isinstance(get_tensor(gm, target), nn.Parameter):
                reads[model_name] = target
        except AttributeError:
            continue  # not a tensor attribute
    return reads


def merge_into(model: nn.Module, gm: GraphModule, safe_merge: bool = False) -> nn.Module:
    """Write ``gm``'s adapted weights into ``model`` (the module ``gm`` was captured from); returns ``model``.

    Afterwards ``model`` alone computes what ``gm`` computes in eval mode, so ``generate()`` and
    ``save_pretrained()`` carry the adapters: merged weights are copied over, active adapters not merged in
    ``gm`` are folded on the way (``gm`` itself is not changed), and trained base parameters (``bias``,
    ``modules_to_save``) are copied too. Matching is by parameter name; every name, shape and tie is checked
    before anything is written. The model keeps its Parameter objects, with new storage, so ``gm`` (which
    may share storage with them) keeps computing what it computed; a bitsandbytes site gets a new quantized
    layer instead (merge_layers.py). A site that cannot be baked (it samples at inference, tied weights)
    raises ValueError naming it: the model never comes back without an adapter.
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
    dense = [f for f in folds if not is_layer_site(f.site)]
    folded = {f.weight: _folded_weight(gm, f, get_tensor(gm, f.weight), safe_merge) for f in dense}
    layers, problems = baked_layers(model, gm, [(f.site, f.adapters, gm.get_submodule(layer_path(f.weight)))
                                                for f in folds if is_layer_site(f.site)], safe_merge)
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
    ties = _tied_names(model)
    for model_name in new:
        others = [n for n in ties.get(id(model.get_parameter(model_name)), []) if n != model_name and n not in new]
        if others:
            problems.append(f"{model_name!r} is tied to {others}: writing it would change those too; untie the "
                            "weights (e.g. tie_word_embeddings=False) or leave that site out of target_modules")
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
