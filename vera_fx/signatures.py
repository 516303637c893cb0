"""Call signatures of the model object: a call as keywords, its cache key, and the example a new one is captured from.

``VeraFxModel`` keeps one graph per call signature, like torch.compile's guards. ``normalise_call`` turns a
call into the keywords the model's ``forward`` takes (a ``None`` the model treats as absent dropped, masks the
model would fill filled, ``use_cache`` off); ``call_key`` is the signature: each keyword's tensor dtype, rank and
device type or constant value, the autocast state and the weights' dtype and device. ``capture_example`` and
``swapped_in`` prepare the capture of a signature seen for the first time.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import ExampleInputs, normalise_example
from .keywords import check_keywords, check_mask

CallKey = tuple


def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``model.forward`` by name (empty for a forward without a signature)."""
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}


def _positional(params: dict[str, inspect.Parameter]) -> list[str]:
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _as_keywords(params: dict[str, inspect.Parameter], model_name: str, args: tuple, kwargs: dict) -> dict:
    positional = _positional(params)
    if len(args) > len(positional):
        raise TypeError(f"{model_name}.forward takes {len(positional)} positional arguments ({positional}); "
                        f"{len(args)} were given")
    call = dict(zip(positional, args))
    check_keywords(params, [k for k in kwargs if k != "adapter_names"], model_name)
    for k, v in kwargs.items():
        if k in call:
            raise TypeError(f"forward got multiple values for argument {k!r}")
        call[k] = v
    return call


def normalise_call(params: dict[str, inspect.Parameter], model_name: str, signature: Any, args: tuple,
                   kwargs: dict) -> tuple[dict[str, Any], bool]:
    """The call as the keywords of one graph, and whether it asked for ``use_cache=True`` (which runs without a
    KV cache). ``signature``: the source graph's recorded input signature (its ``defaults`` are the masks the
    model fills when they are left out: filled here, so one graph serves both)."""
    out = {}
    for k, v in _as_keywords(params, model_name, args, kwargs).items():
        p = params.get(k)
        if v is None and (p is None or p.default is None or p.kind is p.VAR_KEYWORD):
            continue  # the model treats None as absent
        out[k] = v
    asked_cache = False
    if "use_cache" in params and out.get("use_cache") is not False:
        asked_cache = out.get("use_cache") is True
        out["use_cache"] = False
    n_items = out.get("num_items_in_batch")
    if isinstance(n_items, int) and not isinstance(n_items, bool):
        out["num_items_in_batch"] = torch.tensor(n_items)  # a tensor, so one graph serves every value
    ids = out.get("input_ids")
    if signature is not None and isinstance(ids, torch.Tensor):
        for name, kind, dtype in signature.defaults:  # filled as the model fills them: one graph for both
            if name not in out and name in params:
                out[name] = (torch.ones_like if kind == "ones" else torch.zeros_like)(ids, dtype=dtype)
    check_mask(out)
    return out, asked_cache


def _autocast_state() -> tuple:
    state = []
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            state.append((device, torch.get_autocast_dtype(device)))
    return tuple(state)


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
    return tuple(_value_key(k, call[k]) for k in sorted(call)), _autocast_state(), weights_state


def _expand_unit_dims(v: Any) -> Any:
    """A capture example without dimensions of size 1 (export would fix them): the batch dim, and the
    sequence dim of (batch, seq) / (batch, seq, hidden) tensors, are repeated to size 2."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    reps = [1] * v.dim()
    if v.shape[0] == 1:
        reps[0] = 2
    if v.dim() in (2, 3) and v.shape[1] == 1:
        reps[1] = 2
    return v.repeat(*reps) if any(r > 1 for r in reps) else v.clone()


def capture_example(call: dict[str, Any]) -> dict[str, Any]:
    """The example a call's new graph is captured from: the call with its unit dimensions widened."""
    return {k: _expand_unit_dims(v) for k, v in call.items()}


def example_call(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, Any]:
    """``transform``'s example as the keyword call the object normalises it to."""
    args, kwargs = normalise_example(model, example_inputs)
    return {**dict(zip(_positional(forward_parameters(model)), args)), **kwargs}


def _replacements(model: nn.Module, source: GraphModule) -> dict[int, torch.Tensor]:
    """id of each tensor of ``model`` -> the source graph's tensor of the same name, where those differ."""
    theirs = dict(source.named_parameters(remove_duplicate=False))
    theirs.update(source.named_buffers(remove_duplicate=False))
    by_id: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        new: Optional[torch.Tensor] = theirs.get(name)
        if new is None or new is t or type(new) is not type(t) or new.shape != t.shape:
            continue
        if new.dtype == t.dtype and new.device == t.device and new.data_ptr() == t.data_ptr():
            continue
        by_id[id(t)] = new
    return by_id


@contextmanager
def swapped_in(model: nn.Module, source: GraphModule) -> Iterator[None]:
    """Temporarily give ``model`` the source graph's tensors where they differ from its own (after ``.to()``
    on the object, or a merge), so a new capture sees what the object computes with. Restored on exit."""
    by_id = _replacements(model, source)
    undo: list[tuple[dict, str, Any]] = []
    try:
        if by_id:
            for mod in model.modules():
                for store in (mod._parameters, mod._buffers):
                    for leaf, t in list(store.items()):
                        if t is not None and id(t) in by_id:
                            undo.append((store, leaf, t))
                            store[leaf] = by_id[id(t)]
        yield
    finally:
        for store, leaf, t in reversed(undo):
            store[leaf] = t
