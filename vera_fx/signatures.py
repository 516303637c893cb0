"""Example inputs for capture, a captured graph's ``Signature`` and input check, and the model object's key per
call signature."""

from __future__ import annotations

import inspect
import logging
import operator
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Optional, Union

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from .compat import pytree
from .checks import check_keywords, check_mask
from .sites import graph_modules

logger = logging.getLogger(__name__)

ExampleInputs = Union[tuple, list, dict, None]
CallKey = tuple


def is_pretrained(model: nn.Module) -> bool:
    """A transformers PreTrainedModel? (never imports transformers: such a model means it is loaded)"""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``model.forward`` by name."""
    return dict(inspect.signature(model.forward).parameters)


def positional(params: dict[str, inspect.Parameter]) -> list[str]:
    """The names of the parameters that may be passed by position."""
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def positional_names(model: nn.Module, n: int) -> tuple[str, ...]:
    """``n`` positional argument names of ``model.forward`` (``arg<i>`` past its parameters)."""
    names = positional(forward_parameters(model))
    return tuple(names[:n] + [f"arg{i}" for i in range(len(names), n)])


def default_example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A small input for a transformers model from its config (``labels`` for LM and classification heads)."""
    if not is_pretrained(model):
        raise ValueError(f"example_inputs=None needs a transformers PreTrainedModel, got {type(model).__name__}: "
                         "pass example_inputs as a tuple of positional arguments or a dict of keyword arguments")
    cfg, params, cls = model.config, forward_parameters(model), type(model).__name__
    main = getattr(model, "main_input_name", "input_ids")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    n_labels = int(getattr(cfg, "num_labels", 2))
    kw: dict[str, Any] = {}
    if main == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ValueError(f"cannot build an example for {cls}: config.vocab_size is missing; pass example_inputs")
        kw["input_ids"] = ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
        if "attention_mask" in params:
            kw["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in params and int(getattr(cfg, "type_vocab_size", 0) or 0) > 0:
            kw["token_type_ids"] = torch.zeros_like(ids)  # tokenizers of such models return it
        if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kw["decoder_input_ids"] = ids.clone()
        if "labels" in params and cls.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM",
                                                 "ForConditionalGeneration")):
            kw["labels"] = ids.clone()
    elif main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = int(getattr(cfg, "num_channels", 3))
        kw["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen).to(device)
    else:
        raise ValueError(f"cannot build an example for {cls} with main input {main!r}: pass example_inputs")
    if "labels" in params and cls.endswith(("ForSequenceClassification", "ForImageClassification")) and getattr(
            cfg, "problem_type", None) in (None, "single_label_classification") and n_labels > 1:
        kw["labels"] = torch.arange(batch, device=device) % n_labels
    return kw


def clone_inputs(obj: Any) -> Any:
    """Clone every tensor so that no two inputs alias (export would wire both uses to one placeholder)."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def dynamic_shapes_of(args: tuple, kwargs: dict, batch_only: bool = False) -> tuple[tuple, dict]:
    """``Dim.AUTO`` on every dimension of every tensor (with ``batch_only`` on the first one alone)."""
    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ({0: Dim.AUTO} if batch_only else {i: Dim.AUTO for i in range(v.dim())}) if v.dim() else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        return {k: spec(x) for k, x in v.items()} if isinstance(v, dict) else None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


@contextmanager
def explicit_keywords(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """Meanwhile, ``model.forward`` names its ``**kwargs`` keywords (export's dynamic-shape check mis-orders them)."""
    params = inspect.signature(model.forward).parameters
    extra = [k for k in kwargs if k not in params]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        yield
        return
    named = [p for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    original, own = model.forward, model.__dict__.get("forward")

    def forward(*args: Any, **kw: Any) -> Any:
        return original(*args, **kw)

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        named + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra])
    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        if own is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = own


def normalise_example(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """``example_inputs`` as (args, kwargs), never both; a keyword example gets ``use_cache=False`` where the forward
    takes it, as every call of the object does (a KV cache cannot leave an exported graph)."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if example_inputs is not None and not isinstance(example_inputs, dict):
        raise TypeError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                        f"got {type(example_inputs).__name__}")
    kwargs = default_example_inputs(model) if example_inputs is None else dict(example_inputs)
    if "use_cache" in forward_parameters(model):
        kwargs.setdefault("use_cache", False)
    return (), kwargs


def warn_unit_dims(args: tuple, kwargs: dict) -> None:
    """Warn for an example dimension of size 1 among the first two (export fixes it)."""
    for path, t in [*enumerate(args), *kwargs.items()]:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and 1 in t.shape[:2]:
            logger.warning("example input %r has shape %s: a dimension of size 1 is fixed by torch.export; "
                           "use an example of batch >= 2 and length >= 2 to keep it dynamic", path, tuple(t.shape))


# --------------------------------------------------------------------------------------------- call signatures

def normalise_call(params: dict[str, inspect.Parameter], model_name: str, signature: Any, args: tuple,
                   kwargs: dict, checked: set) -> tuple[dict[str, Any], bool]:
    """The call as one graph's keywords (``signature.defaults`` filled, so one graph serves both), and whether it
    asked for ``use_cache=True``; ``checked``: the keyword sets already accepted."""
    names = positional(params)
    if len(args) > len(names):
        raise TypeError(f"{model_name}.forward takes {len(names)} positional arguments ({names}); "
                        f"{len(args)} were given")
    call = dict(zip(names, args))
    if tuple(kwargs) not in checked:
        check_keywords(params, kwargs, model_name)
        checked.add(tuple(kwargs))
    twice = [k for k in kwargs if k in call]
    if twice:
        raise TypeError(f"forward got multiple values for argument {twice[0]!r}")
    out = {}
    for k, v in {**call, **kwargs}.items():
        p = params.get(k)
        if v is not None or (p is not None and p.default is not None and p.kind is not p.VAR_KEYWORD):
            out[k] = v  # a None the model treats as absent is left out
    asked_cache = False
    if "use_cache" in params and out.get("use_cache") is not False:
        asked_cache = out.get("use_cache") is True
        out["use_cache"] = False
    n_items = out.get("num_items_in_batch")
    if isinstance(n_items, int) and not isinstance(n_items, bool):
        out["num_items_in_batch"] = torch.tensor(n_items)  # a tensor, so one graph serves every value
    if signature is not None:  # filled as the model fills them: one graph for both
        out.update(_made_inputs(signature.defaults, out.get("input_ids"), params.keys() - out.keys()))
    check_mask(out)
    return out, asked_cache


def _made_inputs(defaults: tuple, ids: Any, names: Collection[str]) -> dict[str, torch.Tensor]:
    if not isinstance(ids, torch.Tensor):
        return {}
    return {name: (torch.ones_like if kind == "ones" else torch.zeros_like)(ids, dtype=dtype)
            for name, kind, dtype in defaults if name in names}


def _value_key(name: str, v: Any) -> tuple:
    if isinstance(v, torch.Tensor):
        return name, "tensor", v.dtype, v.dim(), v.device.type
    if v is None or isinstance(v, (bool, int, float, str)):
        return name, "constant", v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
        return name, "constant", tuple(v)
    raise TypeError(f"{name}={type(v).__name__} cannot be an input of a captured graph: pass tensors and "
                    "plain constants (bool, int, float, str)" + (
                        "; a KV cache (past_key_values) is not an input of vera_fx graphs: call without it, or "
                        "generate with m.generate(...), which runs a KV-cache decode graph" if "past" in name else ""))


def call_key(call: dict[str, Any], weights_state: tuple) -> CallKey:
    """The signature of a normalised call: (keyword keys, autocast state, the weights' dtype and device)."""
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    return tuple(_value_key(k, call[k]) for k in sorted(call)), autocast, weights_state


def capture_example(call: dict[str, Any]) -> dict[str, Any]:
    """The example a call's new graph is captured from: copies of its tensors with a batch dim, and the sequence
    dim of (batch, seq) / (batch, seq, hidden) tensors, of size 1 repeated to 2 (export fixes a size of 1)."""
    def widened(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        reps = [2 if v.shape[0] == 1 else 1] + [1] * (v.dim() - 1)
        if v.dim() in (2, 3) and v.shape[1] == 1:
            reps[1] = 2
        return v.repeat(*reps)  # a copy even when nothing is repeated

    return {k: widened(v) for k, v in call.items()}


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
    """Forward pre-hook: fills left-out captured constants and names the expected keywords."""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.signature
        if sig.probe is not None:
            name, dtype, device = sig.probe
            p = operator.attrgetter(name)(module)  # whatever wraps it (FSDP swaps plain tensors in)
            if p.dtype != dtype or p.device.type != device:
                raise TypeError(
                    f"this graph was captured with {dtype} weights on {device} and now holds {p.dtype} on "
                    f"{p.device.type} ({name}); a torch.export graph is specialised to both. Move or cast the "
                    f"model first, then call vera_fx.transform / vera_fx.capture on it")
        given = set(sig.names[: len(args)]) | set(kwargs)
        missing = [n for n in sig.names if n not in given]
        unexpected = [k for k in kwargs if k not in sig.names] + (
            [f"<{len(args) - len(sig.names)} extra positional>"] if len(args) > len(sig.names) else [])
        ids = kwargs.get("input_ids", args[sig.names.index("input_ids")] if "input_ids" in sig.names[:len(args)]
                         else None)
        filled = {n: v for n, v in sig.constants if n in missing} | _made_inputs(sig.defaults, ids, missing)
        missing = [n for n in missing if n not in filled]
        if missing or unexpected:
            raise TypeError(
                f"this graph was captured for the inputs ({sig.describe()}); missing: {missing or 'none'}, "
                f"unexpected: {unexpected or 'none'}. Call it with those keywords, or capture again with "
                f"example_inputs holding the keywords you want to pass")
        return args, {**kwargs, **filled} if filled else kwargs


def restore_input_names(gm: GraphModule, names: list[str]) -> None:
    """The model's own argument names for the graph's inputs (export lower-cases ``forward(self, X)``'s ``X``)."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(names):
        return
    for node, name in zip(nodes, names):
        if node.target != name and node.target == name.lower():
            node.target = name


# Inputs transformers models fill themselves when None: all-ones attention, segment 0.
_MODEL_DEFAULTS = {"attention_mask": "ones", "token_type_ids": "zeros"}


def model_filled_inputs(model: nn.Module, placeholders: tuple[str, ...], args: tuple,
                        kwargs: dict) -> tuple[tuple[str, str, torch.dtype], ...]:
    """The captured inputs the model would fill the same way when left out."""
    if not is_pretrained(model) or "input_ids" not in placeholders:
        return ()
    params = forward_parameters(model)
    values = dict(zip(positional_names(model, len(args)), args)) | kwargs
    return tuple((name, kind, values[name].dtype) for name, kind in _MODEL_DEFAULTS.items()
                 if name in placeholders and name in params and params[name].default is None
                 and isinstance(values.get(name), torch.Tensor) and values[name].shape == values["input_ids"].shape)


def probe(gm: GraphModule) -> Optional[tuple[str, torch.dtype, str]]:
    """(name, dtype, device type) of the first floating parameter of a graph tree that hard-codes a floating dtype
    or a device (export bakes in casts and factory devices); else None."""
    if not any(isinstance(a, torch.device) or (isinstance(a, torch.dtype) and a.is_floating_point)
               for g in graph_modules(gm) for n in g.graph.nodes for a in (*n.args, *n.kwargs.values())):
        return None
    return next(((name, p.dtype, p.device.type) for name, p in gm.named_parameters() if p.is_floating_point()), None)


def install_input_check(gm: GraphModule) -> None:
    """Register the keyword check for the signature recorded in ``gm.meta``."""
    gm.register_forward_pre_hook(InputCheck(gm.meta["vera_fx_signature"]), with_kwargs=True)


def remove_input_check(gm: GraphModule) -> None:
    """Take ``gm``'s keyword check off (a copy whose caller fills the inputs itself)."""
    for key in [k for k, hook in gm._forward_pre_hooks.items() if isinstance(hook, InputCheck)]:
        del gm._forward_pre_hooks[key]
