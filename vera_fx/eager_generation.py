"""Generation through transformers' own ``generate`` loop, with the adapters added at their sites.

For the models the decode graph (vera_fx/generation.py) does not cover: encoder-decoder models (T5, BART,
Whisper: transformers runs the encoder once and the decoder with its ``EncoderDecoderCache``, cross-attention
keys included), bitsandbytes models (their layers run as themselves) and sliding-window models past the
window (transformers' sliding-window cache). The user's model runs eagerly; every site module that carries a
live adapter gets a forward hook calling a *site graph*: a two-input GraphModule ``(x, y) -> y + adapter(x)``
whose adapter nodes are emitted by the same ``emit_adapter`` as the training graph's, over the training
graph's own adapter state (its ``vera_fx_adapters`` container). A training step, ``set_adapter``, a disabled
or merged adapter or a sampling switch is therefore seen by the next ``generate`` without re-capturing.

During the call the model's parameters are the training graph's (merged weights and trained biases
included) and each live adapter's ``modules_to_save`` copies take their modules' places; everything is put
back on exit, as are the modules' training flags.
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
from .methods.pvera import pvera_record_kl
from .passes.inject import emit_adapter
from .sites import LINEAR_KINDS, SITE_KEY, Site, read_sites
from .versions import adapter_flags
from .state import active_adapters, adapters_disabled, adapters_of, modules_to_save_copy, set_adapters_training

logger = logging.getLogger(__name__)


def site_base(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The site call of a site graph: its value is the module's output ``y``; ``x`` is the site's input."""
    return y


def live_layout(gm: GraphModule) -> list[tuple[str, tuple[str, ...]]]:
    """(adapter, sites to emit) for every live adapter of ``gm``: active, not disabled, not merged there."""
    container = adapters_of(gm)
    if not len(container) or adapters_disabled(gm):
        return []
    merged = adapter_flags(gm).merged
    out = []
    for name in active_adapters(gm):
        state = container[name]
        sites = tuple(s for s in state.site_names if name not in merged.get(s, ()))
        if sites:
            out.append((name, sites))
    return out


def site_graph(container: nn.Module, site: Site, adapters: Sequence[str], x_dtype: torch.dtype,
               y_dtype: torch.dtype) -> GraphModule:
    """``(x, y) -> y + sum of the adapters at site`` as a GraphModule reading ``container``'s state, in
    inference mode (no adapter dropout; PVeRA samples only where its ``sample_at_inference`` switch is on)."""
    graph = Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    x.meta["val"] = torch.empty(1, site.in_features, dtype=x_dtype, device="meta")
    y.meta["val"] = torch.empty(1, site.out_features, dtype=y_dtype, device="meta")
    base = graph.call_function(site_base, (x, y))
    base.meta["val"] = y.meta["val"]
    base.meta[SITE_KEY] = {"name": site.name, "kind": "linear", "in_features": site.in_features,
                           "out_features": site.out_features, "weight": None, "bias": None,
                           "owner_type": "module"}
    graph.output(base)
    gm = GraphModule(nn.Module(), graph, class_name="SiteGraph")
    gm._modules[CONTAINER] = container  # the training graph's own adapter states (registered, not copied)
    for name in adapters:
        emit_adapter(gm, name, {site.name})
    set_adapters_training(gm, False)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is pvera_record_kl]:
        record = node.args[2]
        gm.graph.erase_node(node)  # generation has no loss: no KL records
        if not record.users:
            gm.graph.erase_node(record)
    gm.graph.lint()
    gm.recompile()
    return gm


class _SiteHook:
    """Forward hook of one site module: adds the live adapters to its output (one site graph per dtypes)."""

    def __init__(self, container: nn.Module, site: Site, adapters: Sequence[str]) -> None:
        self.container, self.site, self.adapters = container, site, tuple(adapters)
        self.graphs: dict[tuple[torch.dtype, torch.dtype], GraphModule] = {}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError(f"site {self.site.name!r}: {type(module).__name__} takes or returns something other "
                            f"than one tensor ({type(x).__name__} -> {type(output).__name__}); generate adds "
                            "adapters to linear-like modules only")
        key = (x.dtype, output.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = site_graph(self.container, self.site, self.adapters, *key)
        return graph(x, output)


def _site_modules(model: nn.Module, sites: dict[str, Site]) -> dict[str, nn.Module]:
    """The module of every site: a linear layer (``nn.Linear`` and its subclasses, bitsandbytes' included) or
    GPT-2's ``Conv1D``, whose output is the site's output. ValueError naming any other site."""
    found = {}
    for name in sites:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
            what = "no module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise ValueError(f"site {name!r} is {what} of {type(model).__name__} (a functional linear call inside "
                             "a module): generate adds adapters at linear layers' outputs for this model; leave "
                             "that site out of target_modules, or merge it first (vera_fx.merge)")
        found[name] = module
    return found


@contextlib.contextmanager
def adapter_hooks(gm: GraphModule, model: nn.Module) -> Iterator[int]:
    """Hook every live adapter site of ``gm`` onto its module in ``model`` (removed on exit); yields the
    number of hooked sites."""
    layout = live_layout(gm)
    per_site: dict[str, list[str]] = {}
    for name, sites in layout:
        for s in sites:
            per_site.setdefault(s, []).append(name)
    records = {s.name: s for s in read_sites(gm) if s.name in per_site}
    modules = _site_modules(model, records)
    container = getattr(gm, CONTAINER, None)
    handles = []
    try:
        for name, module in modules.items():
            hook = _SiteHook(container, records[name], per_site[name])
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def _swap(owner: nn.Module, leaf: str, new: Any, undo: list) -> None:
    table = owner._parameters if leaf in owner._parameters else owner._modules
    undo.append((table, leaf, table[leaf]))
    table[leaf] = new


@contextlib.contextmanager
def weights_bound(model: nn.Module, gm: GraphModule, live: Sequence[str]) -> Iterator[None]:
    """While inside, ``model`` computes with ``gm``'s base parameters (by name) and with the ``modules_to_save``
    copies of the adapters ``live``; every swapped entry comes back on exit."""
    container = getattr(gm, CONTAINER, None)
    theirs = dict(gm.named_parameters(remove_duplicate=False))
    undo: list = []
    try:
        for name in live:
            state = container[name]
            for path in getattr(state, "modules_to_save_paths", []):
                parent, _, leaf = path.rpartition(".")
                _swap(model.get_submodule(parent) if parent else model, leaf, modules_to_save_copy(state, path),
                      undo)
        for mod_path, mod in model.named_modules():
            for leaf, p in list(mod._parameters.items()):
                target = theirs.get(f"{mod_path}.{leaf}" if mod_path else leaf)
                if p is not None and target is not None and target is not p:
                    _swap(mod, leaf, target, undo)
        yield
    finally:
        for table, leaf, old in reversed(undo):
            table[leaf] = old


def check_inputs(input_ids: Any, attention_mask: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got "
                         f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: give at least one token per sequence")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    return attention_mask.to(dtype=torch.long)


def model_inputs(source: nn.Module, input_ids: Any, attention_mask: Any) -> dict[str, torch.Tensor]:
    """The model's inputs from generate's first two arguments: ``input_ids`` and its mask, or for a model whose
    main input is audio features (Whisper) those features (given as the first argument)."""
    main = getattr(source, "main_input_name", "input_ids")
    if main == "input_ids":
        return {"input_ids": input_ids, "attention_mask": check_inputs(input_ids, attention_mask)}
    if not isinstance(input_ids, torch.Tensor) or not input_ids.is_floating_point() or input_ids.dim() != 3:
        raise ValueError(f"{type(source).__name__} generates from {main} (batch, channels, frames), a float tensor "
                         f"given as the first argument; got {type(input_ids).__name__}"
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    inputs = {main: input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return inputs


def eager_reason(source: nn.Module, gm: GraphModule, total: Optional[int],
                 cache_length: Callable[[int], int]) -> Optional[str]:
    """Why ``generate`` runs transformers' loop (this module) rather than the decode graph, or None: an
    encoder-decoder model, bitsandbytes sites, or a sliding window shorter than the decode graph's cache for
    ``total`` positions (``cache_length(total)``; a static cache cannot slide)."""
    cfg = source.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    quantized = sorted({s.kind for s in read_sites(gm) if s.kind not in ("linear", "conv1d")
                        and s.kind in LINEAR_KINDS})
    if quantized:
        return f"bitsandbytes {'/'.join(quantized)} layers"
    window = getattr(cfg.get_text_config(), "sliding_window", None)
    if total is not None and isinstance(window, int) and window > 0 and cache_length(total) > window:
        return f"sliding_window={window} is shorter than the cache of {cache_length(total)} positions"
    return None


@contextlib.contextmanager
def no_cpu_packing(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from packing 4-bit weights for its CPU inference kernel during an eval forward: the
    captured graph shares those weights and needs their canonical layout (vera_fx/quantized.py)."""
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
    """``model.generate(**inputs, **generate_kwargs)`` with ``gm``'s live adapters hooked onto their sites,
    ``gm``'s weights bound, the model in eval mode (restored after) and bitsandbytes' CPU packing off.
    ``seed`` seeds torch's generator for sampling (inside ``torch.random.fork_rng``: the global state is kept)."""
    live = [name for name, _ in live_layout(gm)]
    device = next(p.device for p in model.parameters())
    devices = [device] if device.type == "cuda" else []
    with model_flags_kept(model), weights_bound(model, gm, live), adapter_hooks(gm, model) as hooked, \
            no_cpu_packing(model), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        model.eval()
        if seed is not None:
            torch.manual_seed(int(seed))
        logger.debug("generate through %s.generate with %d hooked sites", type(model).__name__, hooked)
        return model.generate(**inputs, **generate_kwargs)
