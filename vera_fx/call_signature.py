"""A captured graph's call signature: the keywords, constants, model-filled inputs and the dtype / device it
was specialised to, and the forward pre-hook (``InputCheck``) that fills left-out constants and names the
expected keywords."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .example_inputs import is_pretrained, positional_names
from .sites import graph_modules

__all__ = ["Signature", "InputCheck", "restore_input_names", "model_filled_inputs", "probe", "install_input_check"]


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
