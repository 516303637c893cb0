"""What a merge swaps in a graph and how it is undone: a dense site gets a new tensor ``W + ΔW`` at its
weight's name (vera_fx/passes/merge.py); a bitsandbytes site, as in PEFT, a NEW layer: the graph's layer
dequantized, plus ΔW in float32, quantized again (each site's rounding error is logged next to the size of the
update). The replaced tensor or layer (sharing storage with the user's model) is kept in ``flags.folded``
(``Folded``) and put back exactly by unmerge; ``Rollback`` restores everything when a merge or unmerge fails.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule

from ..methods import CONTAINER
from ..quantized import QUANTIZED_KINDS, dequantized_weight, requantized, rounding_error, set_layer
from ..sites import Site, graph_modules, read_sites
from ..versions import adapter_flags

logger = logging.getLogger(__name__)

LayerPlan = tuple[Site, tuple[str, ...], nn.Module]  # a quantized site, the adapters to add, its layer


def get_tensor(module: nn.Module, qualname: str) -> torch.Tensor:
    """The parameter or buffer at ``qualname``; AttributeError when it is neither."""
    path, _, name = qualname.rpartition(".")
    mod = module.get_submodule(path)
    for where in (mod._parameters, mod._buffers):
        if where.get(name) is not None:
            return where[name]
    raise AttributeError(f"{qualname!r} is neither a parameter nor a buffer")


def set_tensor(module: nn.Module, qualname: str, value: torch.Tensor) -> None:
    """Install ``value`` at ``qualname`` (a new object: whatever else held the old one keeps it)."""
    path, _, name = qualname.rpartition(".")
    mod = module.get_submodule(path)
    (mod._parameters if name in mod._parameters else mod._buffers)[name] = value


def like(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` wrapped as ``old`` is: a Parameter with its requires_grad, or a plain tensor."""
    return nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data


def is_layer_site(site: Site) -> bool:
    """True for a site merged by replacing its (bitsandbytes) layer, not by adding to a tensor."""
    return site.kind in QUANTIZED_KINDS


def layer_path(weight: str) -> str:
    """The layer's module path (in the root of the tree) from its weight's qualified name."""
    return weight.rpartition(".")[0]


def add_deltas(acc: torch.Tensor, gm: GraphModule, site: Site, adapters: tuple[str, ...],
               sign: float = 1.0) -> torch.Tensor:
    """``acc += sign * ΔW`` of each adapter at ``site`` in place (float32, in the weight's layout: transposed for
    Conv1D)."""
    container = getattr(gm, CONTAINER)
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


def check_finite(merged: torch.Tensor, site: Site, adapters: tuple[str, ...], what: str) -> None:
    """``safe_merge``'s check: a ValueError naming the site and adapters when ``merged`` is not finite."""
    if not bool(torch.isfinite(merged).all()):
        raise ValueError(f"safe_merge=True: merging adapter(s) {list(adapters)} into site {site.name!r} gives "
                         f"non-finite values in {what}; nothing was changed. Check that adapter's lambdas "
                         "(vera_fx_adapters.<adapter>.sites.<site>) for NaN/inf, e.g. from a diverged run")


@dataclass
class Folded:
    """A merged weight or quantized layer: what it replaced (put back by unmerge) and what merge installed."""

    site: str
    adapters: tuple[str, ...]
    original: Union[torch.Tensor, nn.Module]
    merged: Union[torch.Tensor, nn.Module]
    version: int = -1  # a tensor's merged._version when installed: a later in-place change shows up here

    @property
    def is_layer(self) -> bool:
        return isinstance(self.merged, nn.Module)

    def __deepcopy__(self, memo: dict) -> "Folded":
        merged = copy.deepcopy(self.merged, memo)  # a copy of a tensor starts a fresh version counter
        version = merged._version if not self.is_layer and self.merged._version == self.version else -1
        return Folded(self.site, self.adapters, copy.deepcopy(self.original, memo), merged, version)


def record_fold(folded: dict[str, Folded], weight: str, site: str, adapters: tuple[str, ...],
                old: Union[torch.Tensor, nn.Module], new: Union[torch.Tensor, nn.Module]) -> None:
    """Record in ``folded`` that ``new`` replaced ``old`` at ``weight``; a site merged before keeps its first
    original, so unmerge goes back to the graph's own tensor or layer."""
    prev = folded.get(weight)
    folded[weight] = Folded(site, (prev.adapters if prev else ()) + adapters, prev.original if prev else old, new,
                            -1 if isinstance(new, nn.Module) else new._version)


def merged_layers(gm: GraphModule, plans: list[LayerPlan], safe_merge: bool = False,
                  templates: Optional[dict[str, nn.Module]] = None,
                  biases: Optional[dict[str, torch.Tensor]] = None) -> dict[str, nn.Module]:
    """Site weight qualname -> its merged layer (nothing installed), quantized like ``templates[path]`` (default:
    the planned layer) with ``biases[path]``; rounding errors logged (the largest at INFO, each at DEBUG)."""
    out: dict[str, nn.Module] = {}
    worst: tuple[float, float, str] = (-1.0, 0.0, "")
    for site, adapters, layer in plans:
        path = layer_path(site.weight)
        dense = dequantized_weight(layer).to(torch.float32)
        delta = add_deltas(torch.zeros(site.out_features, site.in_features, device=dense.device), gm, site, adapters)
        dense += delta
        if safe_merge:
            check_finite(dense, site, adapters, f"its dequantized {site.kind} weight")
        new = requantized((templates or {}).get(path, layer), dense, (biases or {}).get(path))
        error, update = rounding_error(layer, new, delta)
        logger.debug("merge: %s (%s): requantized; rounding error %.3g (update at most %.3g)", site.name, site.kind,
                     error, update)
        out[site.weight] = new
        worst = max(worst, (error, update, site.name))
    if plans:
        error, update, name = worst
        logger.info("merge: requantized %d bitsandbytes site(s); rounding error (max |merged - unmerged| output on "
                    "a probe) %.3g at %r, where the update is at most %.3g", len(plans), error, name, update)
    return out


def baked_layers(model: nn.Module, gm: GraphModule, plans: list[LayerPlan],
                 safe_merge: bool) -> tuple[dict[str, nn.Module], list[str]]:
    """For ``merge_into``: (layer path -> new layer for ``model``, problems). Every quantized site merged or planned
    gets the graph's unmerged layer plus all its adapters' update (one rounding), like ``model``'s own layer."""
    merged = {w: rec for w, rec in adapter_flags(gm).folded.items() if rec.is_layer}
    by_weight = {site.weight: (site, adapters, layer) for site, adapters, layer in plans}
    sites = {s.weight: s for s in read_sites(gm)} if merged else {}
    for weight, rec in merged.items():
        site, adapters, _ = by_weight.get(weight, (sites[weight], (), None))
        by_weight[weight] = (site, rec.adapters + adapters, rec.original)
    templates: dict[str, nn.Module] = {}
    biases: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for weight, (site, _, layer) in by_weight.items():
        path = layer_path(weight)
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
        return {}, problems
    new = merged_layers(gm, list(by_weight.values()), safe_merge, templates, biases)
    return {layer_path(w): m for w, m in new.items()}, []


class Rollback:
    """Restores ``gm``'s graphs, the given tensors and layers and the merge records when the block raises."""

    def __init__(self, gm: GraphModule, qualnames: Iterable[str], layers: Iterable[str] = ()) -> None:
        self.gm, self.qualnames, self.layer_paths = gm, list(qualnames), list(layers)

    def __enter__(self) -> "Rollback":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec deprecation inside deepcopy
            self.graphs = [(g, copy.deepcopy(g.graph)) for g in graph_modules(self.gm)]
        self.tensors = {q: get_tensor(self.gm, q) for q in self.qualnames}
        self.layers = {p: self.gm.get_submodule(p) for p in self.layer_paths}
        self.flags = adapter_flags(self.gm)
        self.saved = (dict(self.flags.merged), dict(self.flags.folded))
        return self

    def __exit__(self, exc_type: object, *exc: object) -> bool:
        if exc_type is not None:
            for g, graph in self.graphs:
                g.graph = graph  # the setter recompiles
            for q, t in self.tensors.items():
                set_tensor(self.gm, q, t)
            for p, layer in self.layers.items():
                set_layer(self.gm, p, layer)
            self.flags.merged, self.flags.folded = self.saved
        return False
