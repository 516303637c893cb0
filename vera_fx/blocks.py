"""Blocks: the model's layers (its layer ``nn.ModuleList``'s entries) as GraphModule submodules. The top level is
exported with each layer swapped for a stand-in whose call is one opaque ``vera_fx::block_call`` node; those
become ``call_module`` nodes of the blocks (vera_fx/block_export.py)."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from .compat import copy_forward_hook, pytree
from .quantized import swapped
from .sites import BLOCK_CALL_KEY


class BlockCaptureError(RuntimeError):
    """The model's layers cannot be kept as blocks (capture falls back to one graph)."""


class SymbolicArgumentError(BlockCaptureError):
    """A layer takes a size as a Python number that export made symbolic (Swin's ``input_dimensions``)."""


@torch.library.custom_op("vera_fx::block_call", mutates_args=())
def block_call(tensors: list[Tensor], index: int, out: int) -> Tensor:
    """Stands for one layer call while the top level is exported; replaced by a ``call_module`` node."""
    raise RuntimeError("vera_fx::block_call is a capture-time placeholder and never runs")


@block_call.register_fake
def _block_call_fake(tensors: list[Tensor], index: int, out: int) -> Tensor:
    return torch.empty_like(tensors[out])


# dtypes a multi-output block call can return, by index (a custom op takes no list of dtypes)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8)


@torch.library.custom_op("vera_fx::block_call_n", mutates_args=())
def block_call_n(tensors: list[Tensor], index: int, sizes: list[int], ranks: list[int],
                 dtypes: list[int]) -> list[Tensor]:
    """``block_call`` of a layer returning several tensors (or one shaped unlike its inputs)."""
    raise RuntimeError("vera_fx::block_call_n is a capture-time placeholder and never runs")


@block_call_n.register_fake
def _block_call_n_fake(tensors: list[Tensor], index: int, sizes: list[int], ranks: list[int],
                       dtypes: list[int]) -> list[Tensor]:
    return [tensors[0].new_empty(tuple(sizes[end - rank:end]), dtype=_DTYPES[dtype])
            for rank, dtype, end in zip(ranks, dtypes, itertools.accumulate(ranks))]


def find_layer_paths(model: nn.Module) -> list[str]:
    """The entries of the outermost ``nn.ModuleList``s of one class with parameters."""
    lists: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and not any(path.startswith(p + ".") for p in lists) \
                and len({type(m) for m in mod}) == 1 and any(True for _ in mod[0].parameters()):
            lists.append(path)
    return [f"{p}.{i}" if p else str(i) for p in lists for i in range(len(model.get_submodule(p)))]


@dataclass
class LayerCall:
    """What one eager call of a layer looked like."""
    args: tuple
    kwargs: dict
    out_spec: Any = None
    out_leaves: list = field(default_factory=list)
    calls: int = 0


def record_calls(model: nn.Module, layer_paths: list[str], args: tuple, kwargs: dict) -> dict[str, LayerCall]:
    """Run ``model`` once (no grad, forked RNG) and record every layer's arguments and output structure."""
    records: dict[str, LayerCall] = {}

    def record(path: str, a: tuple, kw: dict, out: Any) -> None:
        rec = records.setdefault(path, LayerCall(a, kw))
        rec.calls += 1
        rec.out_leaves, rec.out_spec = pytree.tree_flatten(out)

    handles = []
    try:
        for path in layer_paths:
            handles.append(model.get_submodule(path).register_forward_hook(
                lambda m, a, kw, o, p=path: record(p, a, kw, o), with_kwargs=True))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def check_records(paths: list[str], records: dict[str, LayerCall]) -> None:
    """Blocks need every layer called exactly once, returning at least one tensor."""
    for path in paths:
        rec = records.get(path)
        if rec is None or rec.calls != 1:
            raise BlockCaptureError(f"layer {path!r} is called {0 if rec is None else rec.calls} times")
        if not any(isinstance(v, torch.Tensor) for v in rec.out_leaves):
            raise BlockCaptureError(f"layer {path!r} returns no tensor")


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        if s.node.hint is None:
            raise BlockCaptureError(f"a block input has a dimension without a hint ({s})")
        return int(s.node.hint)
    return int(s)


@dataclass
class ExportCall:
    """A layer call as export sees it: its pytree spec, leaves (``("t", dtype, shape)`` / ``("c", value)``), paths."""
    spec: Any
    leaves: list
    paths: list

    @classmethod
    def of(cls, args: tuple, kwargs: dict, index: int = 0) -> "ExportCall":
        flat, spec = pytree.tree_flatten_with_path((args, kwargs))
        leaves = []
        for _, v in flat:
            if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise SymbolicArgumentError(f"layer {index} takes a symbolic number (a size of the inputs)")
            leaves.append(("t", v.dtype, tuple(map(_hint, v.shape))) if isinstance(v, Tensor) else ("c", v))
        return cls(spec, leaves, [pytree.keystr(p) for p, _ in flat])


def single_output(record: LayerCall) -> Optional[Tensor]:
    """The layer's one output tensor when it returns exactly one shaped like an input (``block_call``), else None."""
    tensors = [v for v in record.out_leaves if isinstance(v, torch.Tensor)]
    inputs = [v for v in pytree.tree_leaves((record.args, record.kwargs)) if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and any(t.shape == tensors[0].shape and t.dtype == tensors[0].dtype for t in inputs):
        return tensors[0]
    return None


class _StandIn(nn.Module):
    """Takes a layer's place while the top level is exported (unregistered: its parameters stay out)."""

    def __init__(self, index: int, record: LayerCall, calls: dict[int, ExportCall], layer: nn.Module) -> None:
        super().__init__()
        self.index, self.record, self.calls = index, record, calls
        self.__dict__["layer"] = layer

    def __getattr__(self, name: str) -> Any:  # the layer's other attributes (Swin's encoder reads .downsample)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "layer" not in self.__dict__:
                raise
            return getattr(self.__dict__["layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.index] = ExportCall.of(args, kwargs, self.index)
        tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        like = single_output(self.record)
        if like is not None:  # the output is shaped like an input tensor (the hidden states)
            at = next(i for i, t in enumerate(tensors) if t.dtype == like.dtype and t.dim() == like.dim()
                      and all(_hint(a) == b for a, b in zip(t.shape, like.shape)))
            ys = [torch.ops.vera_fx.block_call(tensors, self.index, at)]
        else:
            ys = self._call_n(tensors, args, kwargs)
        it = iter(ys)
        out = [next(it) if isinstance(v, torch.Tensor) else v for v in self.record.out_leaves]
        return pytree.tree_unflatten(out, self.record.out_spec)

    def _call_n(self, tensors: list[Tensor], args: tuple, kwargs: dict) -> list[Tensor]:
        """A ``block_call_n`` node with the output sizes the layer gives these fake inputs (run outside the trace)."""
        mode = next((t.fake_mode for t in tensors if getattr(t, "fake_mode", None) is not None), None)
        if mode is None:
            raise BlockCaptureError(f"layer {self.index}: no fake tensor among its inputs")
        layer = self.__dict__["layer"]
        with disable_proxy_modes_tracing():
            state = {n: mode.from_tensor(t, static_shapes=True)
                     for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
            fake = torch.func.functional_call(layer, state, args, kwargs)
        outs = [t for t in pytree.tree_leaves(fake) if isinstance(t, torch.Tensor)]
        expected = sum(isinstance(v, torch.Tensor) for v in self.record.out_leaves)
        if len(outs) != expected or any(t.dtype not in _DTYPES for t in outs):
            raise BlockCaptureError(f"layer {self.index} returns {len(outs)} tensors on fake inputs, {expected} "
                                    "eagerly, or a dtype a block call cannot carry")
        return torch.ops.vera_fx.block_call_n(tensors, self.index, [s for t in outs for s in t.shape],
                                              [t.dim() for t in outs], [_DTYPES.index(t.dtype) for t in outs])


def export_top(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
               layer_paths: list[str]) -> tuple[ExportedProgram, dict[str, LayerCall], dict[int, ExportCall]]:
    """Export the top level with stand-in layers: (program, eager records, calls as export saw them)."""
    records = record_calls(model, layer_paths, args, kwargs)
    check_records(layer_paths, records)
    calls: dict[int, ExportCall] = {}
    swaps = {}  # stand-ins carry the layers' transformers output-capturing hooks (output_hidden_states)
    for i, path in enumerate(layer_paths):
        layer = model.get_submodule(path)
        swaps[path] = _StandIn(i, records[path], calls, layer)
        for key, hook in layer._forward_hooks.items():
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                copy_forward_hook(layer, swaps[path], key)
    with swapped(model, swaps):
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    missing = [p for i, p in enumerate(layer_paths) if i not in calls]
    if missing:
        raise BlockCaptureError(f"layers {missing[:3]} are not called by the forward")
    return ep, records, calls


def attach_blocks(gm: GraphModule, blocks: dict[str, GraphModule], paths: list[str],
                  records: dict[str, LayerCall]) -> None:
    """Register every block at its layer path (as in the model: the FSDP2 recipe); ``block_call`` -> ``call_module``."""
    for list_path in dict.fromkeys(path.rpartition(".")[0] for path in blocks):
        try:
            held = gm.get_submodule(list_path)
        except AttributeError:
            held = None
        if held is None or (type(held) is nn.Module and not held._modules and not held._parameters):
            gm.add_submodule(list_path, nn.ModuleList())  # replaces an empty placeholder
    for path, block in blocks.items():
        gm.add_submodule(path, block)
    graph = gm.graph
    ops = (torch.ops.vera_fx.block_call.default, torch.ops.vera_fx.block_call_n.default)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in ops]:
        path = paths[node.args[1]]
        with graph.inserting_before(node):
            new = graph.call_module(path, tuple(node.args[0]))
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        new.meta[BLOCK_CALL_KEY], new.meta["val"] = path, None
        record = records[path]  # the key path of each tensor leaf of the layer's output
        flat = pytree.tree_flatten_with_path(pytree.tree_unflatten(record.out_leaves, record.out_spec))[0]
        leaf_paths = [p for p, v in flat if isinstance(v, torch.Tensor)]
        # block_call: the call's one output; block_call_n: getitem(node, k) is the layer's k-th output tensor
        uses = [(node, 0)] if node.target is ops[0] else [(u, u.args[1]) for u in node.users]
        for user, k in uses:
            out = new
            with graph.inserting_before(user):
                for key in leaf_paths[k]:
                    out = graph.call_function(operator.getitem, (out, getattr(key, "idx", getattr(key, "key", None))))
                    out.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
            out.meta["val"] = user.meta.get("val")
            user.replace_all_uses_with(out)
            if user is not node:
                graph.erase_node(user)
        graph.erase_node(node)
    # the size computations only a block_call_n node read, in reverse order (a size's inputs come after it)
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and not n.users and isinstance(n.meta.get("val"), torch.SymInt):
            graph.erase_node(n)
    graph.lint()
