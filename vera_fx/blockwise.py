"""Per-block run-time choices on a block tree: activation checkpointing (the block still called as a module, so
FSDP2's per-block hooks fire) and regional compile (blocks with identical code share one class and compile once)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .compat import call_impl, set_compiled_call
from .distributed import unwrap_parallel
from .sites import BLOCK_CALL_KEY, as_graph_module, graph_modules

logger = logging.getLogger(__name__)

_CKPT_KEY = "vera_fx_checkpointed"  # node.meta of a block call wrapped in checkpoint_block


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """Call ``block`` under non-reentrant activation checkpointing."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def block_calls(gm: GraphModule) -> list[Node]:
    """The root graph's nodes that call a block (checkpointed or not)."""
    return [n for n in gm.graph.nodes if n.meta.get(BLOCK_CALL_KEY) is not None]


def gradient_checkpointing_enable(gm: nn.Module) -> nn.Module:
    """Checkpoint every block (dropout replays its random state); returns ``gm``."""
    root = as_graph_module(unwrap_parallel(gm), "gradient_checkpointing_enable")
    if not block_calls(root):
        raise ValueError("gradient_checkpointing_enable: this graph has no blocks (the model was captured as one "
                         "graph, e.g. a plain nn.Module or capture(..., blocks=False)); capture a model with a layer "
                         "list (nn.ModuleList) to checkpoint per block")
    logger.info("gradient checkpointing on for %d block calls", _set_checkpointing(root, True))
    return gm


def gradient_checkpointing_disable(gm: nn.Module) -> nn.Module:
    """Undo ``gradient_checkpointing_enable``. Returns ``gm``."""
    _set_checkpointing(as_graph_module(unwrap_parallel(gm), "gradient_checkpointing_disable"), False)
    return gm


def _set_checkpointing(root: GraphModule, on: bool) -> int:
    """Rewrite the block calls into (``on``) or out of ``checkpoint_block`` calls; returns how many."""
    graph = root.graph
    calls = [n for n in block_calls(root) if bool(n.meta.get(_CKPT_KEY)) != on]
    for node in calls:
        block_node = node.args[0]
        with graph.inserting_before(node):
            if on:
                new = graph.call_function(checkpoint_block, (graph.get_attr(node.target), *node.args),
                                          dict(node.kwargs))
            else:
                new = graph.call_module(block_node.target, tuple(node.args[1:]), dict(node.kwargs))
        new.meta = {k: v for k, v in node.meta.items() if k != _CKPT_KEY}
        if on:
            new.meta[_CKPT_KEY] = True
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not on and not block_node.users:
            graph.erase_node(block_node)
    graph.lint()
    root.recompile()
    return len(calls)


def is_gradient_checkpointing(gm: nn.Module) -> bool:
    """Whether the graph's block calls are checkpointed."""
    root = as_graph_module(unwrap_parallel(gm), "is_gradient_checkpointing")
    return any(n.meta.get(_CKPT_KEY) for n in block_calls(root))


def _unsharing_recompile(self: GraphModule) -> Any:
    """``GraphModule.recompile`` for a block of a shared class: first a subclass of its own (FSDP's stays)."""
    cls = type(self)
    if cls.__dict__.get("_vera_fx_shared"):
        cls = self.__class__ = type(cls.__name__, (cls,), {"_vera_fx_shared": False})
    code = GraphModule.recompile(self)
    if "_vera_fx_shared" in cls.__dict__:
        _drop_generated_call(cls)
    return code


def _drop_generated_call(cls: type) -> None:
    """Remove the ``__call__`` ``GraphModule.recompile`` puts on a shared class: a subclass (an unshared block, a
    deepcopy's ``GraphModuleImpl``) would inherit it, and its own wrapper's ``super().__call__`` would recurse."""
    if "__call__" in cls.__dict__:
        delattr(cls, "__call__")


def share_block_code(gm: nn.Module) -> int:
    """Make blocks with identical generated code instances of one class (torch.compile guards on the class)."""
    root = as_graph_module(unwrap_parallel(gm), "share_block_code")
    by_code: dict[str, list[GraphModule]] = {}
    for block in graph_modules(root)[1:]:
        by_code.setdefault(block.code, []).append(block)
    shared = 0
    for members in by_code.values():
        if len(members) < 2 or all(type(b) is type(members[0]) for b in members):
            continue
        cls = type(type(members[0]).__name__, (GraphModule,),
                   {"_vera_fx_shared": True, "recompile": _unsharing_recompile})
        for block in members:
            block.__class__ = cls
        GraphModule.recompile(members[0])  # generates the shared forward on the shared class
        _drop_generated_call(cls)
        shared += len(members) - 1
    return shared


def compile_blocks(gm: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Regional compile: ``torch.compile`` every block in place, once per distinct block code; the top graph stays
    eager, as do blocks a later rewrite recompiles (call ``compile_blocks`` again). Returns ``gm``."""
    root = as_graph_module(unwrap_parallel(gm), "compile_blocks")
    blocks = graph_modules(root)[1:]
    if not blocks:
        raise ValueError("compile_blocks: this graph has no blocks (captured as one graph); use "
                         "torch.compile(gm) on the whole graph instead")
    n = share_block_code(root)
    compiled = torch.compile(call_impl, **compile_kwargs)  # one wrapper: one cache for every block
    for block in blocks:
        set_compiled_call(block, compiled)
    logger.info("compile_blocks: %d blocks, %d distinct codes", len(blocks), len(blocks) - n)
    return gm
