"""Example inputs for capture: the default example of a transformers model, cloning, the dynamic-shape spec
export gets, and the keyword signature a ``**kwargs`` forward is given while exporting."""

from __future__ import annotations

import inspect
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from torch import nn
from torch.export import Dim

from .compat import pytree

logger = logging.getLogger(__name__)

ExampleInputs = Union[tuple, list, dict, None]


def is_pretrained(model: nn.Module) -> bool:
    """A transformers PreTrainedModel? Never imports transformers (seconds): such a model means it is loaded."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def positional_names(model: nn.Module, n: int) -> tuple[str, ...]:
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < n:
        names += [f"arg{i}" for i in range(len(names), n)]
    return tuple(names[:n])



def default_example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A small input for a transformers model, built from its config and main input name.

    Adds ``labels`` for language-modelling and classification heads (so the graph returns a loss) and
    ``use_cache=False`` for decoders.
    """
    if not is_pretrained(model):
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


def dynamic_shapes_of(args: tuple, kwargs: dict, batch_only: bool = False) -> tuple[tuple, dict]:
    """export's dynamic-shape spec: ``Dim.AUTO`` on every dimension of every tensor, or with ``batch_only`` on
    the first one alone (the other sizes static)."""
    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ({0: Dim.AUTO} if batch_only else {i: Dim.AUTO for i in range(v.dim())}) if v.dim() else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def export_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, batch_only: bool = False) -> Any:
    """``dynamic_shapes`` for ``torch.export.export(model, args, kwargs)`` (``dynamic_shapes_of``), keyed by the
    forward's argument names when both positional and keyword inputs are given."""
    dyn_args, dyn_kwargs = dynamic_shapes_of(args, kwargs, batch_only)
    if args and kwargs:
        return {**dict(zip(positional_names(model, len(args)), dyn_args)), **dyn_kwargs}
    return dyn_kwargs if not args else dyn_args


@contextmanager
def explicit_keywords(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
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
        if is_pretrained(model) and "use_cache" in _forward_params(model) and "use_cache" not in kwargs \
                and getattr(model.config, "use_cache", False):
            kwargs["use_cache"] = False  # a KV cache object cannot leave an exported graph
        return (), kwargs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                    f"got {type(example_inputs).__name__}")


def warn_unit_dims(args: tuple, kwargs: dict) -> None:
    for path, t in list(enumerate(args)) + list(kwargs.items()):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and 1 in t.shape[:2]:
            logger.warning("example input %r has shape %s: a dimension of size 1 is fixed by torch.export; "
                           "use an example of batch >= 2 and length >= 2 to keep it dynamic", path, tuple(t.shape))
