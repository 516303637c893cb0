"""What a merge swaps in a graph, and how it is undone: weight tensors, bitsandbytes layers, the rollback.

A dense site is merged by installing a new tensor ``W + ΔW`` at its weight's name (vera_fx/passes/merge.py).
A quantized site (bitsandbytes int8 / nf4 / fp4) keeps its weight in a bitsandbytes parameter whose layer
holds state of its own, so it is merged as PEFT merges into 8-bit and 4-bit layers, into a NEW layer:
dequantize the graph's layer, add the adapters' ΔW in float32 (PVeRA: its mean half), quantize the sum
again (vera_fx/quantized.py) and install that layer at the site's path. The previous layer, which shares its
quantized weight with the user's model, is kept in the merge record (``LayerFolded``, in the record dict
under the weight's name) and put back by unmerge, exactly. Requantizing rounds: every merged site's rounding
error (max |merged - unmerged| output on a probe input) is logged, next to the size of the update itself.

``Rollback`` restores a graph tree, tensors, layers and the merge records when a merge or unmerge fails
half-way, so both passes are atomic.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..methods import CONTAINER
from ..quantized import QUANTIZED_KINDS, dequantized_weight, requantized, rounding_error, set_layer
from ..sites import Site, graph_modules, read_sites
from ..versions import adapter_flags

logger = logging.getLogger(__name__)

# The adapter set's ``flags.folded``: weight qualname -> the record unmerge needs to put the original back (a
# dense site's ``_Folded`` of vera_fx/passes/merge.py, a quantized site's ``LayerFolded``).

# A quantized site to merge: (the site, the adapters to add, the layer to dequantize).
LayerPlan = tuple[Site, tuple[str, ...], nn.Module]


def get_tensor(module: nn.Module, qualname: str) -> torch.Tensor:
    """The parameter or buffer at ``qualname``; AttributeError when it is neither."""
    path, _, name = qualname.rpartition(".")
    mod = module.get_submodule(path)
    if name in mod._parameters and mod._parameters[name] is not None:
        return mod._parameters[name]
    if name in mod._buffers and mod._buffers[name] is not None:
        return mod._buffers[name]
    raise AttributeError(f"{qualname!r} is neither a parameter nor a buffer")


def set_tensor(module: nn.Module, qualname: str, value: torch.Tensor) -> None:
    """Install ``value`` at ``qualname`` (a new object: whatever else held the old one keeps it)."""
    path, _, name = qualname.rpartition(".")
    mod = module.get_submodule(path)
    if name in mod._parameters:
        mod._parameters[name] = value
    else:
        mod._buffers[name] = value


def like(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` wrapped as ``old`` is: a Parameter with its requires_grad, or a plain tensor."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(data, requires_grad=old.requires_grad)
    return data


def is_layer_site(site: Site) -> bool:
    """True for a site merged by replacing its layer (a bitsandbytes layer), not by adding to a tensor."""
    return site.kind in QUANTIZED_KINDS


def layer_path(weight: str) -> str:
    """The layer's module path (in the root of the tree) from its weight's qualified name."""
    return weight.rpartition(".")[0]


@dataclass
class LayerFolded:
    """A merged quantized site: the graph's layer before the merge (put back by unmerge) and the new one."""

    site: str
    adapters: tuple[str, ...]
    original: nn.Module
    merged: nn.Module


def _delta(gm: GraphModule, site: Site, adapters: Iterable[str], device: torch.device) -> torch.Tensor:
    """The adapters' summed (out, in) update at ``site``, float32, on ``device``."""
    container = getattr(gm, CONTAINER)
    total = torch.zeros(site.out_features, site.in_features, device=device)
    with torch.no_grad():
        for a in adapters:
            total += container[a].method.delta_weight(container[a], site).detach().to(device, torch.float32)
    return total


def _merged_layer(gm: GraphModule, plan: LayerPlan, safe_merge: bool, template: Optional[nn.Module],
                  bias: Optional[torch.Tensor]) -> tuple[nn.Module, float, float]:
    """(new layer, rounding error, max update) for one site: ``plan``'s layer dequantized, plus the update,
    quantized into a layer like ``template`` (default: the planned layer)."""
    site, adapters, layer = plan
    dense = dequantized_weight(layer).to(torch.float32)
    delta = _delta(gm, site, adapters, dense.device)
    dense += delta
    if safe_merge and not bool(torch.isfinite(dense).all()):
        raise ValueError(f"safe_merge=True: merging adapter(s) {list(adapters)} into site {site.name!r} gives "
                         f"non-finite values in its dequantized {site.kind} weight; nothing was changed. Check that "
                         "adapter's lambdas for NaN/inf, e.g. from a diverged run")
    new = requantized(template if template is not None else layer, dense, bias)
    error, update = rounding_error(layer, new, delta)
    logger.debug("merge: %s (%s): requantized; rounding error %.3g (update at most %.3g)", site.name, site.kind,
                 error, update)
    return new, error, update


def merged_layers(gm: GraphModule, plans: list[LayerPlan], safe_merge: bool = False,
                  templates: Optional[dict[str, nn.Module]] = None,
                  biases: Optional[dict[str, torch.Tensor]] = None) -> dict[str, nn.Module]:
    """Site weight qualname -> its merged layer, for every plan (nothing installed). ``templates`` / ``biases``
    (by layer path) give a new layer another layer's settings and hooks, or a bias. The rounding errors are
    logged: the largest at INFO, each site's at DEBUG."""
    out: dict[str, nn.Module] = {}
    worst: tuple[float, float, str] = (-1.0, 0.0, "")
    for plan in plans:
        path = layer_path(plan[0].weight)
        new, error, update = _merged_layer(gm, plan, safe_merge, (templates or {}).get(path),
                                           (biases or {}).get(path))
        out[plan[0].weight] = new
        worst = max(worst, (error, update, plan[0].name))
    if plans:
        error, update, name = worst
        logger.info("merge: requantized %d bitsandbytes site(s); rounding error (max |merged - unmerged| output on "
                    "a probe) %.3g at %r, where the update is at most %.3g", len(plans), error, name, update)
    return out


def install_layers(gm: GraphModule, layers: dict[str, nn.Module], plans: list[LayerPlan],
                   folded: dict[str, object]) -> None:
    """Put each merged layer at its site's path and record (in ``folded``) the layer it replaced; a site merged
    before keeps its first original, so unmerge goes back to the graph's own layer."""
    for site, adapters, _ in plans:
        old = set_layer(gm, layer_path(site.weight), layers[site.weight])
        prev = folded.get(site.weight)
        prev = prev if isinstance(prev, LayerFolded) else None
        folded[site.weight] = LayerFolded(site.name, (prev.adapters if prev else ()) + adapters,
                                          prev.original if prev else old, layers[site.weight])


def restore_layers(gm: GraphModule, records: dict[str, LayerFolded]) -> None:
    """Put back the layers the merges replaced (the graph's own layers, sharing the user's weights)."""
    for weight, rec in records.items():
        set_layer(gm, layer_path(weight), rec.original)


def baked_layers(model: nn.Module, gm: GraphModule, plans: list[LayerPlan],
                 safe_merge: bool) -> tuple[dict[str, nn.Module], list[str]]:
    """For ``merge_into``: (layer path -> new layer for ``model``, problems). Every quantized site merged in
    ``gm`` or planned gets a layer quantized from the graph's unmerged layer plus all its adapters' update
    (one rounding), with ``model``'s own layer as the template (its settings and hooks) and the graph's bias."""
    merged = {w: rec for w, rec in adapter_flags(gm).folded.items() if isinstance(rec, LayerFolded)}
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
        self.gm = gm
        self.qualnames = list(qualnames)
        self.layer_paths = list(layers)

    def __enter__(self) -> "Rollback":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec deprecation inside deepcopy
            self.graphs = [(g, copy.deepcopy(g.graph)) for g in graph_modules(self.gm)]
        self.tensors = {q: get_tensor(self.gm, q) for q in self.qualnames}
        self.layers = {p: self.gm.get_submodule(p) for p in self.layer_paths}
        self.flags = adapter_flags(self.gm)
        self.saved = (dict(self.flags.merged), dict(self.flags.folded))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        if exc_type is not None:
            for g, graph in self.graphs:
                g.graph = graph  # the setter recompiles
            for q, t in self.tensors.items():
                set_tensor(self.gm, q, t)
            for p, layer in self.layers.items():
                set_layer(self.gm, p, layer)
            self.flags.merged, self.flags.folded = self.saved
        return False
