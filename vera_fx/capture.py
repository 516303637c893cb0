"""Capture: nn.Module -> torch.fx.GraphModule tree through torch.export (non-strict), with dynamic sizes, the
model's output structure, dropout following ``.train()`` / ``.eval()`` and frozen parameters over its storage."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from . import quantized
from .block_export import (capture_eager_top, export_blocks, inline_wrappers, remaining_wrappers, rewrite_mode_flags,
                           strip_metadata_asserts)
from .blocks import BlockCaptureError, SymbolicArgumentError, attach_blocks, export_top, find_layer_paths
from .compat import register_deepcopy_hook
from .signatures import (ExampleInputs, Signature, clone_inputs, dynamic_shapes_of, explicit_keywords,
                         install_input_check, is_pretrained, model_filled_inputs, normalise_example, positional_names,
                         probe, restore_input_names, warn_unit_dims)
from .sites import MODEL_INFO_KEY, graph_modules

logger = logging.getLogger(__name__)

# Seconds a whole-model export may take (sympy on a model whose sizes are Python numbers ran for over 30 minutes).
WHOLE_MODEL_BUDGET_S = 300.0


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says what export reported."""


# gm.meta key: the model a graph was captured from (generation re-exports its architecture with a KV cache).
SOURCE_MODEL_KEY = "vera_fx_source_model"


class SourceModel:
    """The captured model, kept by ``copy.deepcopy`` (only its architecture is used), dropped by pickling."""

    def __init__(self, model: Optional[nn.Module]) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> "SourceModel":
        return self

    def __getstate__(self) -> dict:
        return {"model": None}


@contextlib.contextmanager
def model_flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag and parameter's ``requires_grad`` (export switches them)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, grad in grads:
            p.requires_grad_(grad)


def capture(model: nn.Module, example_inputs: ExampleInputs = None, blocks: Optional[bool] = None) -> GraphModule:
    """Capture ``model`` (``example_inputs``: a tuple or a dict, optional for a transformers model) as a GraphModule
    with dynamic shapes and train/eval support, no adapters. ``blocks``: the layer list's layers as GraphModule
    submodules (``None``: for transformers models, else one graph; ``True``: or raise); a whole-model export past
    ``whole_model_budget_s()`` seconds raises CaptureError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if blocks not in (None, True, False):
        raise TypeError(f"blocks must be None, True or False, got {blocks!r}")
    budget = whole_model_budget_s()
    args, kwargs = normalise_example(model, example_inputs)
    args, kwargs = clone_inputs(args), clone_inputs(kwargs)
    warn_unit_dims(args, kwargs)
    qlayers = quantized.quantized_layers(model)  # bitsandbytes linears stay opaque (ImportError without bnb)
    layer_paths = find_layer_paths(model) if blocks is True or (blocks is None and is_pretrained(model)) else []
    names_in_order = list(positional_names(model, len(args))) + list(kwargs)
    try:
        with model_flags_kept(model), warnings.catch_warnings(), quantized.stand_ins(model, qlayers), \
                explicit_keywords(model, kwargs), quantized.linear_forwards(model), \
                quantized.forwards(model, _drop_path_forward):
            model.train()
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            gm = _export_tree(model, args, kwargs, layer_paths, qlayers, blocks, names_in_order, budget)
    except CaptureError:
        raise
    except Exception as e:  # export raises many types; name the model and keep the cause
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {_first_line(e)}") from e
    return _finish(gm, model, args, kwargs, names_in_order)


def _finish(gm: GraphModule, model: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> GraphModule:
    """The captured tree made ready: mode flags, own frozen parameters, input names, signature and keyword check."""
    n_flags = rewrite_mode_flags(gm) + sum(g.meta.pop("vera_fx_flags", 0) for g in graph_modules(gm)[1:])
    if any(n.op == "call_function" and "wrap_with_set_grad_enabled" in str(n.target)
           for g in graph_modules(gm) for n in g.graph.nodes):  # torch.compile would graph-break on recompiles
        raise CaptureError("torch.export left a wrap_with_set_grad_enabled region in the graph; "
                           "torch.compile would break on it")
    replaced: dict[int, nn.Parameter] = {}  # own frozen Parameters over the model's storage (ties preserved)
    for mod in gm.modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if quantized.is_quantized_parameter(p):  # Int8Params / Params4bit carry quant state: keep
                p.requires_grad_(False)
            elif p is not None:
                mod._parameters[pname] = replaced.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
    restore_input_names(gm, names)
    gm.graph.lint()
    gm.recompile()  # blocks were compiled when bound (their template was final)
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    constants = tuple((n, v) for n, v in zip(names, [*args, *kwargs.values()])
                      if not isinstance(v, torch.Tensor) and n in placeholders)
    gm.meta["vera_fx_signature"] = Signature(names=placeholders, constants=constants,
                                             defaults=model_filled_inputs(model, placeholders, args, kwargs),
                                             probe=probe(gm))
    gm.meta[MODEL_INFO_KEY] = _model_info(model)
    gm.meta[SOURCE_MODEL_KEY] = SourceModel(model)
    install_input_check(gm)
    register_deepcopy_hook(gm, install_input_check)  # copy.deepcopy(gm) keeps the keyword check
    gm.train(model.training)
    logger.info("captured %s: %d nodes in the top graph, %d blocks, %d mode-dependent dropout nodes",
                type(model).__name__, len(gm.graph.nodes), len(graph_modules(gm)) - 1, n_flags)
    return gm


def _drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth as a dropout of a per-sample ones tensor: ``floor(1 - p + U) / (1 - p)`` per sample."""
    return x * nn.functional.dropout(x.new_ones((x.shape[0],) + (1,) * (x.dim() - 1)), p, True)


def _drop_path_forward(module: nn.Module) -> Optional[Callable]:
    """``_drop_path`` for transformers' ``*DropPath`` modules, whose ``self.training`` test export would bake in."""
    p = getattr(module, "drop_prob", None)
    if type(module).__name__.endswith("DropPath") and isinstance(p, float) and p > 0:
        return functools.partial(_drop_path, p=p)
    return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def whole_model_budget_s() -> float:
    """``VERA_FX_CAPTURE_BUDGET_S`` if set (0 or less: no budget), else ``WHOLE_MODEL_BUDGET_S``."""
    raw = os.environ.get("VERA_FX_CAPTURE_BUDGET_S", "").strip()
    try:
        return float(raw) if raw else WHOLE_MODEL_BUDGET_S
    except ValueError:
        raise ValueError(f"VERA_FX_CAPTURE_BUDGET_S={raw!r} is not a number of seconds; set it to e.g. 600, or 0 "
                         "for no budget") from None


class _OverBudget(BaseException):
    """Raised by the budget's alarm inside export (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Raise ``_OverBudget`` inside once ``seconds`` have passed (SIGALRM: the main thread of a Unix process only);
    an outer timer keeps its remaining time."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_: Any) -> None:
        raise _OverBudget()

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, stop)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer_delay > 0:
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def _export_whole(model: nn.Module, args: tuple, kwargs: dict, why_not_blocks: str, budget: float) -> GraphModule:
    """One export of the whole model, stopped past ``budget`` seconds."""
    start = time.monotonic()
    try:
        with _time_budget(budget):
            ep = torch.export.export(model, args, kwargs, strict=False,
                                     dynamic_shapes=dynamic_shapes_of(args, kwargs)[0 if args else 1])
            return _graph_of(ep)
    except _OverBudget:
        raise CaptureError(
            f"torch.export did not capture {type(model).__name__} as one graph within {budget:.0f} s (stopped after "
            f"{time.monotonic() - start:.0f} s): the layers were not captured as blocks ({why_not_blocks}), and "
            "exporting the whole model with dynamic sizes is too slow (sympy solving its size expressions). Make the "
            "layers capturable as blocks (see the reason), pass example inputs whose sizes may be static, or allow "
            "more time with VERA_FX_CAPTURE_BUDGET_S=<seconds> (0: no budget)") from None


def _graph_of(ep: torch.export.ExportedProgram) -> GraphModule:
    """The exported program as a GraphModule, its wrapper regions inlined (else decomposed: an enabled autocast)."""
    exported = ep.module()
    gm = GraphModule(exported, exported.graph)
    inline_wrappers(gm)
    if remaining_wrappers(gm):
        exported = ep.run_decompositions({}).module()
        gm = GraphModule(exported, exported.graph)
    strip_metadata_asserts(gm)
    return gm


def _export_tree(model: nn.Module, args: tuple, kwargs: dict, layer_paths: list[str],
                 qlayers: dict[str, nn.Module], blocks: Optional[bool], names: list[str], budget: float) -> GraphModule:
    """Blocks under an exported top level; else one exported graph; else blocks under an eager top level."""
    def eager_or_raise(error: Exception, paths: list[str]) -> GraphModule:
        if not paths:
            raise error
        try:
            return capture_eager_top(model, paths, args, kwargs, names, qlayers, _first_line(error))
        except Exception as eager_error:
            logger.info("capture: no eager top level for %s (%s)", type(model).__name__, _first_line(eager_error))
            raise error from None

    why_not = "blocks=False" if blocks is False else "not a transformers model: pass blocks=True to try its layer list"
    if layer_paths:
        try:
            return _capture_blocks(model, args, kwargs, layer_paths, qlayers)
        except Exception as e:  # the layers cannot be blocks: refused (blocks=True), else one graph, as before
            if blocks is True:  # the top level cannot be exported: eager
                if isinstance(e, BlockCaptureError):
                    raise
                return eager_or_raise(e, layer_paths)
            why_not = _first_line(e)
            logger.info("capture: layers of %s kept in one graph (%s)", type(model).__name__, why_not)
    try:
        gm = _export_whole(model, args, kwargs, why_not, budget)
    except CaptureError:
        raise
    except Exception as e:  # a plain module's layer list too, unless blocks=False
        return eager_or_raise(e, layer_paths or (find_layer_paths(model) if blocks is None else []))
    quantized.restore_quantized(gm, qlayers)
    return gm


def _capture_blocks(model: nn.Module, args: tuple, kwargs: dict, layer_paths: list[str],
                    qlayers: dict[str, nn.Module]) -> GraphModule:
    """Blocks under an exported top level (static sizes but the batch when a layer takes a size as a number)."""
    # transformers collects attention weights with hooks on modules inside the layers, which a block hides
    # (hidden states come from hooks on the layers themselves: the stand-ins carry those, blocks.export_top)
    if kwargs.get("output_attentions") or (kwargs.get("output_attentions") is None and getattr(
            getattr(model, "config", None), "output_attentions", False) is True):
        raise BlockCaptureError("output_attentions=True records modules inside the layers with hooks")
    shapes = dynamic_shapes_of(args, kwargs)[0 if args else 1]  # export takes one of the two
    try:
        ep, records, calls = export_top(model, args, kwargs, shapes, layer_paths)
    except SymbolicArgumentError as e:
        logger.info("capture: a layer of %s takes a size as a Python number (%s); capturing with every size but "
                    "the batch static (another size captures another graph)", type(model).__name__, e)
        shapes = dynamic_shapes_of(args, kwargs, batch_only=True)[0 if args else 1]
        ep, records, calls = export_top(model, args, kwargs, shapes, layer_paths)
    blocks = export_blocks(model, layer_paths, calls, records, qlayers)
    gm = _graph_of(ep)
    quantized.restore_quantized(gm, {q: m for q, m in qlayers.items() if not any(q.startswith(p + ".")
                                                                                 for p in layer_paths)})
    attach_blocks(gm, blocks, layer_paths, records)
    return gm


def _model_info(model: nn.Module) -> dict[str, Any]:
    """What the match pass needs to know of the model: its architecture, output head and module types."""
    try:
        out_emb = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    except (NotImplementedError, AttributeError):
        out_emb = None
    head = next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "name_or_path": model.__dict__.get("name_or_path") or None,  # where PEFT reads it
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "output_head": head,
        "modules": {n: type(m).__name__ for n, m in model.named_modules() if n},
        "linear_modules": quantized.linear_module_paths(model),  # what PEFT's "all-linear" considers
    }


