"""Graph variants: every graph the model object runs, bound to the source graph's adapter state
(``attach_adapters``). A call without grad, or in eval mode with the adapters in eval too (PEFT trains the adapters
of a model left in eval mode), runs its graph's *inference twin*: a copy of the tree sharing its tensors, adapters in
the inference form (vera_fx/passes/infer.py)."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.fx import GraphModule

from .checks import describe_key
from .methods import CONTAINER
from .passes.infer import DEFAULT_FORM, FORMS, INFERENCE_KEY, bind_flat_reads, flatten_reads
from .passes.inject import emit_adapter, remove_adapter_nodes
from .quantized import is_quantized_layer
from .signatures import remove_input_check
from .sites import graph_modules
from .state import (ADAPTER_MODE, active_adapters, adapters_disabled, adapters_of, adapters_training, attach_state,
                    route_modules_to_save, set_adapters_training, tag_modules_to_save)

logger = logging.getLogger(__name__)

INFERENCE_FORM = DEFAULT_FORM
TWIN_LIMIT = 16  # inference twins kept per graph, one per adapter structure (as GraphVersions keeps versions)
_AS_IS = "as is"  # the twin entry of a graph that runs inference calls itself (a sharded tree)
FINGERPRINT_KEY = "vera_fx_fingerprint"  # gm.meta: the source's state_fingerprint a graph was attached at


def state_stamp(source: GraphModule) -> tuple:
    """What the graph a call runs depends on besides its signature (the lock's version changes on every write)."""
    container = source._modules.get(CONTAINER)
    mode = source._modules.get(ADAPTER_MODE)
    return (container, container.lock.version if container is not None else -1, source.training,
            mode.training if mode is not None else None, torch.is_grad_enabled())


def is_sharded(gm: GraphModule) -> bool:
    """Whether ``gm``'s tree is sharded (FSDP modules or DTensor parameters): it runs only as it is."""
    return any(any(c.__name__ in ("FSDPModule", "FullyShardedDataParallel") for c in type(m).__mro__)
               for m in gm.modules()) or any(type(p).__name__ == "DTensor" for p in gm.parameters())


def check_form(form: Any) -> str:
    """Validate an inference form (``"batched"``, or ``"site"`` for per-site products)."""
    if form not in FORMS:
        raise ValueError(f"inference_form={form!r} is not one of {list(FORMS)}; e.g. inference_form='batched'")
    return form


def inference_twin(gm: GraphModule, form: Optional[str], checked: bool = True) -> GraphModule:
    """A copy of ``gm``'s graph tree sharing its tensors and leaf modules, for the inference ``form`` (None: as
    ``gm``), not yet attached; ``checked=False``: no keyword check."""
    modules = dict(gm.named_modules())
    graphs = [name for name, mod in modules.items() if isinstance(mod, GraphModule)]
    memo: dict[int, Any] = {}
    for name, mod in modules.items():
        memo.update((id(t), t) for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None)
        # copied: the graphs, the modules on the path to one (a layer list) and each graph's adapter mode flag;
        # shared: adapter state, views, quantized layers
        on_path = not name or any(g == name or g.startswith(name + ".") for g in graphs)
        if not on_path and name.rpartition(".")[2] != ADAPTER_MODE:
            memo[id(mod)] = mod
    twin = copy.deepcopy(gm, memo)
    twin.meta.pop(FINGERPRINT_KEY, None)
    if form is not None:
        twin.meta[INFERENCE_KEY] = check_form(form)
    if not checked:
        remove_input_check(twin)
    return twin


class GraphVariants:
    """``VeraFxModel``'s inference twins, inference form, per-call cache and LRU bound (its attributes)."""

    def _check_room(self, key: tuple) -> None:
        """Past ``max_graphs``, evict the least recently used signatures (never the source's), warning once."""
        while self.num_graphs >= self.max_graphs:
            victim = next((k for k, v in self._graphs.items() if all(g is not self._source for g in v)), None)
            if victim is None:  # only the source is left: it stays, the bound is exceeded by the new graph
                break
            del self._graphs[victim]
            logger.info("vera_fx: evicted the least recently used graph (%s)", describe_key(victim))
            if not self._warned_evict:
                warnings.warn(f"this model holds max_graphs={self.max_graphs} captured graphs, one per call signature; "
                              f"the least recently used one ({describe_key(victim)}) is evicted and captured again if "
                              "called again. Raise the bound (m.max_graphs = N, or transform(..., max_graphs=N)) to "
                              "keep more", UserWarning, stacklevel=4)
                self.__dict__["_warned_evict"] = True
        self._ready.clear()  # no evicted graph stays reachable through the per-call cache

    def _drop_variants(self) -> None:
        """Forget every inference twin and the per-call choices (after ``.to()`` or a new inference form)."""
        self._twins.clear()
        self._ready.clear()

    def _ready_graph(self, key: tuple, gm: GraphModule, variant: bool = True) -> GraphModule:
        """The graph a call of signature ``key`` runs: the last call's while the state stamp holds."""
        stamp = state_stamp(self._source)
        hit = self._ready.get(key)
        if hit is not None and hit[1] is gm and hit[0] == stamp:
            return hit[2]
        run = self._fresh(gm, variant)
        self._ready[key] = (stamp, gm, run)
        return run

    @property
    def inference_form(self) -> str:
        """The inference form: ``"site"`` (per-site products, the default) or ``"batched"`` (one per site group)."""
        return self._inference_form

    @inference_form.setter
    def inference_form(self, form: str) -> None:
        self.__dict__["_inference_form"] = check_form(form)
        self._drop_variants()

    def _variant(self, gm: GraphModule, fp: tuple) -> GraphModule:
        """``gm``, or its inference twin for an inference call; ``fp``: the source's ``state_fingerprint``."""
        adapters_train = adapters_training(self._source)
        if INFERENCE_KEY in gm.meta or (torch.is_grad_enabled() and (self._source.training or adapters_train)):
            return gm
        built = self._twins.get(gm)
        if built is _AS_IS:
            return gm
        key = (self._inference_form, fp)
        twin = built.get(key) if built is not None else None
        if twin is None:
            with self._build_lock:  # a copy of the graph as now bound; the TWIN_LIMIT most recent kept
                # a sharded tree (FSDP) runs as it is: its hooks gather the parameters, a copy would have none
                if is_sharded(gm):
                    self._twins[gm] = _AS_IS
                    return gm
                twin = inference_twin(gm, self._inference_form)
                built = self._twins.setdefault(gm, OrderedDict())
                built[key] = twin
                while len(built) > TWIN_LIMIT:
                    built.popitem(last=False)
        built.move_to_end(key)  # a structure seen before keeps its nodes (tensors rebound if the base changed)
        if adapters_training(twin) != adapters_train:  # the twin's flag is its own (its train mode: ``_fresh``)
            set_adapters_training(twin, adapters_train)
        return twin


def state_fingerprint(gm: GraphModule) -> tuple:
    """Changes whenever the adapter nodes ``gm`` should carry change (sampling switches are read at run time)."""
    return tuple((n, id(s)) for n, s in adapters_of(gm).items()), adapters_of(gm).flags.key()


_SLOTS: "weakref.WeakKeyDictionary[GraphModule, tuple[list[dict], tuple]]" = weakref.WeakKeyDictionary()


def base_stamp(source: GraphModule) -> tuple:
    """The identities of every module, parameter and buffer of ``source``'s tree but its adapter state (merge, load
    and ``.to()`` replace them); walks the tree only after a change."""
    dicts, stamp = _SLOTS.get(source, ((), None))
    now = tuple(id(v) for d in dicts for v in d.values())
    if now == stamp:
        return now
    dicts, todo = [], [source]
    while todo:  # every _modules / _parameters / _buffers dict of the tree, not those of adapter containers
        mod = todo.pop()
        dicts += [mod._modules, mod._parameters, mod._buffers]
        todo += [c for k, c in mod._modules.items() if c is not None and k != CONTAINER]
    _SLOTS[source] = (dicts, tuple(id(v) for d in dicts for v in d.values()))
    return _SLOTS[source][1]


def bind_tensors(dst: torch.nn.Module, named: Iterable[tuple[str, Any]], undo: Optional[list] = None) -> int:
    """The one binder: make ``dst``'s parameter, buffer or submodule of each name the given value where it holds
    None or a value of the same type and shape; returns how many changed (each appended to ``undo``)."""
    count = 0
    for qualname, value in named:
        path, _, leaf = qualname.rpartition(".")
        try:
            mod = dst.get_submodule(path)
        except AttributeError:
            continue
        store = next((st for st in (mod._parameters, mod._buffers, mod._modules) if leaf in st), None)
        old = None if store is None else store[leaf]
        if store is None or old is value or (old is not None and (
                type(old) is not type(value) or getattr(old, "shape", None) != getattr(value, "shape", None))):
            continue
        if undo is not None:
            undo.append((store, leaf, old))
        store[leaf] = value
        count += 1
    return count


@contextlib.contextmanager
def tensors_bound(dst: torch.nn.Module, named: Iterable[tuple[str, Any]]) -> Iterator[None]:
    """While inside, ``dst`` holds ``named``'s tensors (``bind_tensors``); what they replaced is put back on exit."""
    undo: list[tuple[dict, str, Any]] = []
    try:
        bind_tensors(dst, named, undo)
        yield
    finally:
        for store, leaf, old in reversed(undo):
            store[leaf] = old


def _route_modules_to_save(gm: GraphModule) -> None:
    """Tag and route ``gm``'s reads of modules the adapters copy (``modules_to_save``), as in the source graph."""
    tag_modules_to_save(gm, [p for state in adapters_of(gm).values()
                             for p in getattr(state, "modules_to_save_paths", None) or []])
    if route_modules_to_save(gm, [] if adapters_disabled(gm) else active_adapters(gm)):
        gm.recompile()


def attach_adapters(gm: GraphModule, source: GraphModule, before: Optional[tuple] = None,
                    rebind: bool = True) -> GraphModule:
    """Make ``gm`` (captured from the same model) compute what ``source`` computes, in place. ``before``: the
    ``state_fingerprint`` ``gm`` was attached at (None: never); ``rebind=False``: no base tensor was replaced."""
    container = getattr(source, CONTAINER, None)
    fp = state_fingerprint(source)
    same_states = (before is not None and container is not None and before[0] == fp[0]
                   and gm._modules.get(CONTAINER) is container)
    rebound = 0
    if rebind or before is None:  # bitsandbytes layers (a merge replaces them), then base tensors: the source's
        named = [*((p, m) for p, m in source.named_modules(remove_duplicate=False) if is_quantized_layer(m)),
                 *source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)]
        rebound = bind_tensors(gm, ((n, t) for n, t in named if CONTAINER not in n.split(".")))
    if not same_states:
        for g in graph_modules(gm)[1:]:  # stale block views of an earlier attach
            g._modules.pop(CONTAINER, None)
        if container is None:
            gm._modules.pop(CONTAINER, None)
            remove_adapter_nodes(gm, None)
            gm.recompile()
            return gm
        gm.add_module(CONTAINER, container)
        for name, state in container.items():  # the same states; views of them in gm's own blocks
            attach_state(gm, name, state)
    container.versions.switch(gm, graph_modules(gm), before, fp, lambda: (
        _route_modules_to_save(gm), emit_layout(gm, live_layout(source))))
    # the modes as the source's (new states: set on every module, even where the root agrees)
    if not same_states or gm.training != source.training:
        gm.train(source.training)
    if not same_states or adapters_training(gm) != adapters_training(source):
        set_adapters_training(gm, adapters_training(source))
    bind_flat_reads(gm)
    logger.debug("attach: %d tensors rebound", rebound)
    return gm


def live_layout(gm: GraphModule) -> list[tuple[str, tuple[str, ...]]]:
    """(adapter, sites) of every live adapter of ``gm`` (active, not disabled, not merged), in the active order."""
    container = adapters_of(gm)
    if not len(container) or adapters_disabled(gm):
        return []
    merged = container.flags.merged
    layout = [(name, tuple(s for s in container[name].site_names if name not in merged.get(s, ())))
              for name in active_adapters(gm)]
    return [(name, sites) for name, sites in layout if sites]


def emit_layout(gm: GraphModule, layout: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Give ``gm``'s tree exactly ``layout``'s adapter nodes, in its form."""
    remove_adapter_nodes(gm, None)
    for name, sites in layout:
        emit_adapter(gm, name, set(sites))
    if INFERENCE_KEY in gm.meta:
        flatten_reads(gm)
