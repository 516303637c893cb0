"""The graph variants the model object runs: the inference twin of each captured graph, and the LRU bound.

A call under ``no_grad`` / ``inference_mode``, or in eval mode with the adapters in eval too (PEFT's recipe
trains the adapters of a model left in eval mode), runs its graph's *inference twin*: a copy of the graph tree
(own Graphs and code; the same tensors, adapter state and leaf modules) with the adapters in the inference form
(vera_fx/passes/infer.py: nothing kept for backward), built once per graph, form and adapter structure.

The bound: past ``max_graphs`` captured graphs the least recently used one is evicted (never the source, which
holds the adapter state), with one warning, as torch.compile does past its recompile limit. The per-call path
keeps the graph a call runs per signature with the ``state_stamp`` it was chosen at (a dictionary lookup).
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
from .checks import describe_key
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
    """A copy of ``gm``'s graph tree marked for the inference ``form`` (new GraphModules, Graphs and adapter mode
    flags; the same tensors and other submodules), less the meta keys ``drop_meta``. The caller binds it to the
    adapter state (its adapter nodes are re-emitted then)."""
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
                twin = inference_twin(gm, self._inference_form, (FINGERPRINT_KEY,))
                built = self._twins.setdefault(gm, OrderedDict())
                built[key] = twin
                while len(built) > TWIN_LIMIT:
                    built.popitem(last=False)
        built.move_to_end(key)  # a structure seen before keeps its nodes (tensors rebound if the base changed)
        if twin.training != self._source.training:  # the modes as the source's (the twin's flags are its own)
            twin.train(self._source.training)
        if adapters_training(twin) != adapters_train:
            set_adapters_training(twin, adapters_train)
        return twin
