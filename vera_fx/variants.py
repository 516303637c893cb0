"""The graph variants the model object runs: the inference twin of each captured graph, and the LRU bound.

A call under ``torch.no_grad()`` / ``torch.inference_mode()``, or in eval mode with the adapters in eval too (a
model left in eval mode trains its adapters, as in PEFT's recipe), runs the *inference twin* of its graph: a copy
of the graph tree (its own ``Graph`` objects and generated code; the same parameters, buffers, adapter state and
leaf modules) whose adapters are emitted in the inference form (vera_fx/passes/infer.py: B read once per site
group, only vectors scaled, nothing kept for backward) instead of the training plan of ``lowering``. A twin is
built once per graph, form and adapter structure, on first use, and kept (the ``TWIN_LIMIT`` most recent per
graph). A training call never sees it.

The bound: at most ``max_graphs`` captured graphs; past it the least recently used one is evicted (with its
twin) and a warning says so once, as torch.compile does past its recompile limit. The source graph (it holds
the adapter state) is never evicted; an evicted signature is captured again when called again.

The per-call path: the graph a call runs (its twin or itself, bound to the adapter state) is kept per signature
with the ``state_stamp`` it was chosen at; a call whose stamp is unchanged runs it after a dictionary lookup.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch.fx import GraphModule

from .passes.infer import DEFAULT_FORM, FORMS, INFERENCE_KEY
from .keywords import describe_key
from .methods import CONTAINER
from .state import ADAPTER_MODE, adapters_training, set_adapters_training

logger = logging.getLogger(__name__)

INFERENCE_FORM = DEFAULT_FORM
TWIN_LIMIT = 16  # inference twins kept per graph, one per adapter structure (as GraphVersions keeps versions)
_AS_IS = "as is"  # the twin entry of a graph that runs inference calls itself (a sharded tree)
FINGERPRINT_KEY = "vera_fx_fingerprint"  # gm.meta: the source's state_fingerprint a graph was attached at


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
    """A copy of ``gm``'s graph tree marked for the inference ``form``: new GraphModules, Graphs and adapter train
    / eval flags; the same parameters, buffers and other submodules (adapter state, quantized layers). The caller
    binds it to the adapter state (its adapter nodes are re-emitted then); ``drop_meta``: meta keys of ``gm`` the
    copy must not keep (e.g. the fingerprint of the state it was bound to)."""
    modules = dict(gm.named_modules())
    graphs = [name for name, mod in modules.items() if isinstance(mod, GraphModule)]
    memo: dict[int, Any] = {}
    for name, mod in modules.items():
        memo.update((id(t), t) for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None)
        # copied: the graphs, the modules on the path to one (a layer list) and each graph's adapter mode flag
        if name.rpartition(".")[2] != ADAPTER_MODE and not any(not name or g == name or g.startswith(name + ".")
                                                                for g in graphs):
            memo[id(mod)] = mod
    twin = copy.deepcopy(gm, memo)
    for key in drop_meta:
        twin.meta.pop(key, None)
    twin.meta[INFERENCE_KEY] = check_form(form)
    return twin


class GraphVariants:
    """The model object's graph variants and bound (mixed into ``VeraFxModel``): its inference twins, the
    inference form, the per-call cache and the LRU eviction past ``max_graphs``. Reads the object's ``_source``,
    ``_graphs``, ``_order``, ``_twins``, ``_ready``, ``_build_lock`` and ``max_graphs``."""

    def _check_room(self, key: tuple) -> None:
        """Past ``max_graphs``, evict the least recently used signatures (oldest first) until one more graph fits,
        never the source's; warns once."""
        while sum(len(v) for v in self._graphs.values()) >= self.max_graphs:
            victim = next((k for k, v in self._graphs.items() if all(g is not self._source for g in v)), None)
            if victim is None:  # only the source is left: it stays, the bound is exceeded by the new graph
                break
            del self._graphs[victim]
            self._order.remove(victim)
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
        """The graph a call of signature ``key`` (first graph ``gm``) runs: the last call's choice when the state
        stamp is unchanged, else ``_fresh(gm, variant)`` (twin choice, re-attach), kept."""
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
        """``gm``, or its inference twin for a call without gradients or in eval mode with the adapters in eval
        too; ``fp``: the source's ``state_fingerprint``, computed once per call by the caller."""
        training = self._source.training or adapters_training(self._source)  # a model in eval trains its adapters
        if INFERENCE_KEY in gm.meta or (torch.is_grad_enabled() and training):
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
