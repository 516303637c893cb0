"""Call signatures: of a captured graph (what it was specialised to, and the input check that names the
expected keywords) and of the model object (a call as keywords, its cache key, and the example a new one is
captured from).

A captured graph records its ``Signature`` (keywords, constants, model-filled inputs, dtype / device) and runs
``InputCheck`` as a forward pre-hook: it fills left-out constants and names the expected keywords.
``VeraFxModel`` keeps one graph per call signature, like torch.compile's guards. ``normalise_call`` turns a
call into the keywords the model's ``forward`` takes (a ``None`` the model treats as absent dropped, masks the
model would fill filled, ``use_cache`` off); ``call_key`` is the signature: each keyword's tensor dtype, rank and
device type or constant value, the autocast state and the weights' dtype and device. ``capture_example`` and
``swapped_in`` prepare the capture of a signature seen for the first time.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .example_inputs import ExampleInputs, is_pretrained, normalise_example, positional_names
from .keywords import check_keywords, check_mask
from .sites import graph_modules

CallKey = tuple


def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``model.forward`` by name (empty for a forward without a signature)."""
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}


def _positional(params: dict[str, inspect.Parameter]) -> list[str]:
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _as_keywords(params: dict[str, inspect.Parameter], model_name: str, args: tuple, kwargs: dict,
                 checked: Optional[set] = None) -> dict:
    positional = _positional(params)
    if len(args) > len(positional):
        raise TypeError(f"{model_name}.forward takes {len(positional)} positional arguments ({positional}); "
                        f"{len(args)} were given")
    call = dict(zip(positional, args))
    names = tuple(kwargs)
    if checked is None or names not in checked:  # once per keyword set when the caller keeps ``checked``
        check_keywords(params, [k for k in kwargs if k != "adapter_names"], model_name)
        if checked is not None:
            checked.add(names)
    for k, v in kwargs.items():
        if k in call:
            raise TypeError(f"forward got multiple values for argument {k!r}")
        call[k] = v
    return call


def normalise_call(params: dict[str, inspect.Parameter], model_name: str, signature: Any, args: tuple,
                   kwargs: dict, checked: Optional[set] = None) -> tuple[dict[str, Any], bool]:
    """The call as the keywords of one graph, and whether it asked for ``use_cache=True`` (which runs without a
    KV cache). ``signature``: the source graph's recorded input signature (its ``defaults`` are the masks the
    model fills when they are left out: filled here, so one graph serves both). ``checked``: keyword sets
    already accepted (the names are checked once per set)."""
    out = {}
    for k, v in _as_keywords(params, model_name, args, kwargs, checked).items():
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


# --- the captured graph's signature ----------------------------------------------------------------------------

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


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor at a dotted name, whatever wraps it (FSDP swaps plain tensors in for parameters)."""
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def restore_input_names(gm: GraphModule, names: list[str]) -> None:
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


def model_filled_inputs(model: nn.Module, placeholders: tuple[str, ...], args: tuple,
                        kwargs: dict) -> tuple[tuple[str, str, torch.dtype], ...]:
    """The captured inputs that may be left out because the model itself would fill them the same way."""
    if not is_pretrained(model) or "input_ids" not in placeholders:
        return ()
    params = inspect.signature(model.forward).parameters
    values = dict(zip(positional_names(model, len(args)), args)) | kwargs
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


def probe(gm: GraphModule) -> Optional[tuple[str, torch.dtype, str]]:
    """For a graph specialised to a dtype / device: its first floating parameter, dtype and device type."""
    if not _specialised(gm):
        return None
    for name, p in gm.named_parameters():
        if p.is_floating_point():
            return name, p.dtype, p.device.type
    return None


def install_input_check(gm: GraphModule) -> None:
    """Register the keyword check for the signature recorded in ``gm.meta``."""
    gm.register_forward_pre_hook(InputCheck(gm.meta["vera_fx_signature"]), with_kwargs=True)
