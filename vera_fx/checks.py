"""Checks that run before any work, each raising ValueError / TypeError naming the field, the value and the fix:
a call's keywords and mask, r against the targeted layers and memory, a folder against its adapter."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .config import AdapterConfig
from .methods import method_for
from .sites import Site

# Keywords transformers takes out of **kwargs before the model sees them (return_dict, deprecated cache names)
_DECORATOR_KEYWORDS = frozenset({"return_dict", "past_key_values", "cache_params"})


def _typed_kwargs(param: inspect.Parameter) -> Optional[frozenset[str]]:
    """The keys of the TypedDict a ``**kwargs: Unpack[...]`` parameter names, or None when untyped."""
    ann = param.annotation
    if ann is inspect.Parameter.empty or (isinstance(ann, str) and "TransformersKwargs" not in ann):
        return None
    if isinstance(ann, str):  # postponed annotations: transformers' documented keywords (every 5.x has them)
        from transformers.utils import TransformersKwargs
        ann = TransformersKwargs
    args = typing.get_args(ann)
    typed = args[0] if args else ann
    keys = getattr(typed, "__annotations__", None)
    return frozenset(keys) if isinstance(keys, dict) and typing.is_typeddict(typed) else None


def check_keywords(params: Mapping[str, inspect.Parameter], keywords: Iterable[str], model_name: str) -> None:
    """TypeError naming each keyword a forward with ``params`` does not take, with the close names and the fix."""
    known = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    var = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
    if var:
        typed = _typed_kwargs(var[0])
        if typed is None:  # an untyped **kwargs takes any keyword
            return
        known |= typed | _DECORATOR_KEYWORDS
    unknown = [k for k in keywords if k not in known]
    if not unknown:
        return
    close = {k: difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.6) for k in unknown}
    hints = [f"{k!r} (close names: {', '.join(c)})" if c else repr(k) for k, c in close.items()]
    raise TypeError(f"{model_name}.forward got unexpected keyword arguments {', '.join(hints)}: neither its "
                    "signature nor transformers' documented keyword arguments (TransformersKwargs) name them. "
                    "Fix the spelling, or leave them out")


def check_mask(call: Mapping[str, Any]) -> None:
    """ValueError when ``attention_mask`` does not have ``input_ids``' shape (not a raw broadcast error)."""
    ids, mask = call.get("input_ids"), call.get("attention_mask")
    if (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dim() == mask.dim() == 2
            and tuple(mask.shape) != tuple(ids.shape)):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}: "
                         "give one mask value per token (attention_mask of input_ids' shape, 1 for tokens to "
                         "attend to, 0 for padding)")


def describe_key(key: tuple) -> str:
    """A call signature in words: ``(input_ids: int64[2d], use_cache=False); autocast off; weights float32 on cpu``."""
    inputs, autocast, weights = key
    parts = [f"{item[0]}: {str(item[2]).replace('torch.', '')}[{item[3]}d]" if item[1] == "tensor"
             else f"{item[0]}={item[2]!r}" for item in inputs]
    amp = ", ".join(f"{d}/{str(t).replace('torch.', '')}" for d, t in autocast) or "off"
    w = f"{str(weights[0]).replace('torch.', '')} on {weights[1]}"
    return f"({', '.join(parts)}); autocast {amp}; weights {w}"


# r above this many times the widest targeted layer is refused: the update's rank is at most min(in, out), so
# such an r only costs memory (VeRA uses r of 256 to 1024 on layers of 768 to 8192 features).
RANK_FACTOR = 64


def _fmt_bytes(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('KB', 'MB', 'GB', 'TB')[unit - 1]}" if unit else f"{int(n)} B"


def check_rank(config: AdapterConfig, sites: Sequence[Site], device: Optional[torch.device] = None) -> None:
    """ValueError when ``config.r`` is more than ``RANK_FACTOR`` x the targeted layers' widest dimension, or the
    adapter would take more than half of the device's memory (a GPU's, else the machine's)."""
    if not sites:
        return
    widest = max(max(s.in_features, s.out_features) for s in sites)
    rank_cap = min(min(s.in_features, s.out_features) for s in sites)
    rows = method_for(config).latent_rows(config)  # the float32 bytes of the shared A and B and every site's lambdas:
    in_max, out_max = max(s.in_features for s in sites), max(s.out_features for s in sites)
    need = 4 * (rows * in_max + out_max * config.r + sum(rows + s.out_features for s in sites))
    if config.r > RANK_FACTOR * widest:
        raise ValueError(f"r={config.r} is more than the targeted layers can use: their update's rank is at most "
                         f"{rank_cap} and the widest has {widest} features, and the adapter would take "
                         f"{_fmt_bytes(need)} ({need} bytes). Choose r <= {RANK_FACTOR * widest} (VeRA usually "
                         "uses r=256 to 1024)")
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        total: Optional[int] = int(torch.cuda.get_device_properties(device).total_memory)
    else:  # the machine's memory (POSIX; unknown elsewhere)
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if total is not None and need > total // 2:
        raise ValueError(f"r={config.r} needs {_fmt_bytes(need)} ({need} bytes) for the projections and lambdas "
                         f"of {len(sites)} targeted layers, more than half of the {_fmt_bytes(total)} this device "
                         "has. Choose a smaller r or target fewer layers")


def check_file_shapes(config: AdapterConfig, tensors: dict[str, Any], source: str) -> None:
    """ValueError when a file's lambdas or projections do not have the sizes its config's ``r`` gives."""
    method = method_for(config)
    rows, prefix = method.latent_rows(config), method.prefix
    want = {f"{prefix}_lambda_d": lambda s: s == (rows,), f"{prefix}_A": lambda s: len(s) == 2 and s[0] == rows,
            f"{prefix}_B": lambda s: len(s) == 2 and s[1] == config.r}
    for key, value in tensors.items():
        check = want.get(str(key).rpartition(".")[2])
        shape = tuple(getattr(value, "shape", ()))
        if check is not None and not check(shape):
            raise ValueError(f"{source}: {key} has shape {shape}, but the folder's config says r={config.r} "
                             f"({rows} latent rows); the config and the weights come from different adapters. "
                             "Save the adapter again")


def check_same_fields(have: AdapterConfig, config: AdapterConfig, source: str, adapter_name: str,
                      has_projections: bool) -> None:
    """ValueError naming each field of the folder's ``config`` that differs from ``have`` and loading cannot change."""
    fields = ["r", "bias", have._dropout_field, *([] if has_projections else ["projection_prng_key"])]
    names = {f.name for f in dataclasses.fields(have)}
    diff = [f"{f}={getattr(config, f)!r} (the adapter has {getattr(have, f)!r})" for f in fields
            if f in names and getattr(config, f) != getattr(have, f)]
    if diff:
        raise ValueError(f"{source}: its config differs from adapter {adapter_name!r} in {', '.join(diff)}; "
                         "loading weights cannot change those. Load it under a new adapter_name "
                         "(vera_fx.load_adapter(m, folder, adapter_name='other')) or into a fresh model "
                         "(vera_fx.from_pretrained)")
