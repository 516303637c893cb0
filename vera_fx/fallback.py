"""The eager top level: when torch.export cannot capture the code around the layers, run it eagerly.

A model whose head or loss has data-dependent control flow (DeBERTa-v2's classification loss branches on the
label values) cannot be exported whole, although every site sits in its layers. Capture then keeps the
layers as blocks (each exported once per distinct layer, vera_fx/block_export.py) and runs the model's own
top-level code eagerly around them:

- the root graph is one ``call_module`` of ``vera_fx_eager`` (an ``EagerTop``), which calls the model's own
  ``forward`` on a structural copy of the model (``shell``): the same module objects as the root's children,
  so the root's frozen parameters, ``.train()`` / ``.eval()`` and ``.to()`` reach it, with every layer
  replaced by its block (the linear modules the top level calls, a pooler or a classifier head, are blocks
  too, so they remain sites);
- each block takes the layer's call as it comes (a forward pre-hook, ``FlatCall``, flattens it to the
  block's tensor inputs and checks the constants it was captured with) and returns the layer's own output
  structure (the exported layer's), so a layer may return several tensors, and a layer the top level calls
  several times (ALBERT's shared layer) is one block called several times.

Blocks keep everything blocks give (sites, merge, regional compile, FSDP per block); the top level is plain
eager PyTorch: nothing that needs the root graph (gradient checkpointing through the root's block calls,
mixed-adapter batches, ``torch.export`` of the adapted model), and ``modules_to_save`` only for modules that
are blocks (the match pass refuses the others).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from . import blocks as _blocks
from .block_export import bind_layers, export_groups
from .compat import pytree, register_deepcopy_hook
from .linear_like import linear_module_paths

logger = logging.getLogger(__name__)

# gm.meta key of a root graph whose top level runs eagerly: the reason export gave.
EAGER_TOP = "vera_fx_eager_top"


def eager_call(record: "_blocks.LayerCall") -> "_blocks.ExportCall":
    """A layer's call as ``blocks.export_block`` takes it, read from its eager record (no export needed)."""
    flat, spec = pytree.tree_flatten_with_path((record.args, record.kwargs))
    leaves = [("t", v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else ("c", v) for _, v in flat]
    return _blocks.ExportCall(spec, leaves, [pytree.keystr(p) for p, _ in flat])


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # an object whose == does not give a bool
        return False


class FlatCall:
    """Forward pre-hook of a block: the layer's call (args, kwargs) as the block's tensor inputs."""

    def __init__(self, path: str, call: "_blocks.ExportCall") -> None:
        self.path = path
        self.spec = call.spec
        self.constants = [(i, m[1]) for i, m in enumerate(call.leaves) if m[0] == "c"]

    def install(self, block: GraphModule) -> None:
        """Register on ``block`` (once), and on every ``copy.deepcopy`` of it (GraphModule copies drop hooks)."""
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
            if not _same(leaves[i], value):
                raise ValueError(f"layer {self.path!r} was captured with the constant {value!r} at argument "
                                 f"{i} and is now called with {leaves[i]!r}; call the model as in the example "
                                 "it was transformed with")
        return tuple(v for v in leaves if isinstance(v, torch.Tensor)), {}


class EagerTop(nn.Module):
    """Runs the model's own ``forward`` on ``shell`` (a copy of the model whose modules are the root graph's
    children, layers replaced by their blocks). ``shell`` is not registered: its modules are the root's."""

    def __init__(self, shell: nn.Module) -> None:
        super().__init__()
        self.__dict__["shell"] = shell

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shell = self.__dict__["shell"]
        shell.training = self.training
        return shell(*args, **kwargs)


_PLAIN = (str, int, float, bool, type(None))


def _shell(model: nn.Module, blocks: dict[str, GraphModule]) -> nn.Module:
    """A copy of ``model`` sharing its parameters and buffers, with each layer replaced by its block (which
    also gets the layer's plain attributes the top level may read, e.g. ``attention_type``)."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for path, block in blocks.items():
        layer = model.get_submodule(path)
        for key, value in layer.__dict__.items():
            if not key.startswith("_") and isinstance(value, _PLAIN) and key not in block.__dict__:
                block.__dict__[key] = value
        memo[id(layer)] = block
    shell = copy.deepcopy(model, memo)
    for module in model.modules():  # capture-time forwards (linear_like.linear_forwards) stay with the model
        copied = memo.get(id(module))
        if isinstance(copied, nn.Module) and copied is not module and copied not in blocks.values():
            copied.__dict__.pop("forward", None)
    return shell


def capture_eager_top(model: nn.Module, layer_paths: list[str], args: tuple, kwargs: dict,
                      names: list[str], qlayers: dict[str, nn.Module], reason: str) -> GraphModule:
    """The root graph for ``model`` with its layers as exported blocks and its top level run eagerly.
    ``names`` are the inputs' names (positional first); raises BlockCaptureError when the layers cannot be
    blocks (and then nothing can capture the model)."""
    if qlayers:
        raise _blocks.BlockCaptureError("bitsandbytes layers are not supported with an eager top level")
    if any(t is not None for t in [*model._parameters.values(), *model._buffers.values()]):
        raise _blocks.BlockCaptureError(f"{type(model).__name__} holds tensors of its own outside its modules")
    # linear modules of the top level (a pooler, a classifier head) are blocks too, so they stay sites
    outside = [p for p in linear_module_paths(model) if not any(p.startswith(q + ".") for q in layer_paths)]
    records = _blocks.record_calls(model, layer_paths + outside, args, kwargs)
    missing = [p for p in layer_paths if p not in records]
    if missing:
        raise _blocks.BlockCaptureError(f"layers {missing[:3]} are not called by the forward")
    layer_paths = layer_paths + [p for p in outside if p in records]
    calls = {i: eager_call(records[p]) for i, p in enumerate(layer_paths)}
    blocks = bind_layers(model, export_groups(model, layer_paths, calls, records), layer_paths, {})
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
