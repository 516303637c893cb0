"""Generation through transformers' own ``generate`` loop with the adapters hooked at their sites, and what both
generation paths share: the inputs, the weight binding (``bind_parameters``, through attach's ``bind_tensors``)
and the KL terms kept (``kl_terms_kept``).

For what the decode graph (generation.py) does not cover: encoder-decoder models (T5, BART, Whisper),
bitsandbytes models, sliding windows past the window. Each site module with a live adapter gets a forward hook
calling a *site graph* ``(x, y) -> y + adapter(x)`` over the training graph's own adapter state, so training or
a switch is seen without re-capturing; the model computes with the training graph's parameters meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from .capture import model_flags_kept
from .methods import CONTAINER
from .methods.pvera import KLRecord
from .passes.infer import DEFAULT_FORM, INFERENCE_KEY
from .passes.attach import bind_tensors, emit_layout, live_layout
from .sites import LINEAR_KINDS, SITE_KEY, Site, graph_modules, read_sites
from .state import adapters_of, modules_to_save_copy, set_adapters_training

logger = logging.getLogger(__name__)
Layout = Sequence[tuple[str, Sequence[str]]]


def site_base(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The site call of a site graph: the module's output ``y`` (``x``: the site's input)."""
    return y


@contextlib.contextmanager
def kl_terms_kept(gm: GraphModule) -> Iterator[None]:
    """The PVeRA KL terms of ``gm``'s tree put back on exit: generation and export tracing must not replace the
    last real forward's (``kl_divergence``)."""
    records = {id(v): (v, dict(v.values)) for g in graph_modules(gm) for state in adapters_of(g).values()
               for v in vars(state).values() if isinstance(v, KLRecord)}
    try:
        yield
    finally:
        for record, values in records.values():
            record.values = values


def bind_parameters(model: nn.Module, gm: GraphModule, undo: Optional[list] = None) -> None:
    """Point every parameter of ``model`` (the eager model, or a decode graph) at ``gm``'s of that name (merged
    weights, trained biases) or, inside a ``modules_to_save`` module of a live adapter, at its copy's, through
    attach's ``bind_tensors`` (changes appended to ``undo``)."""
    container = adapters_of(gm)
    theirs = dict(gm.named_parameters(remove_duplicate=False))
    for name, _ in live_layout(gm):
        for path in getattr(container[name], "modules_to_save_paths", []):
            copy = modules_to_save_copy(container[name], path)
            theirs.update((f"{path}.{n}", p) for n, p in copy.named_parameters(remove_duplicate=False))
    bind_tensors(model, theirs.items(), undo)


@contextlib.contextmanager
def weights_bound(model: nn.Module, gm: GraphModule) -> Iterator[None]:
    """While inside, ``model`` computes with ``gm``'s parameters (``bind_parameters``); put back on exit."""
    undo: list[tuple[dict, str, Optional[torch.Tensor]]] = []
    try:
        bind_parameters(model, gm, undo)
        yield
    finally:
        for store, leaf, old in reversed(undo):
            store[leaf] = old


def site_graph(container: nn.Module, site: Site, adapters: Sequence[str], x_dtype: torch.dtype,
               y_dtype: torch.dtype) -> GraphModule:
    """``(x, y) -> y + sum of the adapters at site``, reading ``container``'s state."""
    graph = Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    x.meta["val"] = torch.empty(1, site.in_features, dtype=x_dtype, device="meta")
    y.meta["val"] = torch.empty(1, site.out_features, dtype=y_dtype, device="meta")
    base = graph.call_function(site_base, (x, y))
    base.meta["val"] = y.meta["val"]
    base.meta[SITE_KEY] = {"name": site.name, "kind": "linear", "in_features": site.in_features,
                           "out_features": site.out_features, "weight": None, "bias": None, "owner_type": "module"}
    graph.output(base)
    gm = GraphModule(nn.Module(), graph, class_name="SiteGraph")
    gm.meta[INFERENCE_KEY] = DEFAULT_FORM
    gm._modules[CONTAINER] = container  # the training graph's own adapter states (registered, not copied)
    emit_layout(gm, [(name, (site.name,)) for name in adapters])
    set_adapters_training(gm, False)
    return gm


def _site_hook(container: nn.Module, site: Site, adapters: Sequence[str]) -> Callable[..., Any]:
    """Forward hook adding the live adapters to a site module's output (one site graph per dtype pair)."""
    graphs: dict[tuple[torch.dtype, torch.dtype], GraphModule] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError(f"site {site.name!r}: {type(module).__name__} takes or returns something other "
                            f"than one tensor ({type(x).__name__} -> {type(output).__name__}); generate adds "
                            "adapters to linear-like modules only")
        if (x.dtype, output.dtype) not in graphs:
            graphs[x.dtype, output.dtype] = site_graph(container, site, adapters, x.dtype, output.dtype)
        return graphs[x.dtype, output.dtype](x, output)

    return hook


def _site_module(model: nn.Module, name: str) -> nn.Module:
    """The module of a site: a linear layer (bitsandbytes' included) or GPT-2's ``Conv1D``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
        what = "no module" if module is None else f"a {type(module).__name__}, not a linear layer"
        raise ValueError(f"site {name!r} is {what} of {type(model).__name__} (a functional linear call inside "
                         "a module): generate adds adapters at linear layers' outputs for this model; leave "
                         "that site out of target_modules, or merge it first (vera_fx.merge)")
    return module


@contextlib.contextmanager
def adapter_hooks(gm: GraphModule, model: nn.Module) -> Iterator[int]:
    """Hook every live adapter site of ``gm`` onto its module in ``model`` while inside; yields their number."""
    per_site: dict[str, list[str]] = {}
    for name, sites in live_layout(gm):
        for s in sites:
            per_site.setdefault(s, []).append(name)
    records = {s.name: s for s in read_sites(gm) if s.name in per_site}
    modules = {name: _site_module(model, name) for name in records}
    handles = []
    try:
        for name, module in modules.items():
            hook = _site_hook(getattr(gm, CONTAINER, None), records[name], per_site[name])
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def model_inputs(source: nn.Module, input_ids: Any, attention_mask: Any) -> dict[str, torch.Tensor]:
    """The model's inputs from generate's first two arguments: ``input_ids`` and its mask (ones when None), or
    the audio features of a model whose main input they are (Whisper)."""
    main = getattr(source, "main_input_name", "input_ids")
    if main != "input_ids":
        if not isinstance(input_ids, torch.Tensor) or not input_ids.is_floating_point() or input_ids.dim() != 3:
            raise ValueError(f"{type(source).__name__} generates from {main} (batch, channels, frames), a float "
                             f"tensor given as the first argument; got {type(input_ids).__name__}"
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        return {main: input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got "
                         f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: give at least one token per sequence")
    if attention_mask is None:
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids, dtype=torch.long)}
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    return {"input_ids": input_ids, "attention_mask": attention_mask.to(dtype=torch.long)}


def eager_reason(source: nn.Module, gm: GraphModule, cache_length: Optional[int]) -> Optional[str]:
    """Why ``generate`` runs transformers' loop rather than the decode graph, or None: an encoder-decoder model,
    bitsandbytes sites, or a sliding window shorter than the decode graph's ``cache_length`` (a static cache
    cannot slide)."""
    cfg = source.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    quantized = sorted({s.kind for s in read_sites(gm) if s.kind in set(LINEAR_KINDS) - {"linear", "conv1d"}})
    if quantized:
        return f"bitsandbytes {'/'.join(quantized)} layers"
    window = getattr(cfg.get_text_config(), "sliding_window", None)
    if cache_length is not None and isinstance(window, int) and window > 0 and cache_length > window:
        return f"sliding_window={window} is shorter than the cache of {cache_length} positions"
    return None


@contextlib.contextmanager
def no_cpu_packing(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from packing 4-bit weights for its CPU kernel during an eval forward: the captured
    graph shares those weights and needs their canonical layout (vera_fx/quantized.py)."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True


def generate_eager(gm: GraphModule, model: nn.Module, inputs: dict[str, torch.Tensor], *,
                   seed: Optional[int] = None, **generate_kwargs: Any) -> torch.Tensor:
    """``model.generate(**inputs, **generate_kwargs)`` with ``gm``'s live adapters hooked onto their sites and its
    weights bound, the model in eval mode (restored after); ``seed`` seeds sampling inside ``fork_rng``."""
    device = next(p.device for p in model.parameters())
    with model_flags_kept(model), weights_bound(model, gm), adapter_hooks(gm, model) as hooked, \
            no_cpu_packing(model), kl_terms_kept(gm), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        model.eval()
        if seed is not None:
            torch.manual_seed(int(seed))
        logger.debug("generate through %s.generate with %d hooked sites", type(model).__name__, hooked)
        return model.generate(**inputs, **generate_kwargs)
