"""Block-structured capture: the model's repeated layers as GraphModule submodules of the captured graph.

A transformers model keeps its decoder / encoder layers in an ``nn.ModuleList`` (Llama's ``model.layers``,
GPT-2's ``transformer.h``, BERT's ``encoder.layer``). Capture keeps them as blocks:

1. one eager forward (no grad, RNG forked) records each layer's call and output structure (forward hooks);
2. the top level (embeddings, masks, norms, head, loss) is exported with every layer swapped for a stand-in
   whose call is one opaque custom-op node (``vera_fx::block_call``); the stand-in also records the call
   exactly as export sees it (the structure of its arguments, and their fake shapes);
3. each distinct block (layer class, call structure, parameter shapes) is exported ONCE with arguments built
   from those records (``Dim.AUTO`` on every dimension) and its graph copied for every layer of that kind,
   each copy a GraphModule bound to its own layer's weights;
4. every ``block_call`` node becomes a ``call_module`` node of the block at the layer's path.

No ``run_decompositions``: the graphs stay in export's training IR; ``inline_wrappers`` inlines the no-grad /
disabled-autocast regions transformers models leave (the rotary embedding's).
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from .compat import EXPORT_NOTES_LOGGER, HigherOrderOperator, copy_codegen, copy_forward_hook, pytree
from .sites import BLOCK_CALL_KEY, BLOCK_KEY

logger = logging.getLogger(__name__)


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
    """Stands for one call of a layer that returns several tensors (or one shaped unlike its inputs): the
    outputs' sizes (symbolic while exporting) and dtypes are arguments. Replaced by a ``call_module`` node."""
    raise RuntimeError("vera_fx::block_call_n is a capture-time placeholder and never runs")


@block_call_n.register_fake
def _block_call_n_fake(tensors: list[Tensor], index: int, sizes: list[int], ranks: list[int],
                       dtypes: list[int]) -> list[Tensor]:
    out, at = [], 0
    for rank, dtype in zip(ranks, dtypes):
        out.append(tensors[0].new_empty(tuple(sizes[at:at + rank]), dtype=_DTYPES[dtype]))
        at += rank
    return out


def find_layer_lists(model: nn.Module) -> dict[str, list[str]]:
    """ModuleList path -> its entries' paths, for lists of one class (the outermost lists only)."""
    found: dict[str, list[str]] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(path.startswith(p + ".") for p in found) or len({type(m) for m in mod}) != 1 \
                or not any(True for _ in mod[0].parameters()):
            continue
        found[path] = [f"{path}.{i}" if path else str(i) for i in range(len(mod))]
    return found


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
    handles = []

    def pre(path: str, mod: nn.Module, a: tuple, kw: dict) -> None:
        records.setdefault(path, LayerCall(a, kw)).calls += 1

    def post(path: str, mod: nn.Module, a: tuple, kw: dict, out: Any) -> None:
        leaves, spec = pytree.tree_flatten(out)
        records[path].out_spec, records[path].out_leaves = spec, leaves

    try:
        for path in layer_paths:
            layer = model.get_submodule(path)
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, p=path: pre(p, m, a, kw), with_kwargs=True))
            handles.append(layer.register_forward_hook(
                lambda m, a, kw, o, p=path: post(p, m, a, kw, o), with_kwargs=True))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise BlockCaptureError(f"a block input has a dimension without a hint ({s})")
        return int(hint)
    return int(s)


@dataclass
class ExportCall:
    """A layer call as export saw it: the argument structure, tensor metas and constant leaves."""

    spec: Any
    leaves: list  # ("t", dtype, shape) for tensors, ("c", value) for constants
    paths: list  # keystr of every leaf


class _StandIn(nn.Module):
    """Takes a layer's place while the top level is exported: one ``block_call`` node per call (or
    ``block_call_n`` for a layer returning several tensors, see ``single_output``)."""

    def __init__(self, index: int, record: LayerCall, calls: dict[int, ExportCall], layer: nn.Module) -> None:
        super().__init__()
        self.index = index
        self.record = record
        self.calls = calls
        self.__dict__["layer"] = layer  # not registered: the layer's parameters stay out of the top graph

    def __getattr__(self, name: str) -> Any:  # the layer's other attributes (Swin's encoder reads .downsample)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "layer" not in self.__dict__:
                raise
            return getattr(self.__dict__["layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten_with_path((args, kwargs))
        leaves = [v for _, v in flat]
        metas = []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                metas.append(("t", v.dtype, tuple(_hint(s) for s in v.shape)))
            elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise SymbolicArgumentError(f"layer {self.index} takes a symbolic number (a size of the inputs)")
            else:
                metas.append(("c", v))
        self.calls[self.index] = ExportCall(spec, metas, [pytree.keystr(p) for p, _ in flat])
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        like = single_output(self.record)
        if like is not None:
            # the input tensor the output is shaped like (the hidden states)
            at = next(i for i, t in enumerate(tensors) if t.dtype == like.dtype and t.dim() == like.dim()
                      and all(_hint(a) == b for a, b in zip(t.shape, like.shape)))
            ys = [torch.ops.vera_fx.block_call(tensors, self.index, at)]
        else:
            ys = self._call_n(tensors, args, kwargs)
        it = iter(ys)
        out = [next(it) if isinstance(v, torch.Tensor) else v for v in self.record.out_leaves]
        return pytree.tree_unflatten(out, self.record.out_spec)

    def _call_n(self, tensors: list[Tensor], args: tuple, kwargs: dict) -> list[Tensor]:
        """One ``block_call_n`` node whose outputs have the sizes the layer gives these (fake) inputs: the layer
        runs once on fake tensors outside the trace to get them, symbolic where they depend on the inputs."""
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
        sizes = [s for t in outs for s in t.shape]
        return torch.ops.vera_fx.block_call_n(tensors, self.index, sizes, [t.dim() for t in outs],
                                              [_DTYPES.index(t.dtype) for t in outs])


def single_output(record: LayerCall) -> Optional[Tensor]:
    """The layer's one output tensor when it returns exactly one, shaped like one of its inputs (a
    ``block_call`` node then stands for it), else None (``block_call_n``)."""
    tensors = [v for v in record.out_leaves if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        return None
    inputs = [v for v in pytree.tree_leaves((record.args, record.kwargs)) if isinstance(v, torch.Tensor)]
    out = tensors[0]
    return out if any(t.shape == out.shape and t.dtype == out.dtype for t in inputs) else None


def check_records(model: nn.Module, paths: list[str], records: dict[str, LayerCall]) -> None:
    """Blocks need every layer called exactly once, returning at least one tensor."""
    for path in paths:
        rec = records.get(path)
        if rec is None or rec.calls != 1:
            raise BlockCaptureError(f"layer {path!r} is called {0 if rec is None else rec.calls} times")
        if not any(isinstance(v, torch.Tensor) for v in rec.out_leaves):
            raise BlockCaptureError(f"layer {path!r} returns no tensor")


@contextlib.contextmanager
def stand_ins(model: nn.Module, paths: list[str], records: dict[str, LayerCall],
              calls: dict[int, ExportCall]) -> Iterator[None]:
    """Swap every layer at ``paths`` for a stand-in during the block; the layers always come back."""
    originals = {}
    try:
        for i, path in enumerate(paths):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            originals[path] = (parent, leaf, parent._modules[leaf])
            stand_in = _StandIn(i, records[path], calls, parent._modules[leaf])
            _carry_output_hooks(parent._modules[leaf], stand_in)
            parent._modules[leaf] = stand_in
        yield
    finally:
        for parent, leaf, mod in originals.values():
            parent._modules[leaf] = mod


# transformers' output recorders (output_hidden_states): forward hooks on the layers whose closure is named so
_OUTPUT_HOOKS = ("output_capturing_hook",)


def _carry_output_hooks(layer: nn.Module, stand_in: nn.Module) -> None:
    """Give the stand-in the layer's transformers output-capturing hooks, so that the hidden states a layer
    returns are recorded (and exported) from its block call; other hooks stay with the layer."""
    for key, hook in layer._forward_hooks.items():
        if getattr(hook, "__name__", "") in _OUTPUT_HOOKS:
            copy_forward_hook(layer, stand_in, key)


def block_key(model: nn.Module, path: str, call: ExportCall) -> tuple:
    """What makes two layers share one block graph: class, call structure, constants, parameter shapes."""
    layer = model.get_submodule(path)
    leaves = tuple((m[0], str(m[1]), len(m[2])) if m[0] == "t" else ("c", repr(m[1])) for m in call.leaves)
    params = tuple((n, tuple(p.shape), str(p.dtype), type(p).__name__) for n, p in layer.named_parameters())
    bufs = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers())
    mods = tuple((n, type(m).__qualname__, m.training) for n, m in layer.named_modules())
    return (type(layer).__qualname__, str(call.spec), tuple(call.paths), leaves, params, bufs, mods)


def build_example(call: ExportCall, record: LayerCall) -> list[torch.Tensor]:
    """Real tensors for exporting one block (its tensor inputs, in order): the eager values where they fit
    what export saw, else zeros (ones for bool) of the example's shapes."""
    eager = {pytree.keystr(p): v for p, v in pytree.tree_flatten_with_path((record.args, record.kwargs))[0]}
    device = next((t.device for t in eager.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    tensors = []
    for path, meta in zip(call.paths, call.leaves):
        if meta[0] == "c":
            continue
        _, dtype, shape = meta
        v = eager.get(path)
        if isinstance(v, torch.Tensor) and v.dtype == dtype and tuple(v.shape) == shape:
            tensors.append(v.detach().clone())
        else:
            tensors.append((torch.ones if dtype == torch.bool else torch.zeros)(shape, dtype=dtype, device=device))
    return tensors


def export_block(layer: nn.Module, call: ExportCall, record: LayerCall) -> Any:
    """Export ``layer`` as a function of its tensor inputs only (constants of the call baked in), with
    ``Dim.AUTO`` on every dimension. The layer's own ``forward`` is shadowed for the duration, so module
    paths in the graph stay relative to the layer."""
    tensors = build_example(call, record)
    forward = layer.forward

    def flat_forward(*inputs: torch.Tensor) -> Any:
        it = iter(inputs)
        leaves = [next(it) if m[0] == "t" else m[1] for m in call.leaves]
        a, kw = pytree.tree_unflatten(leaves, call.spec)
        return forward(*a, **kw)

    shapes = {"inputs": tuple({i: Dim.AUTO for i in range(t.dim())} if t.dim() else None for t in tensors)}
    layer.forward = flat_forward
    # export warns for every input dimension of size 1 it specialises (a broadcast mask head, the rotary
    # batch): expected for a block, so keep those notes at debug level
    quiet = logging.getLogger(EXPORT_NOTES_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return torch.export.export(layer, tuple(tensors), {}, strict=False, dynamic_shapes=shapes)
    finally:
        quiet.setLevel(level)
        del layer.forward


# --------------------------------------------------------------------------------------------- HOP inlining

def _is_wrapper(node: Node, name: str) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == name


def inline_wrappers(gm: GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` and disabled ``wrap_with_autocast`` regions (the rotary
    embedding's ``no_grad`` / ``autocast(enabled=False)``) into the graph; returns how many were inlined.

    Their bodies compute from inputs that need no gradient, so inlining keeps values and gradients. An
    enabled autocast region is left alone (the caller falls back to ``run_decompositions``).
    """
    graph = gm.graph
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if _is_wrapper(node, "wrap_with_set_grad_enabled"):
                sub_at, operands = 1, node.args[2:]
            elif _is_wrapper(node, "wrap_with_autocast") and node.args[2] is False:
                sub_at, operands = 4, node.args[5:]
            else:
                continue
            sub_node = node.args[sub_at]
            body: GraphModule = getattr(gm, sub_node.target)
            env: dict[Node, Any] = {}
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            for ph, a in zip(placeholders, operands):
                env[ph] = a
            result: Any = None
            with graph.inserting_before(node):
                for bn in body.graph.nodes:
                    if bn.op == "placeholder":
                        continue
                    if bn.op == "output":
                        result = torch.fx.map_arg(bn.args[0], lambda n: env[n])
                        continue
                    if bn.op == "get_attr":
                        name = f"{sub_node.target}_{bn.target}".replace(".", "_")
                        setattr(gm, name, getattr(body, bn.target))
                        env[bn] = graph.get_attr(name)
                        continue
                    new = graph.node_copy(bn, lambda n: env[n])
                    if "nn_module_stack" not in new.meta and "nn_module_stack" in node.meta:
                        new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                    env[bn] = new
            outs = result if isinstance(result, (tuple, list)) else (result,)
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(outs[user.args[1]])
                    graph.erase_node(user)
            if node.users:
                raise BlockCaptureError(f"cannot inline {node.format_node()}: its result is used whole")
            graph.erase_node(node)
            if not sub_node.users:
                graph.erase_node(sub_node)
                delattr(gm, sub_node.target)
            count += 1
            changed = True
            break
    graph.lint()
    return count


def remaining_wrappers(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, HigherOrderOperator)]


# --------------------------------------------------------------------------------------------- the tree

@dataclass
class BlockPlan:
    """The layers kept as blocks: their paths and the export-time calls."""

    paths: list[str]
    records: dict[str, LayerCall]
    calls: dict[int, ExportCall] = field(default_factory=dict)


def bind_block(layer: nn.Module, graph: Graph, path: str, group: int) -> GraphModule:
    """A GraphModule running ``graph`` (copied) on ``layer``'s own weights, tagged with its path and group."""
    g = _copy_graph(graph)
    block = GraphModule(layer, g, class_name=type(layer).__name__ + "Block")
    block.meta[BLOCK_KEY] = {"path": path, "group": group}
    block.train(layer.training)
    return block


def drop_guards(gm: GraphModule) -> None:
    """Erase export's ``_guards_fn`` calls (input checks of the exported module; the block is called by the
    root graph with inputs that already passed the root's)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            gm.graph.erase_node(n)


def _copy_graph(graph: Graph) -> Graph:
    new = Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    copy_codegen(graph, new)
    return new


def attach_blocks(gm: GraphModule, blocks: dict[str, GraphModule], plan: BlockPlan) -> None:
    """Register every block at its layer path and turn the ``block_call`` nodes into ``call_module`` nodes.

    The blocks' parent is an ``nn.ModuleList``, as in the model, so ``for layer in m.model.layers:
    fully_shard(layer)`` reads as it does on the model."""
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
        tensors, index = node.args[0], node.args[1]
        path = plan.paths[index]
        record = plan.records[path]
        with graph.inserting_before(node):
            new = graph.call_module(path, tuple(tensors))
            new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
            new.meta[BLOCK_CALL_KEY] = path
            new.meta["val"] = None
        leaf_paths = _tensor_leaf_paths(record)
        if node.target is ops[0]:
            out = _leaf_node(graph, new, leaf_paths[0], node)
            out.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(out)
        else:
            for user in list(node.users):  # getitem(node, k): the layer's k-th output tensor
                with graph.inserting_before(user):
                    out = _leaf_node(graph, new, leaf_paths[user.args[1]], node)
                out.meta["val"] = user.meta.get("val")
                user.replace_all_uses_with(out)
                graph.erase_node(user)
        graph.erase_node(node)
    _erase_unused_sizes(graph)
    graph.lint()


def _tensor_leaf_paths(record: LayerCall) -> list[tuple]:
    """The key path of each tensor leaf in the layer's output structure, in order."""
    numbered = pytree.tree_unflatten(list(range(len(record.out_leaves))), record.out_spec)
    paths = {leaf: path for path, leaf in pytree.tree_flatten_with_path(numbered)[0]}
    return [paths[i] for i, v in enumerate(record.out_leaves) if isinstance(v, torch.Tensor)]


def _leaf_node(graph: Graph, new: Node, path: tuple, old: Node) -> Node:
    """``getitem`` nodes from the block call's output to one leaf (the call itself for an empty path)."""
    out = new
    for key in path:
        idx = getattr(key, "idx", getattr(key, "key", None))
        out = graph.call_function(operator.getitem, (out, idx))
        out.meta["nn_module_stack"] = old.meta.get("nn_module_stack")
    if out is new:
        new.meta["val"] = old.meta.get("val")
    return out


def _erase_unused_sizes(graph: Graph) -> None:
    """Erase the size computations only a ``block_call_n`` node read (symbolic sizes of its outputs); in
    reverse order, so a size's own inputs are unused by the time they are reached."""
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and not n.users and isinstance(n.meta.get("val"), torch.SymInt):
            graph.erase_node(n)
