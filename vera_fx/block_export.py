"""Block export shared by both top levels of a block capture (exported, or run eagerly: vera_fx/fallback.py).

Each distinct layer (class, call structure, parameter shapes) is exported once; its graph is cleaned (export's
guards and metadata asserts dropped, wrapper regions inlined, dropout made to follow ``.train()`` / ``.eval()``)
and copied for every layer of its group, each copy bound to its own layer's weights (``assemble``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from . import blocks as _blocks
from . import quantized

logger = logging.getLogger(__name__)


def train_only(p: float, training: bool) -> float:
    """``p`` in training mode, else 0.0: the dropout probability that follows the module's mode."""
    return p if training else 0.0


def rewrite_mode_flags(gm: GraphModule) -> int:
    """Make dropout read ``self.training``; returns how many nodes now follow the mode."""
    graph = gm.graph
    training: Optional[Node] = None

    def flag(before: Node) -> Node:
        nonlocal training
        if training is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a bool attribute, not a tensor: intended
                training = graph.get_attr("training")
        return training

    count = 0
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.native_dropout.default, aten.dropout.default, aten.feature_dropout.default,
                           aten.alpha_dropout.default, aten.feature_alpha_dropout.default):
            args = list(node.args)
            train = args[2] if len(args) > 2 else node.kwargs.get("train", True)
            if train is True:
                args[2:3] = [flag(node)]
                node.args = tuple(args)
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "train"}
                count += 1
        elif node.target is aten.scaled_dot_product_attention.default:
            args = list(node.args)
            p = args[4] if len(args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, float) and p > 0.0:
                with graph.inserting_before(node):
                    p_node = graph.call_function(train_only, (p, flag(node)))
                if len(args) > 4:
                    args[4] = p_node
                    node.args = tuple(args)
                else:
                    node.kwargs = {**node.kwargs, "dropout_p": p_node}
                count += 1
    return count


def strip_metadata_asserts(gm: GraphModule) -> int:
    """Erase export's ``aten._assert_tensor_metadata`` checks (the dtype each cast saw at capture).

    They make a graph fail under ``torch.autocast`` or with a mask of another dtype, although the ops around
    them compute what eager does; the model object keys its graphs by input dtypes and autocast state
    instead. Returns how many were erased.
    """
    target = torch.ops.aten._assert_tensor_metadata.default
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target and not n.users]
    for n in nodes:
        gm.graph.erase_node(n)
    return len(nodes)


def _has_attr(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# group id -> (template graph, member indices, mode-dependent dropout nodes, lifted constants)
Groups = dict[int, tuple[Graph, list[int], int, dict[str, torch.Tensor]]]


def export_groups(model: nn.Module, layer_paths: list[str], calls: dict[int, "_blocks.ExportCall"],
                  records: dict[str, "_blocks.LayerCall"]) -> Groups:
    """Group the layers by ``blocks.block_key`` and export the first of each group once: group id ->
    (cleaned template graph, member indices, dropout nodes made mode-dependent)."""
    groups: dict[tuple, list[int]] = {}
    for i, path in enumerate(layer_paths):
        groups.setdefault(_blocks.block_key(model, path, calls[i]), []).append(i)
    graphs: Groups = {}
    for gid, members in enumerate(groups.values()):
        first = layer_paths[members[0]]
        layer = model.get_submodule(first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            b_ep = _blocks.export_block(layer, calls[members[0]], records[first])
        b_mod = b_ep.module()
        _blocks.drop_guards(b_mod)
        _blocks.inline_wrappers(b_mod)
        left = _blocks.remaining_wrappers(b_mod)
        if left:
            raise _blocks.BlockCaptureError(f"block {first!r} keeps {left[:1]}")
        constants = _lift_constants(layer, b_mod, first)
        strip_metadata_asserts(b_mod)  # on the template, before restore_quantized, as the flat path does
        flags = rewrite_mode_flags(b_mod)  # on the template: every copy reads its own block's flag
        graphs[gid] = (b_mod.graph, members, flags, constants)
    return graphs


def _lift_constants(layer: nn.Module, exported: GraphModule, path: str) -> dict[str, torch.Tensor]:
    """The tensor constants export lifted out of the layer's code (DeBERTa's ``torch.tensor(head_size)``):
    renamed to top-level ``vera_fx_constant_<i>`` targets, which every block of the group gets as a buffer."""
    constants: dict[str, torch.Tensor] = {}
    for node in exported.graph.nodes:
        if node.op != "get_attr" or _has_attr(layer, str(node.target)):
            continue
        value = _lookup(exported, str(node.target))
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
            raise _blocks.BlockCaptureError(f"block {path!r} keeps attributes of its own ({node.target})")
        name = f"vera_fx_constant_{len(constants)}"
        constants[name] = value
        node.target = name
    return constants


def _lookup(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def bind_layers(model: nn.Module, graphs: Groups, paths: list[str],
                qlayers: dict[str, nn.Module]) -> dict[str, GraphModule]:
    """A block per layer: a copy of its group's graph bound to the layer, quantized layers restored inside."""
    bound: dict[str, GraphModule] = {}
    for gid, (graph, members, flags, constants) in graphs.items():
        for i in members:
            path = paths[i]
            layer = model.get_submodule(path)
            for name, value in constants.items():  # held by the layer only while its block is bound
                layer.register_buffer(name, value, persistent=False)
            try:
                block = _blocks.bind_block(layer, graph, path, gid)
            finally:
                for name in constants:
                    del layer._buffers[name]
            block.meta["vera_fx_flags"] = flags
            inner = {q[len(path) + 1:]: m for q, m in qlayers.items() if q.startswith(path + ".")}
            if inner:
                quantized.restore_quantized(block, inner)
                block.recompile()
            bound[path] = block
    return bound


def assemble(model: nn.Module, gm: GraphModule, graphs: Groups, plan: "_blocks.BlockPlan",
             qlayers: dict[str, nn.Module]) -> GraphModule:
    """Bind a copy of each block graph to its layer, restore quantized layers, attach the blocks to ``gm``."""
    bound = bind_layers(model, graphs, plan.paths, qlayers)
    outer = {q: m for q, m in qlayers.items() if not any(q.startswith(p + ".") for p in plan.paths)}
    quantized.restore_quantized(gm, outer)
    _blocks.attach_blocks(gm, bound, plan)
    return gm
