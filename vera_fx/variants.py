"""The graph variants the model object runs: the inference twin of each captured graph, and the LRU bound.

Inference is its own variant. A call under ``torch.no_grad()`` or ``torch.inference_mode()``, or in eval mode
with the adapters in eval too (``is_inference_call``; a model left in eval mode trains its adapters, as in
PEFT's recipe), runs the *inference twin* of the captured graph for its signature: a copy of the graph
tree (its own ``Graph`` objects and generated code; the same parameters, buffers, adapter state and leaf
modules, never copied) whose adapters are emitted in the inference form (vera_fx/passes/infer.py: B read once
per site group, only vectors scaled, nothing kept for backward) instead of the training plan of
``lowering``. A twin is built once per graph, form and adapter structure, on first use, and kept (the
``TWIN_LIMIT`` most recent per graph): switching back to a structure seen before runs the twin built for it. A training call never sees it.

The bound: the object keeps at most ``max_graphs`` captured graphs. Past it the least recently used one is
evicted (with its twin) and a warning says so once, as torch.compile does past its recompile limit; the
source graph (it holds the adapter state) is never evicted. An evicted signature is captured again when
called again.

The per-call path: the graph a call runs (its twin or itself, bound to the adapter state) is kept per
signature with the *state stamp* it was chosen at (``state_stamp``: the adapter set and its lock's version,
bumped by every mutation, the train / eval modes, grad mode and the inference form). A call whose stamp is
unchanged runs that graph after a dictionary lookup; any change goes through the full check once.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from typing import Any, Hashable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .passes.infer import DEFAULT_FORM, FORMS, INFERENCE_KEY
from .checks import describe_key
from .sites import graph_modules
from .methods import CONTAINER
from .state import ADAPTER_MODE, adapters_training, set_adapters_training

logger = logging.getLogger(__name__)

INFERENCE_FORM = DEFAULT_FORM
TWIN_LIMIT = 16  # inference twins kept per graph, one per adapter structure (as GraphVersions keeps versions)
_AS_IS = "as is"  # the twin entry of a graph that runs inference calls itself (a sharded tree)
FINGERPRINT_KEY = "vera_fx_fingerprint"  # gm.meta: the source's state_fingerprint a graph was attached at


def is_inference_call(training: bool, adapters_training: bool) -> bool:
    """Whether a call runs the inference variant: no gradients (``no_grad``, ``inference_mode``), or eval mode
    with the adapters in eval too (PEFT's recipe trains a model left in eval mode: its adapters train)."""
    return not torch.is_grad_enabled() or not (training or adapters_training)


def state_stamp(source: GraphModule) -> tuple:
    """What the graph a call runs depends on besides its signature, cheap to read: the adapter set (compared by
    identity) and its lock's version (every mutation bumps it), the base and adapter train / eval modes, and
    grad mode (``no_grad`` / ``inference_mode`` choose the inference twin)."""
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


def inference_twin(gm: GraphModule, form: str, drop_meta: tuple[str, ...] = ()) -> GraphModule:
    """A copy of ``gm``'s graph tree marked for the inference ``form``: new GraphModules, Graphs and adapter
    train / eval flags, the same parameters, buffers and other submodules (adapter state, quantized layers). The caller binds it to the
    adapter state (its adapter nodes are re-emitted then); ``drop_meta``: meta keys of ``gm`` that the copy must
    not keep (e.g. the fingerprint of the state it was bound to)."""
    memo: dict[int, Any] = {}
    for g in graph_modules(gm):
        for t in (*g._parameters.values(), *g._buffers.values()):
            if t is not None:
                memo[id(t)] = t
    holders = _graph_holders(gm)  # and each graph's own adapter train / eval flag: the twin's is its own
    holders |= {id(g._modules[ADAPTER_MODE]) for g in graph_modules(gm) if ADAPTER_MODE in g._modules}
    for mod in gm.modules():
        if id(mod) not in holders:  # adapter state, views, quantized layers: shared, not copied
            memo[id(mod)] = mod
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is not None:
                    memo[id(t)] = t
    twin = copy.deepcopy(gm, memo)
    for key in drop_meta:
        twin.meta.pop(key, None)
    twin.meta[INFERENCE_KEY] = check_form(form)
    return twin


def _graph_holders(gm: GraphModule) -> set[int]:
    """The ids of ``gm``'s graphs and of every module on the path to one (a layer list): those are copied."""
    holders: set[int] = set()
    for name, mod in gm.named_modules():
        if isinstance(mod, GraphModule):
            holders.add(id(mod))
            parts = name.split(".") if name else []
            for k in range(len(parts)):
                holders.add(id(gm.get_submodule(".".join(parts[:k]))))
    return holders


def evict_least_recent(graphs: "OrderedDict[Hashable, list[GraphModule]]", order: list, keep: nn.Module,
                       limit: int, warned: bool, describe: Any) -> bool:
    """Drop the least recently used signatures of ``graphs`` (oldest first; ``order`` follows) until one more
    graph fits under ``limit``; never the one holding ``keep``. Warns once (``warned``: already did); returns
    whether it has warned now or before."""
    while sum(len(v) for v in graphs.values()) >= limit:
        victim: Optional[Hashable] = next((k for k, v in graphs.items() if all(g is not keep for g in v)), None)
        if victim is None:  # only the source is left: it stays, the bound is exceeded by the new graph
            break
        del graphs[victim]
        order.remove(victim)
        logger.info("vera_fx: evicted the least recently used graph (%s)", describe(victim))
        if not warned:
            warnings.warn(f"this model holds max_graphs={limit} captured graphs, one per call signature; the least "
                          f"recently used one ({describe(victim)}) is evicted and captured again if called again. "
                          "Raise the bound (m.max_graphs = N, or transform(..., max_graphs=N)) to keep more",
                          UserWarning, stacklevel=5)
            warned = True
    return warned


class GraphVariants:
    """The model object's graph variants and bound (mixed into ``VeraFxModel``): its inference twins, the
    inference form, the per-call cache and the LRU eviction past ``max_graphs``. Reads the object's ``_source``,
    ``_graphs``, ``_order``, ``_twins``, ``_ready``, ``_build_lock`` and ``max_graphs``."""

    def _check_room(self, key: tuple) -> None:
        """Past ``max_graphs``, evict the least recently used graph (never the source), warning once."""
        self.__dict__["_warned_evict"] = evict_least_recent(self._graphs, self._order, self._source, self.max_graphs,
                                                            self._warned_evict, describe_key)
        self._ready.clear()  # no evicted graph stays reachable through the per-call cache

    def _drop_variants(self) -> None:
        """Forget every inference twin and the per-call choices (after ``.to()`` or a new inference form)."""
        self._twins.clear()
        self._ready.clear()

    def _ready_graph(self, key: tuple, gm: GraphModule, variant: bool = True) -> GraphModule:
        """The graph a call of signature ``key`` (first graph ``gm``) runs: the one chosen by the last call when the
        state stamp is unchanged (a dictionary lookup), else ``_fresh(gm, variant)`` (twin choice, re-attach),
        kept."""
        stamp = state_stamp(self._source)
        hit = self._ready.get(key)
        if hit is not None and hit[1] is gm and hit[0] == stamp:
            return hit[2]
        run = self._fresh(gm, variant)
        self._ready[key] = (stamp, gm, run)
        return run

    @property
    def inference_form(self) -> str:
        """The inference variant's form: ``"site"`` (per-site products, the default: it measured faster on the
        CPU) or ``"batched"`` (a site group's products as one); set it to compare them (vera_fx/passes/infer.py)."""
        return self._inference_form

    @inference_form.setter
    def inference_form(self, form: str) -> None:
        self.__dict__["_inference_form"] = check_form(form)
        self._drop_variants()

    def _variant(self, gm: GraphModule, fp: tuple) -> GraphModule:
        """``gm``, or its inference twin for a call in eval mode or without gradients (vera_fx/variants.py);
        ``fp``: the source's ``state_fingerprint``, computed once per call by the caller."""
        if INFERENCE_KEY in gm.meta or not is_inference_call(self._source.training,
                                                             adapters_training(self._source)):
            return gm
        built = self._twins.get(gm)
        if built is _AS_IS:
            return gm
        key = (self._inference_form, fp)
        twin = built.get(key) if built is not None else None
        if twin is None:
            # built once per graph, form and adapter structure (a copy of the graph as now bound): switching back
            # to a structure seen before reuses its twin, no emission and no code generation (TWIN_LIMIT kept)
            with self._build_lock:
                # a sharded tree (FSDP) runs as it is: its hooks gather the parameters, a copy would have none
                if is_sharded(gm):
                    self._twins[gm] = _AS_IS
                    return gm
                twin = inference_twin(gm, self._inference_form, (FINGERPRINT_KEY,))
                built = self._twins.setdefault(gm, OrderedDict())
                built[key] = twin
                while len(built) > TWIN_LIMIT:
                    built.popitem(last=False)
        if next(reversed(built)) != key:  # a switch back to a structure seen before: its nodes are kept, its
            built.move_to_end(key)       # tensors bound again if the base changed meanwhile (``base_stamp``)
        if twin.training != self._source.training:  # the modes as the source's (the twin's flags are its own)
            twin.train(self._source.training)
        flag = adapters_training(self._source)
        if adapters_training(twin) != flag:
            set_adapters_training(twin, flag)
        return twin
