"""Serving many adapters: ``mixed_adapter_forward`` (row ``i`` runs adapter ``adapter_names[i]``: the bank pass over
the inference twin, built once per adapter set), ``load_adapters`` (many folders at once, each checked as
``load_adapter`` does, no graph rewrite per adapter, all or nothing) and ``export`` (an ``ExportedProgram`` of the
adapted, merged or mixed graph that runs with torch and ``vera_fx/runtime.py`` alone).
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
from .signatures import InputCheck, clone_inputs, dynamic_shapes_of, remove_input_check
from .checkpoint import WEIGHTS_NAME, PathLike, apply_plan, plan_load, read_checkpoint
from .config import AdapterConfig
from .eager_generation import kl_terms_kept
from .methods import CONTAINER, AdapterState, method_for
from .passes.attach import strip_adapters
from .passes.bank import BASE_ADAPTER, INDEX_INPUT, bank_order, bank_tree, check_bankable
from .passes.inject import new_state
from .passes.match import MatchPass, select_sites
from .sites import ADAPTER_KEY, SITE_KEY, as_graph_module, graph_modules
from .variants import FINGERPRINT_KEY, INFERENCE_FORM, inference_twin
from .versions import adapter_flags
from .state import (adapter_container, adapters_of, attach_state, block_site_names, detach_state, mutation,
                    reads_state, restore_active, shared_projections)

logger = logging.getLogger(__name__)


def mixed_graph(gm: nn.Module) -> GraphModule:
    """The mixed-adapter graph of ``gm`` (inputs + ``vera_fx_adapter_index``): the bank pass over ``gm``'s inference
    twin stripped of its adapter nodes, built once per adapter structure (it stacks the adapters' own lambdas at
    call time, so training needs no rebuild); ValueError: ``check_bankable``."""
    inner = as_graph_module(gm)
    check_bankable(inner)
    container = adapters_of(inner)
    key = (id(container),) + tuple((name, state.method_name, state.config.r, tuple(state.site_names))
                                   for name, state in container.items())
    return container.versions.derived(inner, "mixed", key, lambda: _build_mixed(inner))


def _build_mixed(inner: GraphModule) -> GraphModule:
    twin = inference_twin(inner, INFERENCE_FORM, (FINGERPRINT_KEY,))
    remove_input_check(twin)  # the caller fills the inputs (``_filled``), the index is one more
    strip_adapters(twin)
    return bank_tree(twin)


def adapter_index(gm: nn.Module, adapter_names: Sequence[str]) -> torch.Tensor:
    """The ``vera_fx_adapter_index`` input for ``adapter_names`` (one per row; ``"__base__"``: the base model)."""
    inner = as_graph_module(gm)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names={adapter_names!r}: expected a list of adapter names, one per row")
    order = bank_order(inner)
    position = {name: k for k, name in enumerate([*order, BASE_ADAPTER])}
    unknown = sorted({n for n in adapter_names if n not in position})
    if unknown:
        raise ValueError(f"adapter_names names adapters that are not loaded: {unknown}; loaded adapters: "
                         f"{order or 'none'} (and {BASE_ADAPTER!r} for the base model)")
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    return torch.tensor([position[n] for n in adapter_names], dtype=torch.long, device=device)


def _filled(inner: GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    signature = inner.meta.get("vera_fx_signature")
    return InputCheck(signature)(inner, args, kwargs) if signature is not None else (args, kwargs)


def _mixed_inputs(inner: GraphModule, adapter_names: Sequence[str], args: tuple, kwargs: dict,
                  what: str = "batch") -> tuple[GraphModule, tuple, dict]:
    """The mixed graph of ``inner`` and its filled inputs, with the index of ``adapter_names`` (one per row)."""
    index = adapter_index(inner, adapter_names)
    if INDEX_INPUT in kwargs:
        raise TypeError(f"{INDEX_INPUT!r} is set from adapter_names; do not pass it")
    mixed = mixed_graph(inner)
    args, kwargs = _filled(inner, args, kwargs)
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    if first is not None and (first.dim() == 0 or first.shape[0] != len(adapter_names)):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the {what} has "
                         f"{first.shape[0] if first.dim() else 'no'} rows: give one adapter name per row")
    return mixed, tuple(args), {**kwargs, INDEX_INPUT: index}


@reads_state
def mixed_adapter_forward(gm: nn.Module, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
    """One eval-mode forward of a batch in which row ``i`` uses adapter ``adapter_names[i]`` (``"__base__"``: the
    base model), as ``m(**inputs, adapter_names=[...])``; each row equals that row run alone with its adapter
    active (PVeRA rows sample with their adapter's switches and noise stream, in row order). The active list
    is ignored."""
    inner = as_graph_module(gm)
    if inner.training:
        raise ValueError("adapter_names= runs a mixed-adapter batch, which is for inference (as in PEFT): call "
                         "gm.eval() first")
    mixed, args, kwargs = _mixed_inputs(inner, adapter_names, args, kwargs)
    return mixed(*args, **kwargs)


def _new_state(gm: GraphModule, config: AdapterConfig, sites_cache: dict, projections_cache: dict) -> AdapterState:
    """An adapter's frozen state without graph nodes, its projections shared with its method's other adapters."""
    method = method_for(config)
    key = (type(config).__name__, repr(config.target_modules), repr(config.layers_to_transform),
           repr(config.layers_pattern))
    if key not in sites_cache:
        sites_cache[key] = select_sites(gm, config)
    chosen = sites_cache[key]
    in_max, out_max = max(s.in_features for s in chosen), max(s.out_features for s in chosen)
    # equal requests reuse the first answer (shared_projections reads every adapter: K loads would be O(K^2))
    proj_key = (method.name, config.projection_prng_key, config.save_projection, method.latent_rows(config),
                config.r, in_max, out_max)
    if projections_cache.get(proj_key) is None:
        projections_cache[proj_key] = shared_projections(gm, config, method, in_max, out_max)
    return new_state(gm, config, chosen, projections_cache[proj_key], trainable=False)


def _load_one(inner: GraphModule, name: str, folder: PathLike, caches: tuple[dict, dict],
              blocks: Any, added: list[str]) -> None:
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
    """Load ``{adapter name: folder}`` (PEFT or vera_fx) at once, each checked as ``load_adapter`` does and added
    inactive without graph nodes (a graph with no adapter activates the first); returns the names. Lambdas only
    (no ``modules_to_save``, ``bias="none"``). All or nothing: on an error the ValueError names the folder."""
    inner = as_graph_module(gm)
    if not isinstance(folders, Mapping) or not folders:
        raise TypeError(f"folders must be a non-empty dict {{adapter name: folder}}, got {folders!r}")
    had_container = getattr(inner, CONTAINER, None) is not None
    container = adapter_container(inner)
    existing = list(container)
    for name in folders:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter name {name!r} is invalid: use a Python identifier such as 'task_a'")
        if name in container or name == BASE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is already on this graph (or reserved); choose another name "
                             "or delete it first")
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
        for g in graph_modules(inner) if not had_container else []:
            g._modules.pop(CONTAINER, None)
        raise
    finally:
        if gc_was_on:
            gc.enable()
    if existing:
        keep = old_active if old_active is not None else existing
        container.flags.active = [n for n in keep if n in existing]
    else:
        set_adapter(inner, added[0])
    logger.info("loaded %d adapters", len(added))
    return added


class _Constants(nn.Module):
    """``inner`` with its non-tensor keywords (``use_cache=False``) fixed, through a forward with one named
    parameter per tensor input: the exported program takes the tensor inputs only."""

    def __init__(self, inner: nn.Module, n_args: int, names: Sequence[str], constants: dict[str, Any],
                 plain: bool) -> None:
        super().__init__()
        self.inner, self.constants, self.plain = inner, constants, plain
        params = [f"arg{i}" for i in range(n_args)] + list(names)
        call = [f"arg{i}" for i in range(n_args)] + [f"{n}={n}" for n in names]
        scope: dict[str, Any] = {}
        exec(f"def forward(self, {', '.join(params)}):\n"
             f"    return self.finish(self.inner({', '.join(call + ['**self.constants'])}))\n", scope)
        self.forward = scope["forward"].__get__(self)  # type: ignore[method-assign]

    def finish(self, out: Any) -> Any:
        # A transformers ModelOutput is a dict subclass: a plain dict loads without transformers.
        return dict(out.items()) if self.plain and isinstance(out, Mapping) and type(out) is not dict else out


def export(gm: nn.Module, example_inputs: Any, *, adapter_names: Optional[Sequence[str]] = None,
           dynamic: bool = True, plain_outputs: bool = True) -> torch.export.ExportedProgram:
    """A ``torch.export.ExportedProgram`` of ``gm`` as it is now: adapted, merged, or (with ``adapter_names``, one
    per example row) its mixed-adapter graph, which takes the keyword ``vera_fx_adapter_index``.

    ``example_inputs``: a dict of keyword inputs or a tuple; non-tensor inputs (``use_cache=False``) are fixed,
    as are the mode and the sampling switches. ``dynamic``: every tensor dimension ``Dim.AUTO``.
    ``plain_outputs``: a transformers output comes back as a plain dict (loading needs no transformers)."""
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
    if not isinstance(example_inputs, (dict, tuple, list)):
        raise TypeError(f"example_inputs must be a dict of keyword inputs or a tuple, got "
                        f"{type(example_inputs).__name__}")
    args, kwargs = ((), clone_inputs(dict(example_inputs))) if isinstance(example_inputs, dict) else (
        clone_inputs(tuple(example_inputs)), {})
    if adapter_names is not None:
        module, args, kwargs = _mixed_inputs(inner, adapter_names, args, kwargs, "example batch")
    else:
        module, (args, kwargs) = inner, _filled(inner, args, kwargs)
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    module = _Constants(module, len(args), list(kwargs), constants, plain_outputs)
    dynamic_shapes: Any = None
    if dynamic:
        dyn_args, dyn_kwargs = dynamic_shapes_of(args, kwargs)
        dynamic_shapes = {**{f"arg{i}": d for i, d in enumerate(dyn_args)}, **dyn_kwargs}
    with kl_terms_kept(inner):  # tracing runs the KL recorders on fake tensors: keep the last real forward's terms
        ep = torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    # Drop what no output needs (the KL term's op, recorded by a side effect), so the program calls only its ops.
    if ep.graph_module.graph.eliminate_dead_code():
        ep.graph_module.recompile()
    logger.info("exported %s graph: %d nodes", "mixed" if adapter_names is not None else "adapted",
                len(ep.graph.nodes))
    return ep
