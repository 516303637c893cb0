"""Every private torch / bitsandbytes name vera_fx uses (but long-stable ones: ``nn.Module._parameters`` /
``_buffers`` / ``_modules`` / ``_apply``, ``Tensor._version`` / ``_base``, export's aten overloads), and the tested
torch range; ``scripts/test-torch.sh VERSION`` tells what a release moved."""

from __future__ import annotations

import copy
import functools
import logging
import re
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.fx import Graph, GraphModule

# torch.fx and torch.export flatten with this module (their TreeSpec type); torch 2.13 has no public one.
from torch.utils import _pytree as pytree
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket  # noqa: F401 (re-exported)
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.nn.modules.module import _IncompatibleKeys as IncompatibleKeys  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# The torch releases (major, minor) the full suite and the demo pass on; pyproject.toml pins the same range.
TESTED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 13), (2, 15))

# The logger of export's notes on the input dimensions it specialises (non-strict mode).
EXPORT_NOTES_LOGGER = "torch._export.non_strict_utils"


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: ``"2.15.0+cu130"`` -> ``(2, 15)``."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"torch version {version!r} does not start with MAJOR.MINOR; pass torch.__version__, "
                         "e.g. '2.15.0+cpu'")
    return int(match[1]), int(match[2])


def untested_torch_message(version: str) -> Optional[str]:
    """The warning for a torch outside the tested range, None inside it."""
    release = torch_release(version)
    low, high = TESTED_TORCH
    if low <= release <= high:
        return None
    side = "newer" if release > high else "older"
    return (f"vera_fx is tested on torch {low[0]}.{low[1]} to {high[0]}.{high[1]}; torch {version} is {side}. "
            "It should work, but torch.export's IR and the private APIs in vera_fx/compat.py may differ: "
            f"run scripts/test-torch.sh {version.split('+')[0]} to check")


def warn_if_untested(version: Optional[str] = None) -> bool:
    """Log one warning when ``version`` (default: the running torch) is outside the tested range; True if so."""
    message = untested_torch_message(torch.__version__ if version is None else version)
    if message is not None:
        logger.warning(message)
    return message is not None


def copy_codegen(source: Graph, target: Graph) -> None:
    """Give ``target`` a copy of ``source``'s code generator (export's pytree calling convention)."""
    target.set_codegen(copy.deepcopy(source._codegen))


def add_keyword_input(graph: Graph, name: str) -> None:
    """Extend a pytree-calling graph's signature by the keyword input ``name`` (its last placeholder)."""
    codegen = graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return
    info = codegen.pytree_info
    args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    spec = pytree.tree_flatten((args, {**kwargs, name: 0}))[1]
    codegen.pytree_info = _PyTreeInfo([*info.orig_args, name], spec, info.out_spec)


# What GraphModule.recompile derives from its Graph: saved and put back together, never one without the others.
_GENERATED = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


class GeneratedCode:
    """A GraphModule's Graph and generated code, to put back without generating again (torch.fx leaks each source)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm, self.cls, self.graph = gm, type(gm), gm._graph
        self.fields = {f: getattr(gm, f, None) for f in _GENERATED}
        self.forward = type(gm).__dict__.get("forward")

    def current(self) -> bool:
        """``gm`` still has this Graph, class and generated code (nobody edited and recompiled it since)."""
        return type(self.gm) is self.cls and self.gm._graph is self.graph and \
            getattr(self.gm, "_code", None) is self.fields["_code"]

    def restorable(self) -> bool:
        return type(self.gm) is self.cls and self.forward is not None

    def restore(self) -> None:
        self.gm._graph = self.graph
        self.graph.owning_module = self.gm
        for name, value in self.fields.items():
            setattr(self.gm, name, value)
        self.cls.forward = self.forward


def replace_with_copy(gm: GraphModule) -> None:
    """Give ``gm`` a copy of its Graph (and of the ``vera_fx*`` node tags passes edit in place) without generating
    code; the old Graph stays untouched."""
    graph = gm._graph
    new = Graph(tracer_cls=graph._tracer_cls)
    copied = new.graph_copy(graph, val_map={}, return_output_node=True)
    new._codegen = graph._codegen  # shared: never edited (a deep copy of its pytree specs warns)
    if copied is not None:
        value, old_output = copied
        new.output(value, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    for node in new.nodes:
        for key, tag in node.meta.items():
            if key.startswith("vera_fx") and isinstance(tag, dict):
                node.meta[key] = dict(tag)
    if hasattr(graph, "_co_fields"):
        new._co_fields = graph._co_fields
    gm._graph = new
    new.owning_module = gm


def register_deepcopy_hook(gm: GraphModule, hook: Callable[[GraphModule], Any]) -> None:
    """Run ``hook`` on every ``copy.deepcopy`` of ``gm``."""
    gm._register_deepcopy_hook(hook)


def saved_tensors_hooks_active() -> bool:
    """Whether autograd's saved tensors go through hooks now (checkpointing, offloading)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def backward_running() -> bool:
    """Whether this thread runs inside a backward pass (a reentrant checkpoint's recompute)."""
    return torch._C._current_graph_task_id() != -1


# dynamo's frame callback, None unless torch.compile runs around the caller (then every Python frame called
# from an eager frame is compiled as a frame of its own). A builtin: calling it starts no Python frame.
eval_frame_callback: Callable[[], Any] = torch._C._dynamo.eval_frame.get_eval_frame_callback


def eager_frame(fn: Callable[..., Any], reason: str) -> Callable[..., Any]:
    """``fn`` itself, its frame run eagerly under torch.compile while the frames it calls are compiled (dynamo's
    ``skip``; a graph break with ``reason`` in traced code). No wrapper, unlike ``torch.compiler.disable``, whose
    wrapper refuses every call while any thread runs torch.export."""
    fn = torch._dynamo.decorators.skip(fn)
    fn._torchdynamo_disable_msg = reason
    return fn


def copy_forward_hook(source: nn.Module, target: nn.Module, key: int) -> None:
    """Register ``source``'s forward hook ``key`` on ``target`` too, with its kwargs / always-called flags."""
    target._forward_hooks[key] = source._forward_hooks[key]
    for flags in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if key in getattr(source, flags):
            getattr(target, flags)[key] = True


def call_impl(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with its hooks, bypassing a compiled call set on it."""
    return module._call_impl(*args, **kwargs)


def set_compiled_call(module: nn.Module, compiled: Callable[..., Any]) -> None:
    """Make ``module(...)`` run ``compiled(module, ...)`` (one callable: modules of a class share a compile cache)."""
    module._compiled_call_impl = functools.partial(compiled, module)


def unpack_cpu_4bit(data: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight: (canonical data, restored quant state)."""
    import bitsandbytes.functional as bnb_functional

    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise TypeError(f"bitsandbytes {getattr(bnb_functional, '__version__', '')} has no "
                        "_convert_weight_packed_for_cpu_inverse: a 4-bit weight packed for CPU inference cannot be "
                        "unpacked for training; capture the model before any eval forward, or install the "
                        "bitsandbytes release this vera_fx was tested with (0.50)")
    return inverse(data, quant_state)


warn_if_untested()  # once, when the library first loads (every module that uses torch internals imports this one)
