"""Serving many adapters: mixed-adapter batches, loading adapters in bulk, and exported programs.

- ``mixed_adapter_forward(gm, adapter_names, **inputs)``: one forward in which row ``i`` runs with adapter
  ``adapter_names[i]`` (``"__base__"``: the base model). It runs the mixed graph of the bank pass
  (passes/bank.py), built on first use and cached with the graph until the set of adapters changes.
- ``load_adapters(gm, {name: folder})``: many PEFT / vera_fx folders at once, each checked as
  ``load_adapter`` checks it, with no graph rewrite per adapter; all or nothing.
- ``export(gm, example_inputs)``: a ``torch.export.ExportedProgram`` of the adapted, merged or mixed graph,
  which needs only torch and ``vera_fx/runtime.py`` (the custom ops of PVeRA's noise) to run.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from .adapters import set_adapter, set_lowering
from .signatures import clone_inputs, dynamic_shapes_of
from .signatures import InputCheck
from .checkpoint import WEIGHTS_NAME, PathLike, apply_plan, plan_load, read_checkpoint
from .config import AdapterConfig
from .methods import CONTAINER, AdapterState, method_for
from .methods.pvera import KLRecord
from .passes.bank import BASE_ADAPTER, INDEX_INPUT, bank_order, build_mixed_graph, check_bankable
from .passes.inject import new_state
from .passes.match import MatchPass, select_sites
from .sites import ADAPTER_KEY, SITE_KEY, as_graph_module, graph_modules
from .versions import adapter_flags
from .state import (adapter_container, adapters_of, attach_state, block_site_names, detach_state, mutation, reads_state,
                    restore_active, shared_projections)

logger = logging.getLogger(__name__)

def _adapter_key(gm: GraphModule) -> tuple:
    container = adapters_of(gm)
    states = list(container.items())
    # The mixed graph reads the adapters by name at call time, so their structure is all it depends on.
    return (id(container),) + tuple((name, state.method_name, state.config.r, tuple(state.site_names))
                                    for name, state in states)


def mixed_graph(gm: nn.Module) -> GraphModule:
    """The mixed-adapter graph of ``gm`` (inputs + ``vera_fx_adapter_index``), built once per adapter set.

    Rebuilt when adapters are added or deleted; training an adapter needs no rebuild (the graph stacks the
    adapters' own lambda parameters at call time). ValueError when the adapters cannot be mixed (merged,
    ``modules_to_save``, trained biases).
    """
    inner = as_graph_module(gm)
    check_bankable(inner)
    return getattr(inner, CONTAINER).versions.derived(inner, "mixed", _adapter_key(inner),
                                                      lambda: build_mixed_graph(inner))


def adapter_index(gm: nn.Module, adapter_names: Sequence[str]) -> torch.Tensor:
    """The ``vera_fx_adapter_index`` input for ``adapter_names`` (one name per row; ``"__base__"``: the base
    model): int64 on the graph's device. ValueError naming unknown names and the loaded adapters."""
    inner = as_graph_module(gm)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names={adapter_names!r}: expected a list of adapter names, one per row")
    order = bank_order(inner)
    position = {name: k for k, name in enumerate(order)}
    position[BASE_ADAPTER] = len(order)
    unknown = sorted({n for n in adapter_names if n not in position})
    if unknown:
        raise ValueError(f"adapter_names names adapters that are not loaded: {unknown}; loaded adapters: "
                         f"{order or 'none'} (and {BASE_ADAPTER!r} for the base model)")
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    return torch.tensor([position[n] for n in adapter_names], dtype=torch.long, device=device)


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def _filled(inner: GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with the graph's keyword check applied (constants and model defaults filled in)."""
    signature = inner.meta.get("vera_fx_signature")
    return InputCheck(signature)(inner, args, kwargs) if signature is not None else (args, kwargs)


@reads_state
def mixed_adapter_forward(gm: nn.Module, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
    """One forward of a batch in which row ``i`` uses adapter ``adapter_names[i]``.

    Contract (what ``m(**inputs, adapter_names=[...])`` routes to):

    - ``gm``: an adapted GraphModule (or its torch.compile wrapper) in eval mode; ``args`` / ``kwargs`` are
      the inputs the graph takes, with a batch of ``len(adapter_names)`` rows in the first dimension.
    - ``adapter_names``: one loaded adapter name per row, or ``"__base__"`` for the base model. Each row's
      output equals that row run alone with its adapter active (within float rounding); PVeRA rows sample
      with their own adapter's switches and, when seeded, its own noise stream (rows of one adapter draw in
      row order). Adapters of different methods or ranks are separate banks; a row gets zero from the others.
    - Returns what the graph returns. The active adapter list is ignored and not changed.
    - ValueError: unknown name (the message lists the loaded adapters), a row count that is not the batch,
      training mode (mixed batches are for inference, as in PEFT), merged adapters (unmerge first),
      adapters with ``modules_to_save`` or trained biases. TypeError: ``adapter_names`` not a list of str.
    """
    inner = as_graph_module(gm)
    index = adapter_index(inner, adapter_names)
    if inner.training:
        raise ValueError("adapter_names= runs a mixed-adapter batch, which is for inference (as in PEFT): call "
                         "gm.eval() first")
    if INDEX_INPUT in kwargs:
        raise TypeError(f"{INDEX_INPUT!r} is set from adapter_names; do not pass it")
    mixed = mixed_graph(inner)
    args, kwargs = _filled(inner, args, kwargs)
    first = _first_tensor(args, kwargs)
    if first is not None and (first.dim() == 0 or first.shape[0] != len(adapter_names)):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has "
                         f"{first.shape[0] if first.dim() else 'no'} rows: give one adapter name per row")
    return mixed(*args, **kwargs, **{INDEX_INPUT: index})


# --- loading many adapters ----------------------------------------------------------------------------------

def _new_state(gm: GraphModule, config: AdapterConfig, sites_cache: dict, projections_cache: dict) -> AdapterState:
    """An adapter's state (projections shared with its method's other adapters, lambdas at their init),
    frozen, without graph nodes; ValueError when its config cannot share the graph's projections."""
    method = method_for(config)
    key = (type(config).__name__, repr(config.target_modules), repr(config.layers_to_transform),
           repr(config.layers_pattern))
    if key not in sites_cache:
        sites_cache[key] = select_sites(gm, config)
    chosen = sites_cache[key]
    in_max = max(s.in_features for s in chosen)
    out_max = max(s.out_features for s in chosen)
    # Within one load_adapters call the shared projections of a method do not change (a later adapter gets
    # views of the same largest tensors, or is refused), so equal requests reuse the first answer:
    # shared_projections looks at every adapter on the graph, which would make loading K adapters O(K^2).
    proj_key = (method.name, config.projection_prng_key, config.save_projection, method.latent_rows(config),
                config.r, in_max, out_max)
    shared = projections_cache.get(proj_key)
    if shared is None:
        shared = shared_projections(gm, config, method, in_max, out_max)
        if shared is not None:
            projections_cache[proj_key] = shared
    return new_state(gm, config, chosen, shared, trainable=False)


def _check_new_names(container: nn.Module, folders: Mapping[str, PathLike]) -> None:
    for name in folders:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter name {name!r} is invalid: use a Python identifier such as 'task_a'")
        if name in container or name == BASE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is already on this graph (or reserved); choose another name "
                             "or delete it first")


def _load_one(inner: GraphModule, name: str, folder: PathLike, caches: tuple[dict, dict],
              blocks: Any, added: list[str]) -> None:
    """Read, check and attach one folder of ``load_adapters`` as adapter ``name`` (appended to ``added`` once
    attached, so a failure later in the call detaches it)."""
    config, tensors = read_checkpoint(folder)
    source = str(Path(folder) / WEIGHTS_NAME)
    if config.modules_to_save or config.bias != "none":
        raise ValueError(f"{folder}: modules_to_save={config.modules_to_save!r}, bias={config.bias!r}: "
                         "load_adapters takes adapters of lambdas only; load this one with vera_fx.load_adapter")
    try:
        state = _new_state(inner, config, *caches)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    attach_state(inner, name, state, blocks)  # the root's state and the blocks' views of it
    added.append(name)
    plan, missing = plan_load(inner, tensors, name, source)
    if missing and config.save_projection:
        raise ValueError(f"{source}: save_projection=True but the file has no {missing}; the checkpoint "
                         "is incomplete: save it again")
    if any(replace for *_, replace in plan):
        raise ValueError(f"{source} holds base-model weights besides the adapter; load_adapters takes "
                         "adapters of lambdas only: load this one with vera_fx.load_adapter")
    apply_plan(inner, plan)  # writes only the new adapter (shared projections were checked to be equal)


@mutation
def load_adapters(gm: nn.Module, folders: Mapping[str, PathLike], progress: bool = True) -> list[str]:
    """Load many adapter folders (PEFT or vera_fx) at once: ``{adapter name: folder}``.

    Each is checked as ``load_adapter`` checks it (folder, JSON, file, keys, shapes, dtypes, projections
    shared with the graph's adapters) and added inactive, without graph nodes, so the graph is rewritten
    at most once (when it had no adapter, the first one loaded becomes the active one). Use the adapters
    in mixed batches (``mixed_adapter_forward``) or with ``set_adapter``. Adapters with ``modules_to_save``
    or ``bias`` other than "none" are refused (use ``load_adapter``). All or nothing: on any error the graph
    is as it was and the ValueError names the folder. Returns the names loaded.
    """
    inner = as_graph_module(gm)
    if not isinstance(folders, Mapping) or not folders:
        raise TypeError(f"folders must be a non-empty dict {{adapter name: folder}}, got {folders!r}")
    had_container = getattr(inner, CONTAINER, None) is not None
    container = adapter_container(inner)
    existing = list(container)
    _check_new_names(container, folders)
    if not any(SITE_KEY in n.meta for g in graph_modules(inner) for n in g.graph.nodes):
        MatchPass()(inner)
    old_active = adapter_flags(inner).active
    added: list[str] = []
    caches: tuple[dict, dict] = ({}, {})  # sites per selection, shared projections per request
    blocks = block_site_names(inner)  # one walk of the blocks for every adapter loaded
    gc_was_on = gc.isenabled()
    gc.disable()  # thousands of small modules: the cyclic collector's passes would dominate
    try:
        for name, folder in tqdm(folders.items(), desc="load adapters", disable=not progress or len(folders) < 50):
            _load_one(inner, name, folder, caches, blocks, added)
    except Exception:
        for name in added:
            detach_state(inner, name)
        restore_active(inner, old_active)
        if not had_container:
            for g in graph_modules(inner):
                if CONTAINER in g._modules:
                    delattr(g, CONTAINER)
        raise
    finally:
        if gc_was_on:
            gc.enable()
    if existing:
        adapter_container(inner).flags.active = [n for n in (old_active if old_active is not None else existing) if n in existing]
    else:
        set_adapter(inner, added[0])
    logger.info("loaded %d adapters", len(added))
    return added


# --- export ---------------------------------------------------------------------------------------------------

def _kl_records(gm: GraphModule) -> list[KLRecord]:
    """Every KL record the graphs of ``gm``'s tree write (the root states' and the block views')."""
    found: dict[int, KLRecord] = {}
    for g in graph_modules(gm):
        for state in adapters_of(g).values():
            for v in vars(state).values():
                if isinstance(v, KLRecord):
                    found[id(v)] = v
    return list(found.values())


class _Constants(nn.Module):
    """Calls ``inner`` with its captured non-tensor keywords (``use_cache=False``) fixed, through a forward
    with one named parameter per tensor input, so the exported program takes the tensor inputs only."""

    def __init__(self, inner: nn.Module, n_args: int, names: Sequence[str], constants: dict[str, Any],
                 plain: bool) -> None:
        super().__init__()
        self.inner = inner
        self.constants = constants
        self.plain = plain
        params = [f"arg{i}" for i in range(n_args)] + list(names)
        call = [f"arg{i}" for i in range(n_args)] + [f"{n}={n}" for n in names]
        scope: dict[str, Any] = {}
        exec(f"def forward(self, {', '.join(params)}):\n"
             f"    return self.finish(self.inner({', '.join(call + ['**self.constants'])}))\n", scope)
        self.forward = scope["forward"].__get__(self)  # type: ignore[method-assign]

    def finish(self, out: Any) -> Any:
        # A transformers ModelOutput is a dict subclass: a plain dict loads without transformers.
        return dict(out.items()) if self.plain and isinstance(out, Mapping) and type(out) is not dict else out


def _export_inputs(inner: GraphModule, example_inputs: Any,
                   adapter_names: Optional[Sequence[str]]) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """The module ``export`` traces (the graph, or its mixed-adapter graph) and its example inputs."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(f"example_inputs must be a dict of keyword inputs or a tuple, got "
                        f"{type(example_inputs).__name__}")
    args, kwargs = _filled(inner, clone_inputs(args), clone_inputs(kwargs))
    if adapter_names is None:
        return inner, tuple(args), kwargs
    index = adapter_index(inner, adapter_names)
    first = _first_tensor(args, kwargs)
    if first is not None and first.shape[0] != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the example batch has "
                         f"{first.shape[0]} rows: give one name per example row")
    return mixed_graph(inner), tuple(args), {**kwargs, INDEX_INPUT: index}


def export(gm: nn.Module, example_inputs: Any, *, adapter_names: Optional[Sequence[str]] = None,
           dynamic: bool = True, plain_outputs: bool = True) -> torch.export.ExportedProgram:
    """A ``torch.export.ExportedProgram`` of ``gm`` as it is now: adapted, merged, or (with
    ``adapter_names``, one per example row) its mixed-adapter graph, whose program then takes the extra
    keyword ``vera_fx_adapter_index`` (``adapter_index(gm, names)``; row value ``k`` is the ``k``-th loaded
    adapter, the count of adapters is the base model).

    ``example_inputs``: a dict of keyword inputs (or a tuple of positional ones) as the graph takes them;
    non-tensor inputs (``use_cache=False``) are fixed at their values, the program takes the tensors only.
    With ``dynamic`` every tensor dimension is ``Dim.AUTO`` (export keeps it dynamic where it can). The mode
    (train / eval) and the sampling switches are fixed at export. With ``plain_outputs`` a transformers
    output object comes back as a plain dict (``out["logits"]``), so loading needs no transformers.
    ``torch.export.save`` / ``load`` round-trip it; running it needs only torch and ``vera_fx/runtime.py``
    (PVeRA's noise ops).
    """
    inner = as_graph_module(gm)
    lowered = any((n.meta.get(ADAPTER_KEY) or {}).get("path") not in (None, "activation")
                  for g in graph_modules(inner) for n in g.graph.nodes)
    if lowered:  # the lean / weight paths only change backward: a program runs the plain nodes (torch + runtime)
        setting = adapter_flags(inner).lowering
        set_lowering(inner, "activation")
        try:
            return export(inner, example_inputs, adapter_names=adapter_names, dynamic=dynamic,
                          plain_outputs=plain_outputs)
        finally:
            set_lowering(inner, setting["mode"] if setting else "auto", setting.get("tokens") if setting else None)
    module, args, kwargs = _export_inputs(inner, example_inputs, adapter_names)
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    module = _Constants(module, len(args), list(kwargs), constants, plain_outputs)
    dynamic_shapes: Any = None
    if dynamic:
        dyn_args, dyn_kwargs = dynamic_shapes_of(args, kwargs)
        dynamic_shapes = {**{f"arg{i}": d for i, d in enumerate(dyn_args)}, **dyn_kwargs}
    args = tuple(args)
    records = [(r, dict(r.values)) for r in _kl_records(inner)]
    try:
        ep = torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    finally:  # tracing ran the KL recorders on fake tensors: keep the last real forward's terms
        for record, values in records:
            record.values = values
    # Drop what no output needs (e.g. the KL term's op, recorded by a Python side effect at export time), so
    # the program calls only the ops it uses.
    if ep.graph_module.graph.eliminate_dead_code():
        ep.graph_module.recompile()
    logger.info("exported %s graph: %d nodes", "mixed" if adapter_names is not None else "adapted",
                len(ep.graph.nodes))
    return ep
