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
import inspect
import logging
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from . import blocks as _blocks
from .compat import pytree, register_deepcopy_hook
from . import quantized
from .block_export import assemble, export_groups, rewrite_mode_flags, strip_metadata_asserts, train_only
from .fallback import capture_eager_top
from .linear_like import linear_forwards, linear_module_paths
from .sites import graph_modules

__all__ = ["capture", "model_flags_kept", "train_only", "CaptureError", "default_example_inputs", "Signature",
           "SourceModel", "SOURCE_MODEL_KEY", "strip_metadata_asserts", "normalise_example", "clone_inputs",
           "dynamic_shapes_of", "InputCheck"]

logger = logging.getLogger(__name__)

ExampleInputs = Union[tuple, list, dict, None]


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


@dataclass(frozen=True)
class Signature:
    """The call signature the graph was captured with."""

    names: tuple[str, ...]  # every placeholder, in order
    constants: tuple[tuple[str, Any], ...]  # non-tensor inputs and their captured values
    # Tensor inputs a transformers model fills itself when they are None, and the value it uses then:
    # (name, "ones" | "zeros", dtype), shaped like input_ids.
    defaults: tuple[tuple[str, str, torch.dtype], ...] = ()
    # A floating base parameter and the dtype / device type it had at capture: the graph is specialised to them.
    probe: Optional[tuple[str, torch.dtype, str]] = None

    def describe(self) -> str:
        consts = dict(self.constants)
        optional = {n for n, _, _ in self.defaults}
        return ", ".join(f"{n}={consts[n]!r}" if n in consts else f"{n}=<model default>" if n in optional else n
                         for n in self.names)


class InputCheck:
    """Forward pre-hook: fills captured constants that were left out and names the expected keywords."""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.signature
        if sig.probe is not None:
            name, dtype, device = sig.probe
            p = _lookup(module, name)
            if p.dtype != dtype or p.device.type != device:
                raise TypeError(
                    f"this graph was captured with {dtype} weights on {device} and now holds {p.dtype} on "
                    f"{p.device.type} ({name}); a torch.export graph is specialised to both. Move or cast the "
                    f"model first, then call vera_fx.transform / vera_fx.capture on it")
        given = set(sig.names[: len(args)]) | set(kwargs)
        missing = [n for n in sig.names if n not in given]
        unexpected = [k for k in kwargs if k not in sig.names] + (
            [f"<{len(args) - len(sig.names)} extra positional>"] if len(args) > len(sig.names) else [])
        consts = dict(sig.constants)
        fill = [n for n in missing if n in consts]
        ids = kwargs.get("input_ids", args[sig.names.index("input_ids")] if "input_ids" in sig.names[:len(args)]
                         else None)
        made = {}
        if isinstance(ids, torch.Tensor):
            for name, kind, dtype in sig.defaults:
                if name in missing:
                    made[name] = (torch.ones_like if kind == "ones" else torch.zeros_like)(ids, dtype=dtype)
        missing = [n for n in missing if n not in consts and n not in made]
        if missing or unexpected:
            raise TypeError(
                f"this graph was captured for the inputs ({sig.describe()}); missing: {missing or 'none'}, "
                f"unexpected: {unexpected or 'none'}. Call it with those keywords, or capture again with "
                f"example_inputs holding the keywords you want to pass")
        if fill or made:
            kwargs = {**kwargs, **{n: consts[n] for n in fill}, **made}
        return args, kwargs


def _restore_input_names(gm: GraphModule, names: list[str]) -> None:
    """Give the graph's inputs the model's own argument names: torch.export lower-cases them (``forward(self,
    X)`` becomes an input ``x``), and callers pass the model's names. Placeholders come in call order."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(names):
        return
    for node, name in zip(nodes, names):
        if node.target != name and node.target == name.lower():
            node.target = name


# Inputs transformers models fill themselves when None: all-ones attention, segment 0.
_MODEL_DEFAULTS = {"attention_mask": "ones", "token_type_ids": "zeros"}


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor at a dotted name, whatever wraps it (FSDP swaps plain tensors in for parameters)."""
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _model_filled_inputs(model: nn.Module, placeholders: tuple[str, ...], args: tuple,
                         kwargs: dict) -> tuple[tuple[str, str, torch.dtype], ...]:
    """The captured inputs that may be left out because the model itself would fill them the same way."""
    if not _is_pretrained(model) or "input_ids" not in placeholders:
        return ()
    params = inspect.signature(model.forward).parameters
    values = dict(zip(_positional_names(model, len(args)), args)) | kwargs
    out = []
    for name, kind in _MODEL_DEFAULTS.items():
        value = values.get(name)
        if name in placeholders and name in params and params[name].default is None \
                and isinstance(value, torch.Tensor) and value.shape == values["input_ids"].shape:
            out.append((name, kind, value.dtype))
    return tuple(out)


def _specialised(gm: GraphModule) -> bool:
    """Whether the graph tree hard-codes a floating dtype or a device (export bakes in casts, dtype assertions
    and factory devices, as transformers' norms and masks have)."""
    for node in (n for g in graph_modules(gm) for n in g.graph.nodes):
        for a in (*node.args, *node.kwargs.values()):
            if isinstance(a, torch.device) or (isinstance(a, torch.dtype) and a.is_floating_point):
                return True
    return False


def _probe(gm: GraphModule) -> Optional[tuple[str, torch.dtype, str]]:
    """For a graph specialised to a dtype / device: its first floating parameter, dtype and device type."""
    if not _specialised(gm):
        return None
    for name, p in gm.named_parameters():
        if p.is_floating_point():
            return name, p.dtype, p.device.type
    return None


def _install_input_check(gm: GraphModule) -> None:
    """Register the keyword check for the signature recorded in ``gm.meta``."""
    gm.register_forward_pre_hook(InputCheck(gm.meta["vera_fx_signature"]), with_kwargs=True)


def _is_pretrained(model: nn.Module) -> bool:
    """A transformers PreTrainedModel? Never imports transformers (seconds): such a model means it is loaded."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def default_example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A small input for a transformers model, built from its config and main input name.

    Adds ``labels`` for language-modelling and classification heads (so the graph returns a loss) and
    ``use_cache=False`` for decoders.
    """
    if not _is_pretrained(model):
        raise ValueError(f"example_inputs=None needs a transformers PreTrainedModel, got {type(model).__name__}: "
                         "pass example_inputs as a tuple of positional arguments or a dict of keyword arguments")
    cfg = model.config
    params = _forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cls = type(model).__name__
    kw: dict[str, Any] = {}
    if main == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ValueError(f"cannot build an example for {cls}: config.vocab_size is missing; pass example_inputs")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
        kw["input_ids"] = ids
        if "attention_mask" in params:
            kw["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in params and int(getattr(cfg, "type_vocab_size", 0) or 0) > 0:
            kw["token_type_ids"] = torch.zeros_like(ids)  # tokenizers of such models return it
        if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kw["decoder_input_ids"] = ids.clone()
        if "labels" in params:
            if cls.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")):
                kw["labels"] = ids.clone()
            elif cls.endswith("ForSequenceClassification") and getattr(cfg, "problem_type", None) in (
                    None, "single_label_classification") and int(getattr(cfg, "num_labels", 2)) > 1:
                kw["labels"] = torch.arange(batch, device=device) % int(cfg.num_labels)
    elif main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = int(getattr(cfg, "num_channels", 3))
        gen = torch.Generator().manual_seed(0)
        kw["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen).to(device)
        if "labels" in params and cls.endswith("ForImageClassification") and int(getattr(cfg, "num_labels", 2)) > 1:
            kw["labels"] = torch.arange(batch, device=device) % int(cfg.num_labels)
    else:
        raise ValueError(f"cannot build an example for {cls} with main input {main!r}: pass example_inputs")
    if "use_cache" in params and (getattr(cfg, "is_decoder", False) or hasattr(cfg, "use_cache")):
        kw["use_cache"] = False
    return kw


def clone_inputs(obj: Any) -> Any:
    """Clone every tensor so that no two inputs alias (export would wire both uses to one placeholder)."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def dynamic_shapes_of(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {i: Dim.AUTO for i in range(v.dim())} if v.dim() else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


@contextmanager
def _explicit_keywords(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """While exporting, give ``model.forward`` a signature that names the keywords it takes through
    ``**kwargs`` (``output_hidden_states``, the Trainer's ``num_items_in_batch``): torch.export's dynamic-shape
    check mis-orders such keywords. An instance attribute, removed on exit; nothing else changes."""
    params = inspect.signature(model.forward).parameters
    extra = [k for k in kwargs if k not in params]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        yield
        return
    named = [p for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    sig = inspect.Signature(named + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra])
    original = model.forward
    own = model.__dict__.get("forward")

    def forward(*args: Any, **kw: Any) -> Any:
        return original(*args, **kw)

    forward.__signature__ = sig  # type: ignore[attr-defined]
    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        if own is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = own


def normalise_example(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        kwargs = default_example_inputs(model)
        return (), kwargs
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
        if _is_pretrained(model) and "use_cache" in _forward_params(model) and "use_cache" not in kwargs \
                and getattr(model.config, "use_cache", False):
            kwargs["use_cache"] = False  # a KV cache object cannot leave an exported graph
        return (), kwargs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                    f"got {type(example_inputs).__name__}")


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
    ``False`` captures one flat graph. When export cannot capture the code around the layers (a data-dependent
    head or loss), ``None`` and ``True`` keep the layers as blocks under the model's own top level, run
    eagerly (vera_fx/fallback.py; logged once).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if blocks not in (None, True, False):
        raise TypeError(f"blocks must be None, True or False, got {blocks!r}")
    args, kwargs = normalise_example(model, example_inputs)
    args, kwargs = clone_inputs(args), clone_inputs(kwargs)
    _warn_unit_dims(args, kwargs)
    qlayers = quantized.quantized_layers(model)  # bitsandbytes linears stay opaque (ImportError without bnb)
    dyn_args, dyn_kwargs = dynamic_shapes_of(args, kwargs)
    dynamic_shapes: Any = dyn_kwargs if not args else (dyn_args if not kwargs else None)
    if args and kwargs:
        dynamic_shapes = {**{n: s for n, s in zip(_positional_names(model, len(args)), dyn_args)}, **dyn_kwargs}
    layer_paths = [p for paths in _blocks.find_layer_lists(model).values() for p in paths] \
        if (blocks is True or (blocks is None and _is_pretrained(model))) else []
    names_in_order = list(_positional_names(model, len(args))) + list(kwargs)
    try:
        with model_flags_kept(model), warnings.catch_warnings(), quantized.stand_ins(model, qlayers), \
                _explicit_keywords(model, kwargs), linear_forwards(model):
            model.train()
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            gm = _export_tree(model, args, kwargs, dynamic_shapes, layer_paths, qlayers, blocks, names_in_order)
    except Exception as e:  # export raises many types; name the model and keep the cause
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    # the block paths stripped the metadata asserts of every graph before binding (export_groups)
    n_flags = rewrite_mode_flags(gm) + sum(g.meta.pop("vera_fx_flags", 0) for g in graph_modules(gm)[1:])
    _check_no_set_grad_regions(gm)
    _own_frozen_parameters(gm)
    flat_inputs = list(args) + [kwargs[k] for k in kwargs]
    _restore_input_names(gm, names_in_order)
    gm.graph.lint()
    gm.recompile()  # blocks were compiled when bound (their template was final)
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    constants = tuple((n, v) for n, v in zip(names_in_order, flat_inputs)
                      if not isinstance(v, torch.Tensor) and n in placeholders)
    signature = Signature(names=placeholders, constants=constants,
                          defaults=_model_filled_inputs(model, placeholders, args, kwargs),
                          probe=_probe(gm))
    gm.meta["vera_fx_signature"] = signature
    gm.meta["vera_fx_model"] = _model_info(model)
    gm.meta[SOURCE_MODEL_KEY] = SourceModel(model)
    _install_input_check(gm)
    register_deepcopy_hook(gm, _install_input_check)  # copy.deepcopy(gm) keeps the keyword check
    gm.train(model.training)
    n_blocks = len(graph_modules(gm)) - 1
    logger.info("captured %s: %d nodes in the top graph, %d blocks, %d mode-dependent dropout nodes",
                type(model).__name__, len(gm.graph.nodes), n_blocks, n_flags)
    return gm


def _warn_unit_dims(args: tuple, kwargs: dict) -> None:
    for path, t in list(enumerate(args)) + list(kwargs.items()):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and 1 in t.shape[:2]:
            logger.warning("example input %r has shape %s: a dimension of size 1 is fixed by torch.export; "
                           "use an example of batch >= 2 and length >= 2 to keep it dynamic", path, tuple(t.shape))


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _export_tree(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, layer_paths: list[str],
                 qlayers: dict[str, nn.Module], blocks: Optional[bool], names: list[str]) -> GraphModule:
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

    if layer_paths:
        try:
            return _capture_blocks(model, args, kwargs, dynamic_shapes, layer_paths, qlayers)
        except Exception as e:  # the layers cannot be blocks: one graph, as before
            if blocks is True:  # the layers cannot be blocks: refused; the top level cannot be exported: eager
                if isinstance(e, _blocks.BlockCaptureError):
                    raise
                return eager_or_raise(e, layer_paths)
            logger.info("capture: layers of %s kept in one graph (%s)", type(model).__name__, _first_line(e))
    try:
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        ep = ep.run_decompositions({})
    except Exception as e:  # a plain module's layer list too, unless blocks=False
        paths = layer_paths or [p for ps in _blocks.find_layer_lists(model).values() for p in ps if blocks is None]
        return eager_or_raise(e, paths)
    exported = ep.module()
    gm = GraphModule(exported, exported.graph)
    strip_metadata_asserts(gm)
    quantized.restore_quantized(gm, qlayers)
    return gm


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
    exported = ep.module()
    gm = GraphModule(exported, exported.graph)
    _blocks.inline_wrappers(gm)
    if _blocks.remaining_wrappers(gm):
        ep = ep.run_decompositions({})
        exported = ep.module()
        gm = GraphModule(exported, exported.graph)
    strip_metadata_asserts(gm)
    return assemble(model, gm, graphs, plan, qlayers)


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


def _positional_names(model: nn.Module, n: int) -> tuple[str, ...]:
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < n:
        names += [f"arg{i}" for i in range(len(names), n)]
    return tuple(names[:n])

