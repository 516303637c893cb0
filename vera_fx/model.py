"""The object users hold: ``VeraFxModel``, a model-like nn.Module over the *source graph* (which holds the adapter
state; the object's parameter, buffer and submodule dicts are its) and a bounded cache of graphs per call signature.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import threading
import types
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule

from . import blockwise, checkpoint as ckpt
from .adapters import add_adapter
from .capture import CaptureError, capture
from .config import AdapterConfig, as_config
from .methods import CONTAINER, method_for
from .checks import describe_key
from .passes.match import MatchPass
from .serving import mixed_adapter_forward
from .signatures import (CallKey, ExampleInputs, call_key, capture_example, forward_parameters, normalise_call,
                         normalise_example)
from .state import adapter_container, state_lock
from .passes.lower import check_lowering
from .passes.pipeline import add_adapter_passes, run_passes
from .compat import eager_frame, eval_frame_callback
from .surface import PeftSurface, check_is_trainable
from .variants import (FINGERPRINT_KEY, INFERENCE_FORM, GraphVariants, attach_adapters, base_stamp, state_fingerprint,
                       tensors_bound)

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRAPHS = 8
# dynamo skips ``forward`` (runs it eagerly) and compiles the frames it calls: each graph's generated forward
_EAGER_REASON = ("a VeraFxModel runs its own work eagerly and torch.compile compiles each captured graph's "
                 "forward: compile the object itself (torch.compile(m)), or m.graph_module, rather than code that "
                 "calls it")


class VeraFxModel(PeftSurface, GraphVariants, nn.Module):
    """A model with VeRA / PVeRA adapters computed by captured graphs: call it as the model."""

    _keys_to_ignore_on_save = None  # read by transformers' Trainer after loading a checkpoint

    def __init__(self, model: nn.Module, source: GraphModule, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 source_key: Optional[CallKey] = None) -> None:
        super().__init__()
        d = self.__dict__
        d["_base_model"] = model  # the user's model: never a submodule, never changed (captures swap in)
        d["_source"] = source
        d["_parameters"], d["_buffers"], d["_modules"] = source._parameters, source._buffers, source._modules
        d["_graphs"] = OrderedDict()  # CallKey -> GraphModules (siblings: an export guard rejected a call), LRU order
        d["_twins"] = weakref.WeakKeyDictionary()  # graph -> its inference twin (vera_fx/variants.py)
        d["_ready"] = {}  # CallKey -> (state stamp, graph, the graph a call runs) (variants.py); siblings' last
        d["_keywords_ok"] = set()  # keyword sets check_keywords accepted
        d["_inference_form"], d["_forward_params"] = INFERENCE_FORM, forward_parameters(model)
        d["_warned_evict"] = d["_warned_cache"] = False
        d["_probe_at"] = None  # (parameter dict, name) of the dtype / device probe: read per call
        d["_warned_constants"] = set()  # constant keywords already reported as costing a graph per value
        d["_build_lock"] = threading.RLock()  # captures and re-attaches of this object's graphs, one at a time
        self.max_graphs = max_graphs
        if source_key is not None:
            self._graphs[source_key] = [source]

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self._source.training  # the object's mode is its source graph's

    @training.setter
    def training(self, value: bool) -> None:
        if "_source" in self.__dict__:  # (nn.Module.__init__ sets it before there is a source)
            self._source.training = value

    def train(self, mode: bool = True) -> "VeraFxModel":
        super().train(mode)  # (raises ValueError for a mode that is not a bool)
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
            else:  # buffers are new objects after _apply: re-attach on next use
                for gm in self._graphs[key]:
                    gm.meta.pop(FINGERPRINT_KEY, None)
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
        key = next((k for k, v in self._graphs.items() if any(g is self._source for g in v)), None)
        return VeraFxModel(self._base_model, copy.deepcopy(self._source, memo), self.max_graphs, key)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self._base_model).__name__}, adapters={list(self.peft_config)}, "
                f"graphs={self.num_graphs})")

    @property
    def graph_module(self) -> GraphModule:
        """The source graph: it holds the adapter state every other graph shares."""
        return self._source

    _vera_fx_source_graph = graph_module  # the protocol vera_fx.sites.as_graph_module reads

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
        """The cached call signatures, readable, least recently used first."""
        return [describe_key(k) for k in list(self._graphs)]

    def _probe(self) -> Optional[torch.Tensor]:
        at = self._probe_at
        if at is not None and at[1] in at[0]:  # one dict lookup per call (the object may replace the tensor)
            return at[0][at[1]]
        for name, p in self._source.named_parameters():
            if not name.startswith(CONTAINER + ".") and p.is_floating_point():
                path, _, leaf = name.rpartition(".")
                self.__dict__["_probe_at"] = (self._source.get_submodule(path)._parameters, leaf)
                return p
        return next(self._source.parameters(), None)

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

    def state_dict(self, *args: Any, destination: Optional[dict] = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapters only (Trainer saves it): ``vera_fx.<adapter>.<PEFT key>``, ``vera_fx_config.<adapter>``."""
        return ckpt.adapters_state_dict(self._source, destination, prefix, keep_vars)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load what ``state_dict()`` gives (all checked before anything changes)."""
        return ckpt.load_adapters_state_dict(self._source, state_dict, strict)

    def _all_graphs(self) -> list[GraphModule]:
        return [g for v in self._graphs.values() for g in v]

    def _capture(self, key: CallKey, call: dict[str, Any]) -> GraphModule:
        self._check_room(key)
        self._say_constant_changes(key[0])
        logger.info("vera_fx: capturing a graph for a new call signature (%s)", describe_key(key))
        try:
            with torch.enable_grad(), _swapped_in(self._base_model, self._source):
                gm = capture(self._base_model, capture_example(call))
        except CaptureError as e:
            raise CaptureError(f"a call with a new signature ({describe_key(key)}) needs a new graph, and {e}. "
                               "Call the model with the keywords it was transformed with, or pass example_inputs "
                               "that export can capture") from e
        gm = run_passes(gm, [MatchPass()])
        if blockwise.is_gradient_checkpointing(self._source) and blockwise.block_calls(gm):
            blockwise.gradient_checkpointing_enable(gm)
        self._fresh(gm, variant=False)  # attached to the source's state
        self._graphs.setdefault(key, []).append(gm)
        return gm

    def _say_constant_changes(self, inputs: tuple) -> None:
        """Warn once per keyword whose value alone (a constant's) makes ``inputs`` a new signature."""
        items = {item[0]: item for item in inputs}
        names: set[str] = set()
        for theirs in ({item[0]: item for item in key[0]} for key in list(self._graphs)):
            diff = [n for n in items if items[n] != theirs.get(n)] if theirs.keys() == items.keys() else []
            if diff and all(items[n][1] == "constant" and theirs[n][1] == "constant" for n in diff):
                names.update(diff)
        names -= self._warned_constants
        if names:
            self._warned_constants.update(names)
            logger.warning("vera_fx: %s changed value, and each value of a constant keyword needs a graph of its own "
                           "(%d of max_graphs=%d slots left after this one); pass one value, or make it a tensor",
                           ", ".join(sorted(names)), self.max_graphs - self.num_graphs - 1, self.max_graphs)

    def _binding(self, gm: GraphModule, fp: tuple) -> tuple:
        """What ``gm`` is attached again on a change of: the adapter structure, the base tensors of source and ``gm``
        (twins share leaf modules: binding one can change another's)."""
        return fp, base_stamp(self._source), base_stamp(gm)

    def _fresh(self, gm: GraphModule, variant: bool = True) -> GraphModule:
        """``gm`` (``variant``: its inference twin for an inference call) bound to the current adapter state."""
        fp = state_fingerprint(self._source)  # once per call: the twin key and the attach check
        if variant:
            gm = self._variant(gm, fp)
        if gm is not self._source:
            try:  # (a RuntimeError: another thread is binding a graph that shares leaf modules with this one)
                current = gm.meta.get(FINGERPRINT_KEY) == self._binding(gm, fp)
            except RuntimeError:
                current = False
            if not current:
                with self._build_lock:
                    was, now = gm.meta.get(FINGERPRINT_KEY), self._binding(gm, fp)
                    if was != now:
                        attach_adapters(gm, self._source, was[0] if was else None,
                                        rebind=was is None or was[1:] != now[1:])
                        gm.meta[FINGERPRINT_KEY] = self._binding(gm, fp)
        if gm.training != self._source.training:
            gm.train(self._source.training)
        return gm

    def _select(self, args: tuple, kwargs: dict) -> tuple[Callable[..., Any], dict[str, Any], CallKey]:
        """What runs this call (``adapter_names``: the mixed-adapter graph), the call's keywords and its key; a new
        signature's graph is captured once, whichever threads ask at once."""
        adapter_names = kwargs.pop("adapter_names", None)
        call, asked_cache = normalise_call(self._forward_params, type(self._base_model).__name__,
                                           self._source.meta.get("vera_fx_signature"), args, kwargs, self._keywords_ok)
        if asked_cache and not self._warned_cache:
            logger.warning("use_cache=True: vera_fx graphs run without a KV cache and return no past_key_values; "
                           "outputs are otherwise the model's")
            self.__dict__["_warned_cache"] = True
        key = call_key(call, self._weights_state())
        graphs = self._graphs.get(key)
        if graphs is None:
            with self._build_lock:
                graphs = self._graphs.get(key) or [self._capture(key, call)]
        else:  # least recently used first; a key another thread evicted meanwhile: the call runs the graph it got
            with contextlib.suppress(KeyError):
                self._graphs.move_to_end(key)
        if adapter_names is not None:  # one adapter per row: the mixed graph of this signature's first graph
            first = self._ready_graph((key, "first"), graphs[0], variant=False)
            return functools.partial(mixed_adapter_forward, first, adapter_names), call, key
        if len(graphs) == 1:
            return self._ready_graph(key, graphs[0]), call, key
        return functools.partial(self._call_siblings, key, graphs), call, key

    def _call_siblings(self, key: CallKey, graphs: list[GraphModule], /, **call: Any) -> Any:
        """Run the signature's first graph whose export guards accept the call (last winner first), else capture one."""
        last, why = self._ready.get((key, "sibling")), "evicted meanwhile"
        for gm in ([last] if last in graphs else []) + [g for g in graphs if g is not last]:
            try:
                out = self._ready_graph((key, id(gm)), gm)(**call)
            except AssertionError as e:
                if not _guard_failed(e):
                    raise
                why = str(e).splitlines()[0][:200]
                continue
            self._ready[(key, "sibling")] = gm
            return out
        logger.info("vera_fx: the graph for %s rejected the call (%s); capturing another", describe_key(key), why)
        with self._build_lock:
            return self._capture(key, call)(**call)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        """An eager call (the caller holds the read lock)."""
        run, call, key = self._select(args, kwargs)
        try:
            return run(**call)
        except AssertionError as e:
            if not isinstance(run, GraphModule) or not _guard_failed(e):
                raise
        return self._call_siblings(key, self._graphs.get(key, []), **call)

    @torch.compiler.disable
    def _enter_compiled(self, args: tuple, kwargs: dict) -> tuple[Callable[..., Any], dict[str, Any], Any]:
        """Under torch.compile, the call's eager part (all but the graph's ``forward``); returns the read lock held."""
        held = state_lock(self._source).read()
        held.__enter__()
        try:
            run, call, _ = self._select(args, kwargs)
        except BaseException:
            held.__exit__(None, None, None)
            raise
        # a graph's forward without hooks (the call was checked above); the mixed-adapter or sibling paths: eager
        run = functools.partial(type(run).forward, run) if isinstance(run, GraphModule) else torch.compiler.disable(run)
        return run, call, held

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model with its adapters: the graph of this call's signature, captured on first use."""
        if eval_frame_callback() is None:  # a builtin: no frame of its own for dynamo to compile
            with state_lock(self._source).read():  # one consistent adapter state for the whole call
                return self._run(args, kwargs)
        run, call, held = self._enter_compiled(args, kwargs)
        try:
            return run(**call)
        finally:
            _leave(held)

    forward = eager_frame(forward, _EAGER_REASON)


@contextlib.contextmanager
def _swapped_in(model: nn.Module, source: GraphModule) -> Iterator[None]:
    """Meanwhile, ``model`` holds the source graph's tensors where they differ (after ``.to()`` or a merge)."""
    def named(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]

    mine = dict(named(model))
    differ = [(n, t) for n, t in named(source)
              if n in mine and (t.dtype, t.device, t.data_ptr()) != (mine[n].dtype, mine[n].device, mine[n].data_ptr())]
    with tensors_bound(model, differ):
        yield


def _guard_failed(e: AssertionError) -> bool:
    """Whether ``e`` is an export guard rejecting a call (a size or value the graph was specialised to)."""
    return any(s in str(e) for s in ("Guard failed", "guard", "Expected input at"))


@torch.compiler.disable
def _leave(held: Any) -> None:
    held.__exit__(None, None, None)


@functools.lru_cache(maxsize=None)
def _model_class(base_cls: type) -> type:
    """A VeraFxModel subclass whose ``forward`` has the base model's signature (read by transformers' Trainer)."""
    params = inspect.signature(base_cls.forward)
    if "self" not in params.parameters:
        return VeraFxModel
    base = VeraFxModel.forward  # a function of its own (same code, which dynamo skips): the signature is the class's
    forward = types.FunctionType(base.__code__, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
    forward.__dict__.update(base.__dict__)  # dynamo's markers
    forward.__qualname__, forward.__doc__ = base.__qualname__, base.__doc__
    forward.__signature__ = params  # type: ignore[attr-defined]
    return type(f"VeraFx{base_cls.__name__}", (VeraFxModel,), {"forward": forward, "__module__": __name__})


def transform(model: nn.Module, config: AdapterConfig, example_inputs: ExampleInputs = None,
              adapter_name: str = "default", max_graphs: int = DEFAULT_MAX_GRAPHS, lowering: Any = "auto",
              tokens: Optional[int] = None) -> VeraFxModel:
    """Capture ``model`` (left as it was) and attach a VeRA / PVeRA adapter to every linear-like call ``config``
    targets. ``lowering`` and ``tokens`` (per step) choose how each site group is computed (vera_fx/passes/lower.py;
    a setting of the graph, not of the adapter)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, VeraFxModel):
        raise TypeError(f"model is already transformed ({type(model).__name__}): add another adapter with "
                        "m.add_adapter(name, config), or transform the original model (m.base_model)")
    if type(model).__name__.startswith("Peft") and callable(getattr(model, "get_base_model", None)):
        raise TypeError(f"model is a PEFT model ({type(model).__name__}): vera_fx adapts the base model itself; "
                        "pass model.get_base_model() (PEFT's adapters would be captured too) or the original model")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs={max_graphs!r} is invalid: expected an int >= 1, e.g. max_graphs=8")
    config = as_config(config)  # ours, or PEFT's VeraConfig / PveraConfig read by its fields
    method_for(config)  # type check before the (slow) capture
    setting = check_lowering(lowering, tokens)
    # the example normalised as every call is, so the graph is captured for the signature it is stored under
    call, _ = normalise_call(forward_parameters(model), type(model).__name__, None,
                             *normalise_example(model, example_inputs), set())
    gm = capture(model, call)
    adapter_container(gm).flags.lowering = setting
    gm = run_passes(gm, add_adapter_passes(config, adapter_name))
    obj = _model_class(type(model))(model, gm, max_graphs)
    obj._graphs[call_key(call, obj._weights_state())] = [gm]
    return obj


def from_pretrained(model: nn.Module, directory: Union[str, os.PathLike], *, example_inputs: Any = None,
                    adapter_name: str = "default", max_graphs: int = DEFAULT_MAX_GRAPHS,
                    is_trainable: bool = False) -> VeraFxModel:
    """Capture ``model`` with the adapter saved in ``directory`` (a PEFT / vera_fx folder or a Trainer checkpoint),
    checked first; frozen, in eval mode, unless ``is_trainable=True``, as PEFT's."""
    check_is_trainable(is_trainable)
    path = Path(directory)
    if (path / ckpt.CONFIG_NAME).is_file() or not (path / "model.safetensors").is_file():
        config, tensors, source = ckpt.read_folder(directory)
        obj = transform(model, config, example_inputs, adapter_name, max_graphs)
        ckpt.load_checked(obj.graph_module, adapter_name, config, tensors, source)
    else:
        state, parsed = ckpt.read_trainer_checkpoint(path)
        first = adapter_name if adapter_name in parsed else next(iter(parsed))
        obj = transform(model, parsed[first], example_inputs, first, max_graphs)
        for name, cfg in parsed.items():
            if name != first:
                add_adapter(obj.graph_module, name, cfg)
        obj.load_state_dict(state, strict=True)
    for cfg in obj.peft_config.values():
        cfg.inference_mode = not is_trainable
    obj.set_requires_grad(list(obj.peft_config), is_trainable)
    if not is_trainable:
        obj.eval()
    return obj
