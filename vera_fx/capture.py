"""Capture: nn.Module -> torch.fx.GraphModule through torch.export (non-strict).

The captured graph
- has a dynamic size on every dimension of every tensor input (``Dim.AUTO``; a dimension of size 1 in the
  example is specialised by export, so the default example uses batch 2 and length 8);
- keeps the model's output structure (a ``CausalLMOutputWithPast`` stays one);
- follows ``.train()`` / ``.eval()``: it is exported in training mode and every dropout (``native_dropout``'s
  ``train`` flag, ``scaled_dot_product_attention``'s ``dropout_p``) reads the module's ``training`` attribute
  through a ``get_attr`` node, so switching mode never re-captures (torch.compile recompiles once per mode);
- shares the model's parameter storage but owns frozen ``nn.Parameter`` objects, so freezing or training the
  graph never changes ``requires_grad`` on the user's model;
- takes the keyword set of the example; constant (non-tensor) keywords such as ``use_cache=False`` are
  filled in when left out, and a call with other keywords fails with a TypeError listing the expected ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from . import blocks as _blocks
from .compat import register_deepcopy_hook
from . import quantized
from .block_export import assemble, export_groups, rewrite_mode_flags, strip_metadata_asserts
from .signatures import Signature, install_input_check, model_filled_inputs, probe, \
    restore_input_names
from .example_inputs import ExampleInputs, clone_inputs, explicit_keywords, export_dynamic_shapes, is_pretrained, normalise_example, positional_names, warn_unit_dims
from .fallback import capture_eager_top
from .linear_like import linear_forwards, linear_module_paths
from .sites import MODEL_INFO_KEY, graph_modules

logger = logging.getLogger(__name__)

# Seconds a whole-model export may take before capture stops it (sympy on a model whose sizes are Python numbers
# ran for over 30 minutes); the environment variable VERA_FX_CAPTURE_BUDGET_S overrides it (0: no budget).
WHOLE_MODEL_BUDGET_S = 300.0


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says what export reported."""


# gm.meta key: the model a graph was captured from (generation re-exports its architecture with a KV cache).
SOURCE_MODEL_KEY = "vera_fx_source_model"


class SourceModel:
    """A reference to the captured model, kept by ``copy.deepcopy`` (the copy refers to the same model, whose
    architecture is all that is used) and dropped by pickling."""

    def __init__(self, model: Optional[nn.Module]) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> "SourceModel":
        return self

    def __getstate__(self) -> dict:
        return {"model": None}


def _own_frozen_parameters(gm: GraphModule) -> None:
    """Give the graph its own frozen Parameter objects over the model's storage (ties preserved)."""
    replaced: dict[int, nn.Parameter] = {}
    for _, mod in list(gm.named_modules(remove_duplicate=False)):
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if quantized.is_quantized_parameter(p):  # Int8Params / Params4bit carry quant state: keep
                p.requires_grad_(False)
                continue
            new = replaced.get(id(p))
            if new is None:
                new = nn.Parameter(p.detach(), requires_grad=False)
                replaced[id(p)] = new
            mod._parameters[pname] = new


def _check_no_set_grad_regions(gm: GraphModule) -> None:
    """``run_decompositions`` inlines ``wrap_with_set_grad_enabled`` regions (Llama's rotary embedding); one
    left behind would graph-break torch.compile on recompiles, so refuse it here."""
    for node in [n for g in graph_modules(gm) for n in g.graph.nodes]:
        if node.op == "call_function" and "wrap_with_set_grad_enabled" in str(node.target):
            raise CaptureError("torch.export left a wrap_with_set_grad_enabled region in the graph; "
                               "torch.compile would break on it")


@contextlib.contextmanager
def model_flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag and every parameter's ``requires_grad`` on exit (export
    switches them), whatever happens inside."""
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
        for name, p in model.named_parameters():
            if name in grads:
                p.requires_grad_(grads[name])


def capture(model: nn.Module, example_inputs: ExampleInputs = None, blocks: Optional[bool] = None) -> GraphModule:
    """Capture ``model`` as a GraphModule with dynamic shapes and train/eval support; no adapters.

    ``example_inputs`` is a tuple of positional arguments or a dict of keyword arguments; for a transformers
    model it may be left out. Every tensor is cloned before export. The model's modules, their training
    flags and their parameters' ``requires_grad`` are left as they were.

    ``blocks``: keep the layers of the model's layer list (``nn.ModuleList`` of one class) as GraphModule
    submodules, each distinct layer exported once (vera_fx/blocks.py). ``None`` (default) does so for
    transformers models and falls back to one graph when the layers cannot be blocks; ``True`` raises then;
    ``False`` captures one flat graph. Layers that take sizes as Python numbers (Swin's stages) are captured
    with every size but the batch static (another size captures another graph). When export cannot capture
    the code around the layers (a data-dependent head or loss), ``None`` and ``True`` keep the layers as blocks
    under the model's own top level, run eagerly (vera_fx/fallback.py; logged once). A whole-model export
    running past ``whole_model_budget_s()`` seconds is stopped with a CaptureError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if blocks not in (None, True, False):
        raise TypeError(f"blocks must be None, True or False, got {blocks!r}")
    budget = whole_model_budget_s()
    args, kwargs = normalise_example(model, example_inputs)
    args, kwargs = clone_inputs(args), clone_inputs(kwargs)
    warn_unit_dims(args, kwargs)
    qlayers = quantized.quantized_layers(model)  # bitsandbytes linears stay opaque (ImportError without bnb)
    layer_paths = [p for paths in _blocks.find_layer_lists(model).values() for p in paths] \
        if (blocks is True or (blocks is None and is_pretrained(model))) else []
    names_in_order = list(positional_names(model, len(args))) + list(kwargs)
    try:
        with model_flags_kept(model), warnings.catch_warnings(), quantized.stand_ins(model, qlayers), \
                explicit_keywords(model, kwargs), linear_forwards(model), _drop_path_as_dropout(model):
            model.train()
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            gm = _export_tree(model, args, kwargs, layer_paths, qlayers, blocks, names_in_order, budget)
    except CaptureError:
        raise
    except Exception as e:  # export raises many types; name the model and keep the cause
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {_first_line(e)}") from e
    return _finish(gm, model, args, kwargs, names_in_order)


def _finish(gm: GraphModule, model: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> GraphModule:
    """The captured tree made ready: dropout following the mode, own frozen parameters, the model's input
    names, the call signature and its keyword check, what the passes need to know of the model."""
    # the block paths stripped the metadata asserts of every graph before binding (export_groups)
    n_flags = rewrite_mode_flags(gm) + sum(g.meta.pop("vera_fx_flags", 0) for g in graph_modules(gm)[1:])
    _check_no_set_grad_regions(gm)
    _own_frozen_parameters(gm)
    flat_inputs = list(args) + [kwargs[k] for k in kwargs]
    restore_input_names(gm, names)
    gm.graph.lint()
    gm.recompile()  # blocks were compiled when bound (their template was final)
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    constants = tuple((n, v) for n, v in zip(names, flat_inputs)
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


@contextlib.contextmanager
def _drop_path_as_dropout(model: nn.Module) -> Iterator[None]:
    """While exporting, transformers' stochastic-depth modules (``*DropPath`` with ``drop_prob`` > 0: Swin,
    BEiT, ConvNeXt) run ``_drop_path``: their own forward tests ``self.training`` in Python, which export bakes in
    (stochastic depth in eval mode too); a dropout node is wired to ``self.training`` like every dropout."""
    changed = []
    try:
        for module in model.modules():
            p = getattr(module, "drop_prob", None)
            if type(module).__name__.endswith("DropPath") and isinstance(p, float) and p > 0 \
                    and "forward" not in module.__dict__:
                module.forward = functools.partial(_drop_path, p=p)
                changed.append(module)
        yield
    finally:
        for module in changed:
            module.__dict__.pop("forward", None)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def whole_model_budget_s() -> float:
    """Seconds a whole-model export may take: ``VERA_FX_CAPTURE_BUDGET_S`` if set (0 or less: none), else
    ``WHOLE_MODEL_BUDGET_S``."""
    raw = os.environ.get("VERA_FX_CAPTURE_BUDGET_S", "").strip()
    if not raw:
        return WHOLE_MODEL_BUDGET_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"VERA_FX_CAPTURE_BUDGET_S={raw!r} is not a number of seconds; set it to e.g. 600, or 0 "
                         "for no budget") from None


class _OverBudget(BaseException):
    """Raised by the budget's alarm inside export; a BaseException, so no ``except Exception`` of torch or
    sympy swallows it."""


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Raise ``_OverBudget`` inside the block once ``seconds`` have passed (SIGALRM: in the main thread of a
    Unix process; elsewhere the block runs without a budget). An outer timer keeps its remaining time."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
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
    """One export of the whole model, stopped past ``budget`` seconds with a CaptureError that says why."""
    start = time.monotonic()
    try:
        with _time_budget(budget):
            ep = torch.export.export(model, args, kwargs, strict=False,
                                     dynamic_shapes=export_dynamic_shapes(model, args, kwargs))
            return _graph_of(ep)
    except _OverBudget:
        raise CaptureError(
            f"torch.export did not capture {type(model).__name__} as one graph within {budget:.0f} s (stopped after "
            f"{time.monotonic() - start:.0f} s): the layers were not captured as blocks ({why_not_blocks}), and "
            "exporting the whole model with dynamic sizes is too slow (sympy solving its size expressions). Make the "
            "layers capturable as blocks (see the reason), pass example inputs whose sizes may be static, or allow "
            "more time with VERA_FX_CAPTURE_BUDGET_S=<seconds> (0: no budget)") from None


def _graph_of(ep: torch.export.ExportedProgram) -> GraphModule:
    """The exported program as a GraphModule in export's training IR, its no-grad / disabled-autocast regions
    inlined; ``run_decompositions`` (it costs as much as export) only when a region stays (an enabled
    autocast region), since torch.compile would break on it."""
    exported = ep.module()
    gm = GraphModule(exported, exported.graph)
    _blocks.inline_wrappers(gm)
    if _blocks.remaining_wrappers(gm):
        exported = ep.run_decompositions({}).module()
        gm = GraphModule(exported, exported.graph)
    strip_metadata_asserts(gm)
    return gm


def _export_tree(model: nn.Module, args: tuple, kwargs: dict, layer_paths: list[str],
                 qlayers: dict[str, nn.Module], blocks: Optional[bool], names: list[str], budget: float) -> GraphModule:
    """The graph tree: blocks under an exported top level; else one exported graph; else, when export cannot
    capture the code around the layers, blocks under the model's own top level run eagerly (fallback.py)."""
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
            return _capture_blocks_sized(model, args, kwargs, layer_paths, qlayers)
        except Exception as e:  # the layers cannot be blocks: one graph, as before
            if blocks is True:  # the layers cannot be blocks: refused; the top level cannot be exported: eager
                if isinstance(e, _blocks.BlockCaptureError):
                    raise
                return eager_or_raise(e, layer_paths)
            why_not = _first_line(e)
            logger.info("capture: layers of %s kept in one graph (%s)", type(model).__name__, why_not)
    try:
        gm = _export_whole(model, args, kwargs, why_not, budget)
    except CaptureError:
        raise
    except Exception as e:  # a plain module's layer list too, unless blocks=False
        paths = layer_paths or [p for ps in _blocks.find_layer_lists(model).values() for p in ps if blocks is None]
        return eager_or_raise(e, paths)
    quantized.restore_quantized(gm, qlayers)
    return gm


def _capture_blocks_sized(model: nn.Module, args: tuple, kwargs: dict, layer_paths: list[str],
                          qlayers: dict[str, nn.Module]) -> GraphModule:
    """Blocks with every size dynamic; when a layer takes a size as a Python number (Swin's stages take the
    patch grid's height and width), again with every size but the batch static, so those are constants."""
    try:
        return _capture_blocks(model, args, kwargs, export_dynamic_shapes(model, args, kwargs), layer_paths,
                               qlayers)
    except _blocks.SymbolicArgumentError as e:
        logger.info("capture: a layer of %s takes a size as a Python number (%s); capturing with every size but "
                    "the batch static (another size captures another graph)", type(model).__name__, e)
        return _capture_blocks(model, args, kwargs, export_dynamic_shapes(model, args, kwargs, batch_only=True),
                               layer_paths, qlayers)


def _capture_blocks(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, layer_paths: list[str],
                    qlayers: dict[str, nn.Module]) -> GraphModule:
    """The block-structured capture (vera_fx/blocks.py): top level and one export per distinct block."""
    config = getattr(model, "config", None)
    # transformers collects attention weights with hooks on modules inside the layers, which a block hides
    # (hidden states come from hooks on the layers themselves: the stand-ins carry those, see blocks.stand_ins)
    if kwargs.get("output_attentions") or (kwargs.get("output_attentions") is None
                                           and getattr(config, "output_attentions", False) is True):
        raise _blocks.BlockCaptureError("output_attentions=True records modules inside the layers with hooks")
    records = _blocks.record_calls(model, layer_paths, args, kwargs)
    _blocks.check_records(model, layer_paths, records)
    plan = _blocks.BlockPlan(layer_paths, records)
    with _blocks.stand_ins(model, layer_paths, records, plan.calls):
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    missing = [p for i, p in enumerate(layer_paths) if i not in plan.calls]
    if missing:
        raise _blocks.BlockCaptureError(f"layers {missing[:3]} are not called by the forward")
    graphs = export_groups(model, layer_paths, plan.calls, records)
    return assemble(model, _graph_of(ep), graphs, plan, qlayers)


def _model_info(model: nn.Module) -> dict[str, Any]:
    """What the match pass needs to know of the model: its architecture, output head and module types."""
    cfg = getattr(model, "config", None)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (NotImplementedError, AttributeError):
            out_emb = None
        if out_emb is not None:
            head = next((n for n, m in model.named_modules() if m is out_emb), None)
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "name_or_path": model.__dict__.get("name_or_path") or None,  # where PEFT reads it
        "model_type": getattr(cfg, "model_type", None),
        "output_head": head,
        "modules": {n: type(m).__name__ for n, m in model.named_modules() if n},
        "linear_modules": linear_module_paths(model),  # what PEFT's "all-linear" considers
    }


