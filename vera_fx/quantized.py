"""Linear-like layers export does not show as one plain linear call, and the modules PEFT's ``"all-linear"`` takes.

Export cannot trace inside bitsandbytes' 8-bit / 4-bit linears: capture swaps each for a stand-in, then turns
every stand-in call into a ``call_module`` node of a graph-owned shallow copy of the layer (a site of kind
``"int8"``, ``"nf4"`` or ``"fp4"``). Merging dequantizes, adds the update in float32 and requantizes into a new
layer, as PEFT does. 4-bit copies never take bitsandbytes' CPU inference packing (applied in place by an eval
forward: it rounds the scales to bfloat16 and has no backward). bitsandbytes is imported only for a model that
holds such a layer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .compat import unpack_cpu_4bit
from .sites import Candidate

logger = logging.getLogger(__name__)
aten = torch.ops.aten

QUANTIZED_KINDS = ("int8", "nf4", "fp4")
# node.meta key on the call_module nodes of quantized layers: {"kind", "class", "in_features", ...}
QUANT_KEY = "vera_fx_quantized"

_BNB_LINEARS = ("Linear8bitLt", "Linear4bit")  # LinearNF4 / LinearFP4 subclass Linear4bit
_QUANT_PARAMS = ("Int8Params", "Params4bit")


def _bnb_base(cls: type, names: tuple[str, ...], package: str = "bitsandbytes") -> Optional[str]:
    """The first of ``names`` among ``cls``'s bases from ``package`` (recognised by name: nothing is imported)."""
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in names and c.__module__.split(".")[0] == package),
                None)


def is_quantized_layer(module: nn.Module) -> bool:
    """True for bitsandbytes' Linear8bitLt / Linear4bit (and subclasses); never imports bitsandbytes."""
    return _bnb_base(type(module), _BNB_LINEARS) is not None


def is_quantized_parameter(p: Any) -> bool:
    """True for bitsandbytes' Int8Params / Params4bit: Parameter subclasses carrying quantization state."""
    return _bnb_base(type(p), _QUANT_PARAMS) is not None


def layer_kind(module: nn.Module, path: str = "") -> str:
    """``"int8"`` for Linear8bitLt, the 4-bit quant type (``"nf4"`` / ``"fp4"``) for Linear4bit."""
    if _bnb_base(type(module), _BNB_LINEARS) == "Linear8bitLt":
        return "int8"
    weight = getattr(module, "weight", None)
    quant_type = getattr(getattr(weight, "quant_state", None), "quant_type", None) or getattr(
        weight, "quant_type", None)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes layer {path!r} ({type(module).__name__}) has quant_type={quant_type!r}; "
                         "vera_fx supports 'nf4' and 'fp4' 4-bit layers: quantize with one of those")
    return quant_type


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> bitsandbytes linear layer of ``model``; ValueError for one that is no frozen quantized base."""
    layers = {path: m for path, m in model.named_modules(remove_duplicate=False) if path and is_quantized_layer(m)}
    if not layers:
        return layers
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as e:
        path, layer = next(iter(layers.items()))
        raise ImportError(
            f"the model holds {len(layers)} bitsandbytes layer(s) (e.g. {path!r}, a {type(layer).__name__}) but "
            f"bitsandbytes cannot be imported ({e}); install it with `pip install 'vera_fx[quant]'` "
            "(or `pip install bitsandbytes`), or load the model without a BitsAndBytesConfig") from e
    for path, layer in layers.items():
        kind = layer_kind(layer, path)
        if kind == "int8" and getattr(getattr(layer, "state", None), "has_fp16_weights", False):
            raise ValueError(f"bitsandbytes layer {path!r} has has_fp16_weights=True (trainable half-precision "
                             "weights); vera_fx adapts frozen int8 bases: load with llm_int8_has_fp16_weights=False "
                             "(the default) or pass has_fp16_weights=False to Linear8bitLt")
        if kind != "int8" and getattr(layer.weight, "quant_state", None) is None:
            raise ValueError(f"bitsandbytes layer {path!r} ({type(layer).__name__}) is not quantized yet (its "
                             f"weight is {layer.weight.dtype}); call .to(device) on the model or the layer first, "
                             "which quantizes it")
    return layers


class _StandIn(nn.Module):
    """A linear of the bnb layer's shape and compute dtype for export; its weight is one zero, expanded."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        bias, dtype = getattr(layer, "bias", None), getattr(layer, "compute_dtype", None)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            dtype = bias.dtype
        zero = torch.zeros((), dtype=dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype(),
                           device=layer.weight.device).expand(self.out_features, self.in_features)
        self.weight = nn.Parameter(zero, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return nn.functional.linear(x, w)


def set_slot(root: nn.Module, qualname: str, value: Any) -> Any:
    """Put ``value`` in the parameter, buffer or (else) submodule slot ``qualname`` of ``root``; returns the old."""
    path, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(path)
    store = next((st for st in (parent._parameters, parent._buffers) if leaf in st), parent._modules)
    old = store.get(leaf)
    store[leaf] = value
    return old


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``modules[path]`` at every path of ``model`` for the block; the originals are restored whatever it raises."""
    originals: dict[str, nn.Module] = {}
    try:
        for path, module in modules.items():
            originals[path] = set_slot(model, path, module)
        yield
    finally:
        for path, module in originals.items():
            set_slot(model, path, module)


def stand_ins(model: nn.Module, layers: dict[str, nn.Module]) -> contextlib.AbstractContextManager:
    """A stand-in at every path of ``layers`` for the block (``swapped``)."""
    return swapped(model, {path: _StandIn(layer) for path, layer in layers.items()})


def _is_cpu_packed(weight: Any) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _refuse_packed_weight(path: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of graph-owned 4-bit layers: a weight packed since would silently stop gradients."""
    x = args[0] if args else None
    if (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
            and _is_cpu_packed(module.weight)):
        raise RuntimeError(f"site {path!r}: its bitsandbytes 4-bit weight is packed for CPU inference, because the "
                           "original model ran in eval mode after vera_fx captured it; bitsandbytes' packed kernel has "
                           "no backward, so gradients would stop here. Do not run the original model in eval mode "
                           "while training the graph, or capture the model again")


def _own_dicts(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` with its own parameter, buffer, module and hook dicts."""
    new = copy.copy(layer)
    new.__dict__.update({key: copy.copy(value) for key, value in vars(layer).items() if isinstance(value, dict)})
    return new


def _graph_copy(path: str, layer: nn.Module) -> nn.Module:
    """A shallow copy of a bnb layer sharing its weights, with dicts of its own; 4-bit copies never pack for CPU."""
    new = _own_dicts(layer)
    if _bnb_base(type(layer), ("Linear4bit",)) is not None:
        weight = layer.weight
        if _is_cpu_packed(weight):  # packed by an eval forward of the original model: training needs the layout
            weight.data, weight.quant_state = unpack_cpu_4bit(weight.data, weight.quant_state)
            logger.info("quantized: %s: unpacked the 4-bit weight that bitsandbytes had packed for CPU inference",
                        path)
        new.support_avx512bf16_for_cpu = False
        new.register_forward_pre_hook(functools.partial(_refuse_packed_weight, path))
    return new


def _weight_path(node: Node) -> Optional[str]:
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, Node) and w.op == "call_function" and w.target in (aten._to_copy.default, aten.to.dtype):
        w = w.args[0]
    if isinstance(w, Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target)[: -len(".weight")]
    return None


def restore_quantized(gm: GraphModule, layers: dict[str, nn.Module]) -> int:
    """Replace each stand-in's ``aten.linear`` node by a ``call_module`` node of a graph-owned copy of the bnb
    layer; returns the number of calls rewritten."""
    if not layers:
        return 0
    graph = gm.graph
    dead: list[Node] = []  # the stand-ins' weight nodes
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        path = _weight_path(node)
        if path not in layers:
            continue
        layer = layers[path]
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        call.meta[QUANT_KEY] = {"kind": layer_kind(layer), "class": type(layer).__name__,
                                "in_features": int(layer.in_features), "out_features": int(layer.out_features),
                                "bias": getattr(layer, "bias", None) is not None}
        stack = dict(call.meta.get("nn_module_stack") or {})
        if stack:
            key = list(stack)[-1]
            stack[key] = (stack[key][0], f"{type(layer).__module__}.{type(layer).__qualname__}")
            call.meta["nn_module_stack"] = stack
        dead.append(node.args[1])
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    erased: set[Node] = set()
    for n in dead:  # the stand-in's weight (and a cast of it, and export's checks of it), once unread
        while isinstance(n, Node) and n not in erased:
            for check in [u for u in n.users if u.target is aten._assert_tensor_metadata.default]:
                graph.erase_node(check)
            if n.users:
                break
            src = n.args[0] if n.op == "call_function" else None
            graph.erase_node(n)
            erased.add(n)
            n = src
    for path, layer in layers.items():
        used = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(path + ".")]
        if used:
            raise ValueError(f"bitsandbytes layer {path!r} ({type(layer).__name__}): the model reads its weight "
                             f"outside the layer's forward ({used[0].format_node()}); vera_fx can only capture "
                             "quantized layers that are called as modules, so keep this layer unquantized "
                             "(BitsAndBytesConfig(llm_int8_skip_modules=[...]))")
    for path, layer in layers.items():
        set_slot(gm, path, _graph_copy(path, layer))
    graph.lint()
    logger.info("quantized: %d bitsandbytes calls kept opaque (%d layers)", len(dead), len(layers))
    return len(dead)


def recognise(node: Node) -> Optional[Candidate]:
    """Recogniser for the match pass: a ``call_module`` node of a bitsandbytes linear."""
    info = node.meta.get(QUANT_KEY) if node.op == "call_module" else None
    if info is None:
        return None
    path = str(node.target)
    return Candidate(node, info["kind"], path, info["class"], info["in_features"], info["out_features"],
                     f"{path}.weight", f"{path}.bias" if info["bias"] else None)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes layer computes with, as a new float tensor; ``layer`` is not changed."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if layer_kind(layer) == "int8":
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(layer.state, "SCB", None)
        if scb is None:
            raise ValueError(f"bitsandbytes int8 layer ({type(layer).__name__}, {layer.out_features}x"
                             f"{layer.in_features}) has no row scales (SCB): it was never quantized; call .to(device)")
        return bnb_functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    data, quant_state = weight.data, weight.quant_state
    if _is_cpu_packed(weight):
        data, quant_state = unpack_cpu_4bit(data.clone(), copy.deepcopy(quant_state))
    return bnb_functional.dequantize_4bit(data, quant_state)


def requantized(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Module:
    """A new layer like ``layer`` (``bias`` replacing its bias) holding ``weight`` (out, in) quantized with the
    layer's settings, as bitsandbytes quantizes a loaded weight; ``layer`` is not changed."""
    import bitsandbytes as bnb

    old = layer.weight
    new = _own_dicts(layer)
    if layer_kind(layer) == "int8":
        param = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float32), requires_grad=False,
                                  has_fp16_weights=False).to(old.device)
        new.state = copy.copy(layer.state)  # its own matmul state (the old one holds the old weight's rows)
        new.state.reset_grads()
    else:
        qs = old.quant_state
        param = bnb.nn.Params4bit(weight.detach().to("cpu", qs.dtype), requires_grad=False,
                                  blocksize=getattr(old, "blocksize", None) or qs.blocksize,
                                  compress_statistics=getattr(old, "compress_statistics", bool(qs.nested)),
                                  quant_type=qs.quant_type, quant_storage=getattr(old, "quant_storage", old.dtype),
                                  module=new).to(old.device)
    new._parameters["weight"] = param
    if bias is not None:
        new._parameters["bias"] = bias
    return new


def rounding_error(original: nn.Module, merged: nn.Module, delta: torch.Tensor, rows: int = 16) -> tuple[float, float]:
    """(max |merged(x) - (original(x) + x deltaᵀ)|, max |x deltaᵀ|) on a seeded float32 probe: what requantizing
    cost, next to the size of the update."""
    x = torch.randn(rows, original.in_features, generator=torch.Generator().manual_seed(0)).to(delta.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8: "inputs will be cast from float32 to float16"
        update = x @ delta.to(torch.float32).T
        reference = original(x).to(torch.float32) + update
        error = (merged(x).to(torch.float32) - reference).abs().max()
    return float(error), float(update.abs().max())


def linear_module_paths(model: nn.Module) -> list[str]:
    """Paths of what PEFT's ``"all-linear"`` takes: ``nn.Linear`` and subclasses, transformers' ``Conv1D``."""
    return [path for path, m in model.named_modules() if path and (
        isinstance(m, nn.Linear) or _bnb_base(type(m), ("Conv1D",), "transformers") is not None)]


def computes_linear(module: nn.Linear) -> bool:
    """Whether ``module``'s own forward computes ``F.linear(x, weight, bias)`` (probed on a random input)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point() \
            or weight.device.type == "meta":
        return False
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        x = torch.randn(2, 3, weight.shape[1], dtype=weight.dtype, device=weight.device)
        try:
            got = module(x)
        except Exception:  # any failure means: not a plain linear map
            return False
        want = nn.functional.linear(x, weight, module.bias)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol))


@contextlib.contextmanager
def forwards(model: nn.Module, forward_of: Callable[[nn.Module], Optional[Callable]]) -> Iterator[list[str]]:
    """While inside, every module of ``model`` for which ``forward_of`` gives a function runs it; yields the paths."""
    changed: list[tuple[str, nn.Module]] = []
    try:
        for path, module in model.named_modules():
            forward = None if "forward" in module.__dict__ else forward_of(module)
            if forward is not None:
                module.forward = forward
                changed.append((path, module))
        if changed:
            logger.debug("%s: %d %s modules", forward_of.__name__, len(changed), type(changed[0][1]).__name__)
        yield [p for p, _ in changed]
    finally:
        for _, module in changed:
            module.__dict__.pop("forward", None)


def _linear_forward(module: nn.Module) -> Optional[Callable]:
    """``nn.Linear.forward`` for an ``nn.Linear`` subclass whose own forward is a linear map (Falcon's)."""
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
            and not is_quantized_layer(module) and computes_linear(module):
        return nn.Linear.forward.__get__(module)
    return None


def linear_forwards(model: nn.Module) -> contextlib.AbstractContextManager:
    """``forwards`` with ``nn.Linear.forward`` for every ``nn.Linear`` subclass computing a linear map."""
    return forwards(model, _linear_forward)


@contextlib.contextmanager
def no_cpu_packing(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from packing 4-bit weights for its CPU kernel in an eval forward (the graph shares them)."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True
