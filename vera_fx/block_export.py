"""Block export (each distinct layer exported once, its graph cleaned and copied onto every layer of its group) and
the eager top level (``capture_eager_top``) for a model whose head or loss export cannot capture (DeBERTa-v2's loss
branches on the label values): the model's own ``forward`` runs on a copy whose layers and top-level linear
modules are blocks; what needs the root graph (checkpointing, mixed batches, ``torch.export``) does not work there."""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule, Node

from . import quantized
from .blocks import BlockCaptureError, ExportCall, LayerCall, record_calls
from .compat import EXPORT_NOTES_LOGGER, HigherOrderOperator, copy_codegen, pytree, register_deepcopy_hook
from .quantized import linear_module_paths
from .signatures import dynamic_shapes_of
from .sites import BLOCK_KEY

logger = logging.getLogger(__name__)

EAGER_TOP = "vera_fx_eager_top"  # gm.meta of a root graph whose top level runs eagerly: the reason export gave

_DROPOUTS = ("native_dropout", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")


def block_key(model: nn.Module, path: str, call: ExportCall) -> tuple:
    """What makes two layers share one block graph: class, call structure, constants, parameter shapes."""
    layer = model.get_submodule(path)
    leaves = tuple((m[0], str(m[1]), len(m[2])) if m[0] == "t" else ("c", repr(m[1])) for m in call.leaves)
    params = tuple((n, tuple(p.shape), str(p.dtype), type(p).__name__) for n, p in layer.named_parameters())
    bufs = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers())
    mods = tuple((n, type(m).__qualname__, m.training) for n, m in layer.named_modules())
    return (type(layer).__qualname__, str(call.spec), tuple(call.paths), leaves, params, bufs, mods)


def export_block(layer: nn.Module, call: ExportCall, record: LayerCall) -> ExportedProgram:
    """Export ``layer`` as a function of its tensor inputs (constants baked in, ``Dim.AUTO`` on every dimension),
    from the eager values where they fit what export saw, else zeros (ones for bool)."""
    eager = {pytree.keystr(p): v for p, v in pytree.tree_flatten_with_path((record.args, record.kwargs))[0]}
    device = next((t.device for t in eager.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    tensors = []
    for path, (kind, *meta) in zip(call.paths, call.leaves):
        if kind == "c":
            continue
        v = eager.get(path)
        if isinstance(v, torch.Tensor) and v.dtype == meta[0] and tuple(v.shape) == meta[1]:
            tensors.append(v.detach().clone())
        else:
            tensors.append((torch.ones if meta[0] == torch.bool else torch.zeros)(meta[1], dtype=meta[0],
                                                                                   device=device))
    forward = layer.forward

    def flat_forward(*inputs: torch.Tensor) -> Any:
        it = iter(inputs)
        a, kw = pytree.tree_unflatten([next(it) if m[0] == "t" else m[1] for m in call.leaves], call.spec)
        return forward(*a, **kw)

    shapes = {"inputs": dynamic_shapes_of(tuple(tensors), {})[0]}
    layer.forward = flat_forward
    # export notes every input dimension of size 1 it specialises: expected for a block (a mask's head dim)
    quiet = logging.getLogger(EXPORT_NOTES_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.export.export(layer, tuple(tensors), {}, strict=False, dynamic_shapes=shapes)
    finally:
        quiet.setLevel(level)
        del layer.forward


def _inlinable(node: Node) -> Optional[tuple[int, tuple]]:
    """(index of the body's get_attr argument, the body's operands) of a region to inline, else None."""
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if name == "wrap_with_set_grad_enabled":
        return 1, node.args[2:]
    if name == "wrap_with_autocast" and node.args[2] is False:
        return 4, node.args[5:]
    return None


def inline_wrappers(gm: GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` and disabled ``wrap_with_autocast`` regions (the rotary embedding's)."""
    graph, count = gm.graph, 0
    while (node := next((n for n in graph.nodes if _inlinable(n)), None)) is not None:
        sub_at, operands = _inlinable(node)
        sub_node = node.args[sub_at]
        body: GraphModule = getattr(gm, sub_node.target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env: dict[Node, Any] = dict(zip(placeholders, operands))
        result: Any = None
        with graph.inserting_before(node):
            for bn in body.graph.nodes:
                if bn.op == "output":
                    result = torch.fx.map_arg(bn.args[0], lambda n: env[n])
                elif bn.op == "get_attr":
                    name = f"{sub_node.target}_{bn.target}".replace(".", "_")
                    setattr(gm, name, getattr(body, bn.target))
                    env[bn] = graph.get_attr(name)
                elif bn.op != "placeholder":
                    env[bn] = graph.node_copy(bn, lambda n: env[n])
                    if "nn_module_stack" not in env[bn].meta and "nn_module_stack" in node.meta:
                        env[bn].meta["nn_module_stack"] = node.meta["nn_module_stack"]
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
    graph.lint()
    return count


def remaining_wrappers(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, HigherOrderOperator)]


def strip_metadata_asserts(gm: GraphModule, guards: bool = False) -> int:
    """Erase export's ``aten._assert_tensor_metadata`` checks (they fail under autocast; graphs are keyed by dtype
    and autocast instead) and, with ``guards``, its guard call (the caller checked the inputs)."""
    target = torch.ops.aten._assert_tensor_metadata.default
    nodes = [n for n in gm.graph.nodes if not n.users and ((n.op == "call_function" and n.target is target) or (
        guards and n.op == "call_module" and str(n.target).startswith("_guards")))]
    for n in nodes:
        gm.graph.erase_node(n)
    return len(nodes)


def train_only(p: float, training: bool) -> float:
    """``p`` in training mode, else 0.0: the dropout probability that follows the module's mode."""
    return p if training else 0.0


def rewrite_mode_flags(gm: GraphModule) -> int:
    """Make dropout read ``self.training``; returns how many nodes now follow the mode."""
    graph = gm.graph
    aten = torch.ops.aten
    dropouts = tuple(getattr(aten, name).default for name in _DROPOUTS)
    training: list[Node] = []

    def flag() -> Node:
        if not training:
            with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a bool attribute, not a tensor: intended
                training.append(graph.get_attr("training"))
        return training[0]

    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function"]:
        args = list(node.args)
        if node.target in dropouts and (args[2] if len(args) > 2 else node.kwargs.get("train", True)) is True:
            node.args = (*args[:2], flag(), *args[3:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "train"}
        elif node.target is aten.scaled_dot_product_attention.default:
            p = args[4] if len(args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if not (isinstance(p, float) and p > 0.0):
                continue
            with graph.inserting_before(node):
                p_node = graph.call_function(train_only, (p, flag()))
            if len(args) > 4:
                node.args = (*args[:4], p_node, *args[5:])
            else:
                node.kwargs = {**node.kwargs, "dropout_p": p_node}
        else:
            continue
        count += 1
    return count


def export_blocks(model: nn.Module, layer_paths: list[str], calls: dict[int, ExportCall],
                  records: dict[str, LayerCall], qlayers: dict[str, nn.Module]) -> dict[str, GraphModule]:
    """A block per layer: each ``block_key`` group's first layer exported once, copied onto every member's weights."""
    groups: dict[tuple, list[str]] = {}
    for i, path in enumerate(layer_paths):
        groups.setdefault(block_key(model, path, calls[i]), []).append(path)
    bound: dict[str, GraphModule] = {}
    for gid, members in enumerate(groups.values()):
        layer = model.get_submodule(members[0])
        b_mod = export_block(layer, calls[layer_paths.index(members[0])], records[members[0]]).module()
        inline_wrappers(b_mod)
        left = remaining_wrappers(b_mod)
        if left:
            raise BlockCaptureError(f"block {members[0]!r} keeps {left[:1]}")
        constants = _lift_constants(layer, b_mod, members[0])
        strip_metadata_asserts(b_mod, guards=True)  # before restore_quantized; the root's inputs passed its checks
        flags = rewrite_mode_flags(b_mod)  # on the template: every copy reads its own block's flag
        for path in members:
            layer = model.get_submodule(path)
            for name, value in constants.items():  # held by the layer only while its block is bound
                layer.register_buffer(name, value, persistent=False)
            try:
                g = Graph()
                g.output(g.graph_copy(b_mod.graph, {}))
                copy_codegen(b_mod.graph, g)
                block = bound[path] = GraphModule(layer, g, class_name=type(layer).__name__ + "Block")
            finally:
                for name in constants:
                    del layer._buffers[name]
            block.meta[BLOCK_KEY], block.meta["vera_fx_flags"] = {"path": path, "group": gid}, flags
            block.train(layer.training)
            inner = {q[len(path) + 1:]: m for q, m in qlayers.items() if q.startswith(path + ".")}
            if inner:
                quantized.restore_quantized(block, inner)
                block.recompile()
    return bound


def _lift_constants(layer: nn.Module, exported: GraphModule, path: str) -> dict[str, torch.Tensor]:
    """Tensor constants export lifted out of the layer's code (DeBERTa's ``torch.tensor(head_size)``), renamed."""
    constants: dict[str, torch.Tensor] = {}
    for node in [n for n in exported.graph.nodes if n.op == "get_attr"]:
        try:
            operator.attrgetter(str(node.target))(layer)
            continue  # the layer's own
        except AttributeError:
            value = operator.attrgetter(str(node.target))(exported)
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
            raise BlockCaptureError(f"block {path!r} keeps attributes of its own ({node.target})")
        node.target = f"vera_fx_constant_{len(constants)}"
        constants[node.target] = value
    return constants


# --------------------------------------------------------------------------------------------- eager top level

class FlatCall:
    """Forward pre-hook of a block: the layer's call (args, kwargs) as the block's tensor inputs."""

    def __init__(self, path: str, call: ExportCall) -> None:
        self.path = path
        self.spec = call.spec
        self.constants = [(i, m[1]) for i, m in enumerate(call.leaves) if m[0] == "c"]

    def install(self, block: GraphModule) -> None:
        """Register on ``block`` (once) and on its deep copies."""
        if not any(isinstance(h, FlatCall) for h in block._forward_pre_hooks.values()):
            block.register_forward_pre_hook(self, with_kwargs=True)
        if self.install not in getattr(block, "_deepcopy_hooks", []):
            register_deepcopy_hook(block, self.install)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            raise ValueError(f"layer {self.path!r} was captured for calls structured as {self.spec}, and the "
                             f"model's eager top level now calls it as {spec}; call the model with the keywords "
                             "of the example it was transformed with")
        for i, value in self.constants:
            try:
                same = bool(leaves[i] is value or leaves[i] == value)
            except Exception:  # an object whose == does not give a bool
                same = False
            if not same:
                raise ValueError(f"layer {self.path!r} was captured with the constant {value!r} at argument "
                                 f"{i} and is now called with {leaves[i]!r}; call the model as in the example "
                                 "it was transformed with")
        return tuple(v for v in leaves if isinstance(v, torch.Tensor)), {}


class EagerTop(nn.Module):
    """Runs the model's own ``forward`` on ``shell``, a copy of the model whose layers are their blocks."""

    def __init__(self, shell: nn.Module) -> None:
        super().__init__()
        self.__dict__["shell"] = shell

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shell = self.__dict__["shell"]
        shell.training = self.training
        return shell(*args, **kwargs)


_PLAIN = (str, int, float, bool, type(None))


def _shell(model: nn.Module, blocks: dict[str, GraphModule]) -> nn.Module:
    """A copy of ``model`` sharing its tensors, each layer replaced by its block (with the layer's plain attributes)."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for path, block in blocks.items():
        layer = model.get_submodule(path)
        for key, value in layer.__dict__.items():
            if not key.startswith("_") and isinstance(value, _PLAIN) and key not in block.__dict__:
                block.__dict__[key] = value
        memo[id(layer)] = block
    shell = copy.deepcopy(model, memo)
    for module in model.modules():  # capture-time forwards (quantized.linear_forwards) stay with the model
        copied = memo.get(id(module))
        if isinstance(copied, nn.Module) and copied is not module and copied not in blocks.values():
            copied.__dict__.pop("forward", None)
    return shell


def capture_eager_top(model: nn.Module, layer_paths: list[str], args: tuple, kwargs: dict,
                      names: list[str], qlayers: dict[str, nn.Module], reason: str) -> GraphModule:
    """The root graph for ``model`` with its layers as exported blocks and its top level run eagerly
    (BlockCaptureError when the layers cannot be blocks); ``names``: the inputs', positional first."""
    if qlayers:
        raise BlockCaptureError("bitsandbytes layers are not supported with an eager top level")
    if any(t is not None for t in [*model._parameters.values(), *model._buffers.values()]):
        raise BlockCaptureError(f"{type(model).__name__} holds tensors of its own outside its modules")
    # linear modules of the top level (a pooler, a classifier head) are blocks too, so they stay sites
    outside = [p for p in linear_module_paths(model) if not any(p.startswith(q + ".") for q in layer_paths)]
    records = record_calls(model, layer_paths + outside, args, kwargs)
    missing = [p for p in layer_paths if p not in records]
    if missing:
        raise BlockCaptureError(f"layers {missing[:3]} are not called by the forward")
    layer_paths = layer_paths + [p for p in outside if p in records]
    calls = {i: ExportCall.of(records[p].args, records[p].kwargs) for i, p in enumerate(layer_paths)}
    blocks = export_blocks(model, layer_paths, calls, records, {})
    for i, path in enumerate(layer_paths):
        FlatCall(path, calls[i]).install(blocks[path])
    shell = _shell(model, blocks)
    graph = Graph()
    inputs = [graph.placeholder(n) for n in names]
    out = graph.call_module("vera_fx_eager", tuple(inputs[:len(args)]), dict(zip(names[len(args):],
                                                                             inputs[len(args):])))
    graph.output(out)
    root = nn.Module()
    root.vera_fx_eager = EagerTop(shell)
    gm = GraphModule(root, graph, class_name=type(model).__name__ + "EagerTop")
    for name, child in shell.named_children():
        gm.add_module(name, child)
    gm.meta[EAGER_TOP] = reason
    logger.info("capture: torch.export cannot capture the code around the layers of %s (%s); it runs eagerly "
                "around %d captured blocks", type(model).__name__, reason, len(blocks))
    return gm
