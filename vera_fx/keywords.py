"""Checks of a call's keywords before a graph is looked up or captured, and call signatures in words.

A keyword neither ``forward`` nor transformers' documented keywords (the ``TransformersKwargs`` its ``**kwargs``
unpacks) name is refused (each would capture a graph of its own); an untyped ``**kwargs`` takes any. A new
value of a constant keyword (``use_cache=False``) costs a graph, which is said once per keyword.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import typing
from typing import Any, Iterable, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

# Keywords transformers takes out of **kwargs before the model sees them: its decorators' return_dict, and
# the deprecated cache names it renames to ``cache``.
_DECORATOR_KEYWORDS = frozenset({"return_dict", "past_key_values", "cache_params"})


def _typed_kwargs(param: inspect.Parameter) -> Optional[frozenset[str]]:
    """The keys of the TypedDict a ``**kwargs: Unpack[...]`` parameter names, or None when untyped."""
    ann = param.annotation
    if ann is inspect.Parameter.empty or (isinstance(ann, str) and "TransformersKwargs" not in ann):
        return None
    if isinstance(ann, str):  # postponed annotations: transformers' documented keywords by name
        try:
            from transformers.utils import TransformersKwargs
        except ImportError:
            return None
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
    """ValueError when ``attention_mask`` does not have ``input_ids``' (batch, length): the graph would fail
    with a raw broadcast error."""
    ids, mask = call.get("input_ids"), call.get("attention_mask")
    if (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dim() == mask.dim() == 2
            and tuple(mask.shape) != tuple(ids.shape)):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}: "
                         "give one mask value per token (attention_mask of input_ids' shape, 1 for tokens to "
                         "attend to, 0 for padding)")


def say_constant_changes(seen: list[tuple], key: tuple, warned: set[str], graphs: int, max_graphs: int) -> None:
    """Log once per keyword (``warned`` remembers them) that the call ``key`` differs from a signature in ``seen``
    (same names and tensor kinds) only by a constant's value, which needs a graph of its own. Keys as the model
    builds them: ``((name, "tensor" | "constant", ...), ...)``."""
    items = {item[0]: item for item in key}
    names: set[str] = set()
    for theirs in ({item[0]: item for item in other} for other in seen):
        diff = [n for n in items if items[n] != theirs.get(n)] if theirs.keys() == items.keys() else []
        if diff and all(items[n][1] == "constant" and theirs[n][1] == "constant" for n in diff):
            names.update(diff)
    names -= warned
    if names:
        warned.update(names)
        logger.warning("vera_fx: %s changed value, and each value of a constant keyword needs a graph of its own "
                       "(%d of max_graphs=%d slots left after this one); pass one value, or make it a tensor",
                       ", ".join(sorted(names)), max_graphs - graphs - 1, max_graphs)


def describe_key(key: tuple) -> str:
    """A call signature (a graph cache key) in words: ``input_ids: int64[2d], labels: int64[2d],
    use_cache=False; autocast cpu/bfloat16; weights float32 on cpu``."""
    inputs, autocast, weights = key
    parts = [f"{item[0]}: {str(item[2]).replace('torch.', '')}[{item[3]}d]" if item[1] == "tensor"
             else f"{item[0]}={item[2]!r}" for item in inputs]
    amp = ", ".join(f"{d}/{str(t).replace('torch.', '')}" for d, t in autocast) or "off"
    w = f"{str(weights[0]).replace('torch.', '')} on {weights[1]}"
    return f"({', '.join(parts)}); autocast {amp}; weights {w}"
