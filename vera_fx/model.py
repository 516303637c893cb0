"""The object users hold: ``VeraFxModel``, one model-like nn.Module over a cache of captured graphs.

``vera_fx.transform(model, config)`` returns a ``VeraFxModel``. It owns

- the *source graph*: the first captured graph, which holds the adapter state (one ``AdapterState`` per
  adapter in its ``vera_fx_adapters`` container, the trainable biases, the merged weights) and the run-time
  state (active adapters, disabled, merged) in its ``meta``. Every module-level function (``set_adapter``,
  ``merge``, ``save_adapter``, ...) acts on it when given the object. The object's module tree *is* the
  source graph's (the same parameter, buffer and submodule dicts), so ``named_parameters()`` gives the
  graph's names and an optimizer sees each tensor once;
- a small bounded cache of graphs keyed by call signature, like torch.compile's guards: the keyword set
  (``None`` values the model would treat as absent are dropped), each tensor's dtype, rank and device type,
  the constant inputs (``return_dict``, ``output_hidden_states``, ...), the autocast state and the weights'
  dtype and device. A new signature is captured on first use (from the call's own inputs, under the call's
  autocast state), matched, and bound to the source's state by the attach pass
  (vera_fx/passes/attach.py), so all graphs share the same ``nn.Parameter`` objects. A graph whose export
  guard rejects a call (a shape export specialised) gets a sibling captured for that call.

Graphs other than the source are rebuilt from the source (no re-capture) when its adapter structure
changed (``set_adapter``, ``merge``, ``delete_adapter``, ...): that is checked on each call outside
torch.compile. ``use_cache=True`` runs without a KV cache (the graph returns no ``past_key_values``; a
decode graph with a cache is a later stage), said once in the log.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule

from . import blockwise
from . import checkpoint as ckpt
from .adapters import active_adapters, add_adapter
from .compat import IncompatibleKeys
from .capture import CaptureError, ExampleInputs, normalise_example, capture
from .config import AdapterConfig, as_config, config_from_dict
from .methods import CONTAINER, method_for
from .generation import generate
from .keywords import check_keywords, check_mask, describe_key, say_constant_changes
from .passes.attach import attach_adapters, state_fingerprint
from .passes.match import MatchPass
from .serving import mixed_adapter_forward
from .state import state_lock
from .passes.pipeline import run_passes, transform as transform_graph
from .surface import PeftSurface
from .variants import FINGERPRINT_KEY, INFERENCE_FORM, GraphVariants

__all__ = ["VeraFxModel", "transform", "from_pretrained", "count_parameters", "DEFAULT_MAX_GRAPHS",
           "CONFIG_KEY_PREFIX", "STATE_KEY_PREFIX"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRAPHS = 8
# state_dict() keys: "vera_fx.<adapter>.<PEFT key>" for tensors and "vera_fx_config.<adapter>" for the
# adapter's config as UTF-8 JSON bytes (a uint8 tensor), so a Trainer checkpoint describes itself.
STATE_KEY_PREFIX = "vera_fx."
CONFIG_KEY_PREFIX = "vera_fx_config."
_FINGERPRINT = FINGERPRINT_KEY  # gm.meta: the source's state_fingerprint a graph was attached at
_GUARD_ERRORS = ("Guard failed", "guard", "Expected input at")

CallKey = tuple


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT reports them: shared tensors once, buffers not at all, and a
    4-bit bitsandbytes weight as the parameters it packs (two per byte of its storage type)."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            storage = getattr(p, "quant_storage", None)
            n *= 2 * (storage.itemsize if isinstance(storage, torch.dtype) else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}


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


@contextmanager
def _swapped_in(model: nn.Module, source: GraphModule) -> Iterator[None]:
    """Temporarily give ``model`` the source graph's tensors where they differ from its own (after ``.to()``
    on the object, or a merge), so a new capture sees what the object computes with. Restored on exit."""
    theirs = dict(source.named_parameters(remove_duplicate=False))
    theirs.update(source.named_buffers(remove_duplicate=False))
    by_id: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        new = theirs.get(name)
        if new is None or new is t or type(new) is not type(t) or new.shape != t.shape:
            continue
        if new.dtype == t.dtype and new.device == t.device and new.data_ptr() == t.data_ptr():
            continue
        by_id[id(t)] = new
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


class VeraFxModel(PeftSurface, GraphVariants, nn.Module):
    """A model with VeRA / PVeRA adapters, computed by captured torch.fx graphs (see the module docstring).

    Call it as the model (any keyword set the model takes); train, evaluate, ``.to()``, save and inspect it.
    PEFT's model methods (``add_adapter``, ``set_adapter``, ``disable_adapter()``, ``merge_and_unload``, ``unload``,
    ``peft_config``, ...) come from ``PeftSurface`` (vera_fx/surface.py).
    ``graph_module`` is the source graph (adapter state, ``code``); ``graphs`` every cached graph by signature.
    """

    _keys_to_ignore_on_save = None  # read by transformers' Trainer after loading a checkpoint

    def __init__(self, model: nn.Module, source: GraphModule, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 source_key: Optional[CallKey] = None) -> None:
        super().__init__()
        d = self.__dict__
        d["_base_model"] = model  # the user's model: never a submodule, never changed (captures swap in)
        d["_source"] = source
        d["_parameters"], d["_buffers"], d["_modules"] = source._parameters, source._buffers, source._modules
        d["_graphs"] = OrderedDict()  # CallKey -> GraphModules (siblings: an export guard rejected a call), LRU order
        d["_order"] = []  # keys in capture order, for messages
        d["_twins"] = weakref.WeakKeyDictionary()  # graph -> its inference twin (vera_fx/variants.py)
        d["_ready"] = {}  # CallKey -> (state stamp, graph, the graph a call runs): the per-call cache (variants.py)
        d["_keywords_ok"] = set()  # keyword sets check_keywords accepted
        d["_inference_form"] = INFERENCE_FORM
        d["_warned_evict"] = False
        d["_probe_at"] = None  # (parameter dict, name) of the dtype / device probe: read per call
        d["_forward_params"] = _forward_parameters(model)
        d["_warned_cache"] = False
        d["_warned_constants"] = set()  # constant keywords already reported as costing a graph per value
        d["_build_lock"] = threading.RLock()  # captures and re-attaches of this object's graphs, one at a time
        self.max_graphs = max_graphs
        if source_key is not None:
            self._store(source_key, source)

    # --- nn.Module plumbing ----------------------------------------------------------------------------------

    @property
    def training(self) -> bool:  # type: ignore[override]
        src = self.__dict__.get("_source")
        return src.training if src is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, value: bool) -> None:
        self.__dict__["_training"] = value
        src = self.__dict__.get("_source")
        if src is not None:
            src.training = value

    def train(self, mode: bool = True) -> "VeraFxModel":
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        super().train(mode)
        for gm in self._all_graphs():
            if gm is not self._source:
                gm.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "VeraFxModel":
        before = self._weights_state()
        super()._apply(fn, recurse)
        self._drop_variants()
        self.__dict__["_probe_at"] = None
        after = self._weights_state()
        for key in list(self._graphs):
            if key[2] != after:  # specialised to the old dtype / device: dropped, captured again on use
                del self._graphs[key]
                self._order.remove(key)
            else:  # buffers are new objects after _apply: re-attach on next use
                for gm in self._graphs[key]:
                    gm.meta.pop(_FINGERPRINT, None)
        if before != after:
            logger.info("weights are now %s on %s: graphs are captured again on their next call", *after)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base_model")
            if name.startswith("__") or base is None or not hasattr(base, name):
                raise
        value = getattr(base, name)
        if callable(value):  # a method of the eager model would run without the adapters: refuse it
            raise AttributeError(f"{type(self).__name__} has no {name!r}: {type(base).__name__}.{name} would run the "
                                 "model without its adapters. Use m.merge_and_unload() to get the model with the "
                                 "adapters folded in, then call it there")
        return value  # plain attributes (loss_type, name_or_path, ...) read as on the model, as PEFT does

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError("a VeraFxModel cannot be pickled (it holds torch.export graphs): save the adapter with "
                        "m.save_pretrained(directory) and rebuild it with vera_fx.from_pretrained(model, directory)")

    def __deepcopy__(self, memo: dict) -> "VeraFxModel":
        source = copy.deepcopy(self._source, memo)
        key = self._key_of(self._source)
        twin = VeraFxModel(self._base_model, source, self.max_graphs, key)
        return twin

    def __repr__(self) -> str:
        names = list(getattr(self._source, CONTAINER, {}) or {})
        return (f"{type(self).__name__}(model={type(self._base_model).__name__}, adapters={names}, "
                f"graphs={self.num_graphs})")

    # --- graph-level access ----------------------------------------------------------------------------------

    @property
    def graph_module(self) -> GraphModule:
        """The source graph: it holds the adapter state every other graph shares."""
        return self._source

    @property
    def _vera_fx_source_graph(self) -> GraphModule:  # the protocol vera_fx.sites.as_graph_module reads
        return self._source

    @property
    def graphs(self) -> dict[CallKey, GraphModule]:
        """Every cached graph by its call signature (the first graph of each signature)."""
        return {k: v[0] for k, v in self._graphs.items()}

    @property
    def num_graphs(self) -> int:
        return sum(len(v) for v in self._graphs.values())

    @property
    def graph(self) -> torch.fx.Graph:
        return self._source.graph

    @property
    def code(self) -> str:
        return self._source.code

    @property
    def meta(self) -> dict:
        return self._source.meta

    @property
    def base_model(self) -> nn.Module:
        """The model ``transform`` was given (unchanged by the object)."""
        return self._base_model

    def signatures(self) -> list[str]:
        """The cached call signatures, readable, in capture order."""
        return [describe_key(k) for k in self._order]

    # --- model surface ---------------------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The model's config (transformers models), or None."""
        return getattr(self._base_model, "config", None)

    @property
    def main_input_name(self) -> str:
        return getattr(self._base_model, "main_input_name", "input_ids")

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the Trainer may pass ``num_items_in_batch`` (as it decides for the model itself)."""
        default = any(p.kind is p.VAR_KEYWORD for p in self._forward_params.values())
        return bool(getattr(self._base_model, "accepts_loss_kwargs", default))

    def _probe(self) -> Optional[torch.Tensor]:
        at = self._probe_at
        if at is not None and at[1] in at[0]:  # one dict lookup per call (the object may replace the tensor)
            return at[0][at[1]]
        for name, p in self._source.named_parameters():
            if not name.startswith(CONTAINER + ".") and p.is_floating_point():
                path, _, leaf = name.rpartition(".")
                self.__dict__["_probe_at"] = (self._source.get_submodule(path)._parameters, leaf)
                return p
        for name, p in self._source.named_parameters():
            if not name.startswith(CONTAINER + ".") and p.is_floating_point():
                return p
        return next((p for p in self._source.parameters()), None)

    def _weights_state(self) -> tuple:
        p = self._probe()
        return (None, None) if p is None else (p.dtype, p.device.type)

    @property
    def device(self) -> torch.device:
        p = self._probe()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._probe()
        return p.dtype if p is not None else torch.get_default_dtype()

    @property
    def active_adapters(self) -> list[str]:
        return active_adapters(self._source)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, as PEFT counts them."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
        trainable, total = count_parameters(self)
        pct = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[list[str]] = None,
                        is_main_process: Optional[bool] = None, **kwargs: Any) -> None:
        """Write the adapters as PEFT does: ``default`` in ``save_directory``, any other adapter in a subfolder
        of its name. ``PeftModel.from_pretrained(model, save_directory)`` loads the result. ``is_main_process``
        as in transformers (default: rank 0); sharded with FSDP2, call it on every rank with it set."""
        if kwargs:
            logger.info("save_pretrained: ignored %s (vera_fx writes safetensors only)", sorted(kwargs))
        names = list(getattr(self._source, CONTAINER, {}) or {})
        chosen = names if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ValueError(f"selected_adapters={chosen!r}: {unknown} are not adapters of this model ({names})")
        for name in chosen:
            ckpt.save_adapter(self._source, save_directory if name == "default" else Path(save_directory) / name,
                              name, is_main_process=is_main_process)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.Tensor:
        """Generate with the adapters unmerged through a KV-cache decode graph over this object's adapter state
        (``vera_fx.generate``; the same keywords)."""
        kwargs.setdefault("model", self._base_model)
        return generate(self, input_ids, attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Checkpoint every block call of every graph, and of graphs captured later
        (``vera_fx.blockwise.gradient_checkpointing_enable``): backward keeps the block inputs and recomputes each
        block once; gradients are unchanged. A model captured as one graph (no blocks) raises ValueError.
        ``gradient_checkpointing_kwargs`` (transformers' Trainer passes ``use_reentrant``) are accepted: the
        blocks always use non-reentrant checkpointing."""
        blockwise.gradient_checkpointing_enable(self._source)
        for gm in self._all_graphs():
            if gm is not self._source and blockwise.block_calls(gm):
                blockwise.gradient_checkpointing_enable(gm)

    def gradient_checkpointing_disable(self) -> None:
        """Call the blocks directly again in every graph."""
        for gm in {id(g): g for g in [self._source, *self._all_graphs()]}.values():
            blockwise.gradient_checkpointing_disable(gm)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return blockwise.is_gradient_checkpointing(self._source)

    # --- state dict: the adapters only -------------------------------------------------------------------

    def state_dict(self, *args: Any, destination: Optional[dict] = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapters' state, not the frozen base: ``vera_fx.<adapter>.<PEFT key>`` tensors (cloned, so
        tensors that share storage can be saved with safetensors) and ``vera_fx_config.<adapter>`` (the
        config as JSON bytes). transformers' Trainer saves exactly this in its checkpoints."""
        out: dict[str, torch.Tensor] = OrderedDict() if destination is None else destination
        for name in getattr(self._source, CONTAINER, {}) or {}:
            for key, t in ckpt.adapter_state_dict(self._source, name).items():
                out[f"{prefix}{STATE_KEY_PREFIX}{name}.{key}"] = t if keep_vars else t.detach().clone()
            data = json.dumps(ckpt.peft_config_dict(self._source, name), sort_keys=True).encode()
            out[f"{prefix}{CONFIG_KEY_PREFIX}{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load what ``state_dict()`` gives (every adapter checked before anything changes)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict: state_dict={state_dict!r:.60} is a {type(state_dict).__name__}; "
                            "give the dict m.state_dict() returns (a folder loads with vera_fx.load_adapter)")
        names = list(getattr(self._source, CONTAINER, {}) or {})
        per_adapter: dict[str, dict[str, torch.Tensor]] = {}
        unexpected: list[str] = []
        for key, value in state_dict.items():
            if key.startswith(CONFIG_KEY_PREFIX):
                if key[len(CONFIG_KEY_PREFIX):] not in names:
                    unexpected.append(key)
                continue
            adapter, _, rest = key[len(STATE_KEY_PREFIX):].partition(".") if key.startswith(STATE_KEY_PREFIX) \
                else (None, "", "")
            if adapter in names and rest:
                per_adapter.setdefault(adapter, {})[rest] = value
            else:
                unexpected.append(key)
        missing = [f"{STATE_KEY_PREFIX}{n}.*" for n in names if n not in per_adapter]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict: the state dict does not fit this model's adapters {names}; missing: "
                             f"{missing or 'none'}, unexpected: {unexpected[:5] or 'none'}. Give it what "
                             "state_dict() returns (or load a PEFT folder with vera_fx.load_adapter)")
        plans = [(name, ckpt.plan_load(self._source, sd, name, f"state dict of adapter {name!r}")[0])
                 for name, sd in per_adapter.items()]
        with state_lock(self._source).write():
            for name, plan in plans:
                ckpt.apply_plan(self._source, plan, [name])
        return IncompatibleKeys(missing, unexpected)

    # --- calls -------------------------------------------------------------------------------------------

    def _normalise_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        params = self._forward_params
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(positional):
            raise TypeError(f"{type(self._base_model).__name__}.forward takes {len(positional)} positional "
                            f"arguments ({positional}); {len(args)} were given")
        call = dict(zip(positional, args))
        names = tuple(kwargs)
        if names not in self._keywords_ok:  # checked once per keyword set
            check_keywords(params, [k for k in kwargs if k != "adapter_names"], type(self._base_model).__name__)
            self._keywords_ok.add(names)
        for k, v in kwargs.items():
            if k in call:
                raise TypeError(f"forward got multiple values for argument {k!r}")
            call[k] = v
        out = {}
        for k, v in call.items():
            p = params.get(k)
            if v is None and (p is None or p.default is None or p.kind is p.VAR_KEYWORD):
                continue  # the model treats None as absent
            out[k] = v
        if "use_cache" in params and out.get("use_cache") is not False:
            if out.get("use_cache") is True and not self._warned_cache:
                logger.warning("use_cache=True: vera_fx graphs run without a KV cache and return no "
                               "past_key_values; outputs are otherwise the model's")
                self.__dict__["_warned_cache"] = True
            out["use_cache"] = False
        n_items = out.get("num_items_in_batch")
        if isinstance(n_items, int) and not isinstance(n_items, bool):
            out["num_items_in_batch"] = torch.tensor(n_items)  # a tensor, so one graph serves every value
        sig = self._source.meta.get("vera_fx_signature")
        ids = out.get("input_ids")
        if sig is not None and isinstance(ids, torch.Tensor):
            for name, kind, dtype in sig.defaults:  # filled as the model fills them: one graph for both
                if name not in out and name in params:
                    out[name] = (torch.ones_like if kind == "ones" else torch.zeros_like)(ids, dtype=dtype)
        check_mask(out)
        return out

    def _key(self, call: dict[str, Any]) -> CallKey:
        return (tuple(_value_key(k, call[k]) for k in sorted(call)), _autocast_state(), self._weights_state())

    def _key_of(self, gm: GraphModule) -> Optional[CallKey]:
        return next((k for k, v in self._graphs.items() if any(g is gm for g in v)), None)

    def _all_graphs(self) -> list[GraphModule]:
        return [g for v in self._graphs.values() for g in v]

    def _store(self, key: CallKey, gm: GraphModule) -> None:
        gm.meta["vera_fx_call_key"] = key
        if key not in self._graphs:
            self._graphs[key] = []
            self._order.append(key)
        self._graphs[key].append(gm)

    def _capture(self, key: CallKey, call: dict[str, Any]) -> GraphModule:
        self._check_room(key)
        say_constant_changes([k[0] for k in self._order], key[0], self._warned_constants, self.num_graphs,
                             self.max_graphs)
        example = {k: _expand_unit_dims(v) for k, v in call.items()}
        logger.info("vera_fx: capturing a graph for a new call signature (%s)", describe_key(key))
        try:
            with torch.enable_grad(), _swapped_in(self._base_model, self._source):
                gm = capture(self._base_model, example)
        except CaptureError as e:
            raise CaptureError(f"a call with a new signature ({describe_key(key)}) needs a new graph, and {e}. "
                               "Call the model with the keywords it was transformed with, or pass example_inputs "
                               "that export can capture") from e
        gm = run_passes(gm, [MatchPass()])
        if blockwise.is_gradient_checkpointing(self._source) and blockwise.block_calls(gm):
            blockwise.gradient_checkpointing_enable(gm)
        fp = state_fingerprint(self._source)
        attach_adapters(gm, self._source)
        gm.meta[_FINGERPRINT] = fp
        self._store(key, gm)
        return gm

    def _graph_for(self, key: CallKey, call: dict[str, Any]) -> GraphModule:
        """The first graph of ``key``, captured when there is none: once, whichever threads ask at once."""
        graphs = self._graphs.get(key)
        if graphs is None:
            with self._build_lock:
                graphs = self._graphs.get(key)
                if graphs is None:
                    return self._capture(key, call)
        return self._fresh(graphs[0], variant=False)

    def _fresh(self, gm: GraphModule, variant: bool = True) -> GraphModule:
        """``gm`` (with ``variant``: its inference twin for an inference call) bound to the current adapter state
        (the caller holds the state's read lock, so the state cannot change meanwhile; a graph is refreshed by
        one thread, the others wait for it)."""
        compiling = torch.compiler.is_compiling()
        fp = None if compiling else state_fingerprint(self._source)  # once per call: the twin key and the attach check
        if variant and not compiling:
            gm = self._variant(gm, fp)
        if gm is not self._source and not compiling:
            if gm.meta.get(_FINGERPRINT) != fp:
                with self._build_lock:
                    if gm.meta.get(_FINGERPRINT) != fp:
                        attach_adapters(gm, self._source, gm.meta.get(_FINGERPRINT))
                        gm.meta[_FINGERPRINT] = fp
        if gm.training != self._source.training:
            gm.train(self._source.training)
        return gm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self._forward(args, kwargs)
        with state_lock(self._source).read():  # one consistent adapter state for the whole call
            return self._forward(args, kwargs)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        call = self._normalise_call(args, kwargs)
        key = self._key(call)
        graphs = self._graphs.get(key)
        if graphs is not None:
            try:
                self._graphs.move_to_end(key)  # least recently used first (eviction order)
            except KeyError:  # evicted by another thread meanwhile: this call still runs the graph it got
                pass
        if adapter_names is not None:  # one adapter per row: the mixed graph of this signature's graph
            gm = self._graph_for(key, call)
            return mixed_adapter_forward(gm, adapter_names, **call)
        if graphs is None:
            return self._ready_graph(key, self._graph_for(key, call))(**call)
        if torch.compiler.is_compiling():
            # Through the class attribute: dynamo then guards on the function, which recompile() replaces.
            gm = self._fresh(graphs[0])
            return type(gm).forward(gm, **call)
        if len(graphs) == 1:
            return self._ready_graph(key, graphs[0])(**call)
        return self._call_siblings(key, graphs, call)

    def _call_siblings(self, key: CallKey, graphs: list[GraphModule], call: dict[str, Any]) -> Any:
        for gm in graphs:
            try:
                return self._fresh(gm)(**call)
            except AssertionError as e:  # an export guard (a shape export specialised) rejected the call
                if not any(s in str(e) for s in _GUARD_ERRORS):
                    raise
        with self._build_lock:
            return self._capture(key, call)(**call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except AssertionError as e:  # a guard of the only graph of this signature: capture a sibling
            if not any(s in str(e) for s in _GUARD_ERRORS):
                raise
            call = self._normalise_call(args, kwargs)
            key = self._key(call)
            logger.info("vera_fx: the graph for %s rejected the call (%s); capturing another",
                        describe_key(key), str(e).splitlines()[0][:200])
            with state_lock(self._source).read(), self._build_lock:
                return self._capture(key, call)(**call)


@functools.lru_cache(maxsize=None)
def _model_class(base_cls: type) -> type:
    """A VeraFxModel subclass whose ``forward`` has the base model's signature (transformers' Trainer reads it
    to keep dataset columns and find the labels)."""
    params = _forward_parameters_of_class(base_cls)
    if params is None:
        return VeraFxModel

    def forward(self: VeraFxModel, *args: Any, **kwargs: Any) -> Any:
        return VeraFxModel.forward(self, *args, **kwargs)

    forward.__signature__ = params  # type: ignore[attr-defined]
    forward.__doc__ = VeraFxModel.forward.__doc__
    return type(f"VeraFx{base_cls.__name__}", (VeraFxModel,), {"forward": forward, "__module__": __name__,
                                                                "__reduce_ex__": VeraFxModel.__reduce_ex__})


def _forward_parameters_of_class(cls: type) -> Optional[inspect.Signature]:
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError, AttributeError):
        return None
    if "self" not in sig.parameters:
        return None
    return sig


def _example_key(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, Any]:
    """The captured example as the keyword call the object normalises it to."""
    args, kwargs = normalise_example(model, example_inputs)
    params = _forward_parameters(model)
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(positional, args)), **kwargs}


def transform(model: nn.Module, config: AdapterConfig, example_inputs: ExampleInputs = None,
              adapter_name: str = "default", max_graphs: int = DEFAULT_MAX_GRAPHS, lowering: Any = "auto",
              tokens: Optional[int] = None) -> VeraFxModel:
    """Capture ``model`` and attach a VeRA / PVeRA adapter to every linear-like call ``config`` targets.

    Returns a ``VeraFxModel``: call it as the model; a call of another signature captures its own graph on
    first use (at most ``max_graphs``). ``model`` is left as it was, on failure too. Only the adapter's
    parameters are trainable. Bad input raises ValueError / TypeError naming the field and the fix.
    ``lowering`` / ``tokens`` choose how each site group is computed (vera_fx/passes/lower.py).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, VeraFxModel):
        raise TypeError(f"model is already transformed ({type(model).__name__}): add another adapter with "
                        "m.add_adapter(name, config), or transform the original model (m.base_model)")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs={max_graphs!r} is invalid: expected an int >= 1, e.g. max_graphs=8")
    config = as_config(config)  # ours, or PEFT's VeraConfig / PveraConfig read by its fields
    method_for(config)
    call = _example_key(model, example_inputs)
    gm = transform_graph(model, config, call, adapter_name, lowering, tokens)
    cls = _model_class(type(model))
    obj = cls(model, gm, max_graphs)
    obj._store(obj._key(obj._normalise_call((), call)), gm)
    return obj


def from_pretrained(model: nn.Module, directory: Union[str, os.PathLike], *, example_inputs: Any = None,
                    adapter_name: str = "default", max_graphs: int = DEFAULT_MAX_GRAPHS) -> VeraFxModel:
    """Capture ``model`` and attach the adapter saved in ``directory``: a PEFT / vera_fx adapter folder, or a
    transformers Trainer checkpoint of a ``VeraFxModel`` (model.safetensors from ``state_dict()``).
    The folder is checked before the (slow) capture; ``model`` is left unchanged."""
    path = Path(directory)
    if (path / ckpt.CONFIG_NAME).is_file() or not (path / "model.safetensors").is_file():
        config, tensors = ckpt.read_checkpoint(directory)
        method_for(config)
        obj = transform(model, config, example_inputs, adapter_name, max_graphs)
        ckpt.load_checked(obj.graph_module, adapter_name, config, tensors, str(path / ckpt.WEIGHTS_NAME))
        return obj
    state = ckpt.read_weights(path / "model.safetensors")
    configs = {k[len(CONFIG_KEY_PREFIX):]: v for k, v in state.items() if k.startswith(CONFIG_KEY_PREFIX)}
    if not configs:
        raise ValueError(f"{path}/model.safetensors holds no vera_fx adapter (no {CONFIG_KEY_PREFIX}* entry): "
                         "give an adapter folder (adapter_config.json + adapter_model.safetensors) or a Trainer "
                         "checkpoint of a vera_fx model")
    parsed = {}
    for name, blob in configs.items():
        try:
            parsed[name] = config_from_dict(json.loads(bytes(blob.tolist()).decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}/model.safetensors: the config of adapter {name!r} is unreadable: {e}") from e
    first = adapter_name if adapter_name in parsed else next(iter(parsed))
    obj = transform(model, parsed[first], example_inputs, first, max_graphs)
    for name, cfg in parsed.items():
        if name != first:
            add_adapter(obj.graph_module, name, cfg)
    obj.load_state_dict(state, strict=True)
    return obj

