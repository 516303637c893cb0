"""Per-block run-time choices on a block-structured graph: activation checkpointing and regional compile.

``gradient_checkpointing_enable(gm)`` rewrites each ``call_module`` node of the top graph that calls a
block into ``checkpoint_block(block, *inputs)`` (``torch.utils.checkpoint`` without re-entrance): backward
keeps only each block's inputs and recomputes the block. The block is still called as a module, so FSDP2's
per-block hooks fire (and gather again during the recomputation). ``gradient_checkpointing_disable``
rewrites them back.

``compile_blocks(gm)`` compiles every block in place (``nn.Module.compile``); blocks whose generated code is
identical share one forward function, so torch.compile compiles a signature once for all of them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .compat import call_impl, set_compiled_call
from .sites import BLOCK_CALL_KEY, as_graph_module, graph_modules

logger = logging.getLogger(__name__)

_CKPT_KEY = "vera_fx_checkpointed"  # node.meta of a block call wrapped in checkpoint_block


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """Call ``block`` under non-reentrant activation checkpointing."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _root(gm: nn.Module, fn: str) -> GraphModule:
    inner = getattr(gm, "_orig_mod", gm)
    inner = getattr(inner, "module", inner)  # DistributedDataParallel
    if not isinstance(inner, GraphModule):
        if getattr(type(inner), "_vera_fx_source_graph", None) is not None:  # the model object: its source graph
            return as_graph_module(inner, fn)
        raise TypeError(f"{fn} takes the model from vera_fx.transform, its GraphModule (m.graph_module) or a "
                        f"torch.compile / DDP wrapper of either, got {type(gm).__name__}")
    return inner


def block_calls(gm: GraphModule) -> list[Node]:
    """The root graph's nodes that call a block (checkpointed or not)."""
    return [n for n in gm.graph.nodes if n.meta.get(BLOCK_CALL_KEY) is not None]


def gradient_checkpointing_enable(gm: nn.Module) -> nn.Module:
    """Checkpoint every block: backward keeps the block inputs and recomputes each block once.

    Gradients are unchanged (dropout replays its random state). A graph without blocks (captured as one
    graph) raises ValueError: there is nothing to checkpoint at block granularity. Returns ``gm``.
    """
    root = _root(gm, "gradient_checkpointing_enable")
    calls = block_calls(root)
    if not calls:
        raise ValueError("gradient_checkpointing_enable: this graph has no blocks (the model was captured as one "
                         "graph, e.g. a plain nn.Module or capture(..., blocks=False)); capture a model with a layer "
                         "list (nn.ModuleList) to checkpoint per block")
    graph = root.graph
    changed = 0
    for node in calls:
        if node.meta.get(_CKPT_KEY) or node.op != "call_module":
            continue
        with graph.inserting_before(node):
            block = graph.get_attr(node.target)
            new = graph.call_function(checkpoint_block, (block, *node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        new.meta[_CKPT_KEY] = True
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    graph.lint()
    root.recompile()
    logger.info("gradient checkpointing on for %d block calls", changed)
    return gm


def gradient_checkpointing_disable(gm: nn.Module) -> nn.Module:
    """Undo ``gradient_checkpointing_enable``: the blocks are called directly again. Returns ``gm``."""
    root = _root(gm, "gradient_checkpointing_disable")
    graph = root.graph
    for node in block_calls(root):
        if not node.meta.get(_CKPT_KEY):
            continue
        block_node = node.args[0]
        with graph.inserting_before(node):
            new = graph.call_module(block_node.target, tuple(node.args[1:]), dict(node.kwargs))
        new.meta = {k: v for k, v in node.meta.items() if k != _CKPT_KEY}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not block_node.users:
            graph.erase_node(block_node)
    graph.lint()
    root.recompile()
    return gm


def is_gradient_checkpointing(gm: nn.Module) -> bool:
    """Whether the graph's block calls are checkpointed."""
    return any(n.meta.get(_CKPT_KEY) for n in block_calls(_root(gm, "is_gradient_checkpointing")))


def _unsharing_recompile(self: GraphModule) -> Any:
    """``GraphModule.recompile`` for a block whose class is shared: first give it a class of its own (a
    subclass, so FSDP's wrapping class stays), so that new code never reaches the other blocks."""
    cls = type(self)
    if cls.__dict__.get("_vera_fx_shared"):
        cls = self.__class__ = type(cls.__name__, (cls,), {"_vera_fx_shared": False})
    code = GraphModule.recompile(self)
    if "_vera_fx_shared" in cls.__dict__:
        _drop_generated_call(cls)
    return code


def _drop_generated_call(cls: type) -> None:
    """Remove the ``__call__`` that ``GraphModule.recompile`` puts on the class of one of our block classes.
    A subclass (a block unshared on recompile, a deepcopy's ``GraphModuleImpl``: torch skips only classes of
    that name when it picks the base) would inherit it; its own wrapper calls ``super().__call__``, this one,
    which calls the subclass's wrapper again: endless recursion. Without it the class is called as any
    ``nn.Module`` (the generated forward is unchanged)."""
    if "__call__" in cls.__dict__:
        delattr(cls, "__call__")


def share_block_code(gm: nn.Module) -> int:
    """Make blocks with identical generated code instances of one class (torch.compile guards on the class
    and caches by code object, so they then compile once). A block that is rewritten later gets a class of
    its own again on its ``recompile``. Returns how many blocks now share another block's class."""
    root = _root(gm, "share_block_code")
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


def _call_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return call_impl(block, *args, **kwargs)


def compile_blocks(gm: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Regional compile: ``torch.compile`` every block in place, one compilation per distinct block code.

    The top graph stays eager (it is small: embeddings, masks, norms, head). Keyword arguments go to
    ``torch.compile``. A later graph rewrite (adapter switch, merge, unmerge) builds or recompiles the
    changed blocks, which then run eagerly: call ``compile_blocks`` again after it. Returns ``gm``.
    """
    root = _root(gm, "compile_blocks")
    blocks = graph_modules(root)[1:]
    if not blocks:
        raise ValueError("compile_blocks: this graph has no blocks (captured as one graph); use "
                         "torch.compile(gm) on the whole graph instead")
    n = share_block_code(root)
    compiled = torch.compile(_call_block, **compile_kwargs)  # one wrapper: one cache for every block
    for block in blocks:
        set_compiled_call(block, compiled)
    logger.info("compile_blocks: %d blocks, %d distinct codes", len(blocks), len(blocks) - n)
    return gm
