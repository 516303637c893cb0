"""Adapter state on a graph, below the passes: the adapter set at ``gm.vera_fx_adapters`` (its lock and flags),
the adapters' train / eval flag, the shared projections, ``modules_to_save`` copies and the biases ``bias`` trains.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn
from torch.fx import GraphModule

from .config import TASK_MODULES_TO_SAVE, AdapterConfig
from .methods import CONTAINER, AdapterSet, AdapterState, AdapterView, Method
from .versions import StateLock
from .sites import as_graph_module, block_prefix, graph_modules, qualified_name, read_graph_sites, read_sites

logger = logging.getLogger(__name__)
T = TypeVar("T")

MTS_TAG = "vera_fx_modules_to_save"  # node.meta of get_attr nodes reading a modules_to_save parameter
ADAPTER_MODE = "vera_fx_adapter_mode"  # the submodule of each graph whose ``training`` the adapter nodes read
PEFT_ROOT = "base_model.model."
_PLACED = "_vera_fx_placed"  # AdapterState.__dict__: its sites have their owner (the first graph attached)


class AdapterMode(nn.Module):
    """The adapters' train / eval flag of one graph: a submodule, so ``gm.train()`` / ``.eval()`` set it, yet it
    starts in training mode in a model in eval mode, as PEFT's new adapter layers do."""


def adapter_mode_module(gm: GraphModule, training: bool = True) -> AdapterMode:
    """``gm``'s AdapterMode (this graph only, not its blocks), created with ``training`` when missing."""
    if ADAPTER_MODE not in gm._modules:
        gm.add_module(ADAPTER_MODE, AdapterMode())
        gm._modules[ADAPTER_MODE].training = training
    return gm._modules[ADAPTER_MODE]


def adapters_training(gm: nn.Module) -> bool:
    """Whether the adapters of ``gm`` (a graph or the model object) train (the graph's mode before any adapter)."""
    gm = as_graph_module(gm, "adapters_training")
    mode = gm._modules.get(ADAPTER_MODE)
    return bool(mode.training) if mode is not None else bool(gm.training)


def set_adapters_training(gm: nn.Module, training: bool) -> None:
    """Set the adapters' train / eval flag in every graph of ``gm``'s tree, leaving the base model's mode."""
    if not isinstance(training, bool):
        raise TypeError(f"training={training!r}: expected True or False")
    for g in graph_modules(as_graph_module(gm, "set_adapters_training")):
        mode = g._modules.get(ADAPTER_MODE)
        if mode is not None:
            mode.training = training


def adapters_of(gm: GraphModule) -> AdapterSet:
    """The graph's adapter set with its lock and flags, or an empty one when it has none (read-only use)."""
    container = getattr(gm, CONTAINER, None)
    return container if container is not None else AdapterSet()


def adapter_container(gm: GraphModule) -> AdapterSet:
    """The graph's container of AdapterState modules, created (empty) when missing."""
    if getattr(gm, CONTAINER, None) is None:
        gm.add_module(CONTAINER, AdapterSet())
    return getattr(gm, CONTAINER)


def state_lock(gm: Any, fn: str = "state_lock") -> StateLock:
    """The lock of the adapter state ``gm`` (a model object or its graph) computes over (``fn``: for errors)."""
    return adapters_of(as_graph_module(gm, fn)).lock


def _holding(side: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def locked(gm: Any, *args: Any, **kwargs: Any) -> T:
            with getattr(state_lock(gm, fn.__name__), side)():
                return fn(gm, *args, **kwargs)
        return locked
    return decorate


mutation = _holding("write")  # a change: no forward of the same adapter state runs meanwhile
reads_state = _holding("read")  # several forwards (``generate``) on one adapter state throughout


def active_adapters(gm: GraphModule) -> list[str]:
    """The active adapters in the order they were set (default: all); unchanged inside ``disable_adapters``."""
    container = adapters_of(as_graph_module(gm, "active_adapters"))
    chosen = container.flags.active
    return list(container) if chosen is None else [n for n in chosen if n in container]


def adapters_disabled(gm: GraphModule) -> bool:
    """True inside ``with disable_adapters(gm):``."""
    return adapters_of(as_graph_module(gm, "adapters_disabled")).flags.disabled


def merged_adapters(gm: GraphModule) -> set[str]:
    """Adapters merged into the base weights at one site or more."""
    return {a for names in adapters_of(gm).flags.merged.values() for a in names}


def shared_projections(gm: GraphModule, config: AdapterConfig, method: Method, in_max: int,
                       out_max: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Views of the largest existing adapter's A and B for a new adapter of ``method`` (None for the first of its
    method); ValueError, before anything changes, when they cannot be shared."""
    others = list(adapters_of(gm).items())
    for name, state in others:
        if config.bias != "none" and state.config.bias != "none":
            raise ValueError(f"bias={config.bias!r}: adapter {name!r} already trains biases (bias="
                             f"{state.config.bias!r}) and only one adapter per graph may; use bias='none'")
    peers = [(n, s) for n, s in others if s.method_name == method.name]
    if not peers:
        return None
    ref_name, ref = max(peers, key=lambda p: tuple(p[1].projection("A").shape) + tuple(p[1].projection("B").shape))
    first = ref.config
    for field, why in (("projection_prng_key", "all adapters of a graph share one pair of projections"),
                       ("save_projection", "the shared projections are saved for all adapters or none")):
        if getattr(first, field) != getattr(config, field):
            raise ValueError(f"{field}={getattr(config, field)} differs from adapter {ref_name!r}'s "
                             f"({getattr(first, field)}): {why}; use {field}={getattr(first, field)}")
    a, b = ref.projection("A"), ref.projection("B")
    if a.shape[1] < in_max or b.shape[0] < out_max:
        raise ValueError(f"the new adapter's layers need projections of at least {in_max} inputs x {out_max} "
                         f"outputs, but the shared ones (adapter {ref_name!r}) have {a.shape[1]} x {b.shape[0]}: "
                         "add the adapter that targets the largest layers first, or target the same modules")
    rows = method.latent_rows(config)
    if a.shape[0] < rows or b.shape[1] < config.r:
        raise ValueError(f"r={config.r} is higher than r={first.r} of adapter {ref_name!r}, whose projections "
                         f"all adapters share: add the adapter with the highest r first, or use r <= {first.r}")
    return a[:rows], b[:, : config.r]


def block_site_names(gm: GraphModule) -> list[tuple[GraphModule, str, set[str]]]:
    """(block graph, its path, the names of its own sites) for every block of ``gm``'s tree (``attach_state``)."""
    return [(g, block_prefix(g), {s.name for s in read_graph_sites(g)}) for g in graph_modules(gm)[1:]]


def attach_state(gm: GraphModule, adapter_name: str, state: AdapterState,
                 blocks: Optional[list[tuple[GraphModule, str, set[str]]]] = None) -> None:
    """Register ``state`` at the root of ``gm``'s tree and an ``AdapterView`` in every block holding some of its
    sites or ``modules_to_save`` copies. In the first graph attached a block's sites live in its view only (the
    root links to them), so ``named_parameters()``, ``state_dict()`` and FSDP2 see each tensor once."""
    adapter_container(gm)[adapter_name] = state
    mods = gm._modules  # the container first (``named_parameters()`` order, for optimizers); the object shares it
    if next(iter(mods)) != CONTAINER:
        mods.update({k: mods.pop(k) for k in list(mods) if k != CONTAINER})
    owner, wanted = not state.__dict__.get(_PLACED, False), set(state.site_names)
    saved = getattr(state, "modules_to_save_paths", None) or []
    for g, prefix, names in blocks if blocks is not None else block_site_names(gm):
        own = names & wanted
        if adapter_name not in adapter_container(g) and (
                own or any(p == prefix or p.startswith(prefix + ".") for p in saved)):
            adapter_container(g)[adapter_name] = AdapterView(state, sorted(own), prefix)
            for site in own if owner else ():
                state.unregister_site(site)
    state.__dict__[_PLACED] = True


def detach_state(gm: GraphModule, adapter_name: str) -> None:
    """Remove ``adapter_name``'s state from the root and its views from the blocks."""
    for container in (adapters_of(g) for g in graph_modules(gm)):
        if adapter_name in container:
            del container[adapter_name]


def restore_active(gm: GraphModule, old: Optional[list[str]]) -> None:
    """Put back the active list read before a failed change (``None``: there was none)."""
    adapter_container(gm).flags.active = old


TASK_NAMES = {name for names in TASK_MODULES_TO_SAVE.values() for name in names}


def resolve_modules_to_save(gm: GraphModule, module_names: Sequence[str]) -> list[str]:
    """Module paths of ``gm`` named by ``modules_to_save`` (a path or its last components); a name matching nothing
    is skipped with a warning (PEFT's task types add names such as 'score'), ValueError when none matches."""
    found: list[str] = []
    for module_name in module_names:
        paths = [n for n, _ in gm.named_modules() if n and CONTAINER not in n.split(".")
                 and (n == module_name or n.endswith("." + module_name))]
        if not paths:  # a task type's default name the model lacks (BERT has no 'score') is no news
            logger.log(logging.DEBUG if module_name in TASK_NAMES else logging.WARNING,
                       "modules_to_save: %r names no module of the graph; skipped", module_name)
        found.extend(p for p in paths if p not in found)
    if module_names and not found:
        raise ValueError(f"modules_to_save={list(module_names)!r} names no module of the graph; give module "
                         "names such as 'classifier' or 'score'")
    # A path inside another saved path is covered by it.
    return sorted(p for p in found if not any(p.startswith(q + ".") for q in found if q != p))


def _mts_key(path: str) -> str:
    return path.replace(".", "__")


def attach_modules_to_save(gm: GraphModule, adapter_name: str, module_names: Sequence[str]) -> list[str]:
    """Give adapter ``adapter_name`` trainable copies (``<adapter>.modules_to_save.<path with '__'>``) of the
    modules ``module_names`` names, read while it is active; returns their paths."""
    paths = resolve_modules_to_save(gm, module_names)
    state = adapters_of(gm)[adapter_name]
    state.modules_to_save = nn.ModuleDict({_mts_key(p): copy.deepcopy(gm.get_submodule(p)).requires_grad_(True)
                                           for p in paths})
    state.modules_to_save_paths = paths
    tag_modules_to_save(gm, paths)
    attach_state(gm, adapter_name, state)  # a block holding a copied module reads it through a view
    route_modules_to_save(gm, [] if adapters_disabled(gm) else active_adapters(gm))
    return paths


def tag_modules_to_save(gm: GraphModule, paths: Sequence[str]) -> None:
    """Tag the get_attr nodes of ``gm``'s tree (blocks' targets are relative to them) reading inside ``paths``."""
    for g in graph_modules(gm) if paths else []:
        for node in (n for n in g.graph.nodes if n.op == "get_attr" and MTS_TAG not in n.meta):
            if any(qualified_name(g, str(node.target)).startswith(p + ".") for p in paths):
                node.meta[MTS_TAG] = {"target": node.target}  # the owning path is found when routed


def modules_to_save_copy(state: AdapterState, path: str) -> nn.Module:
    """The adapter's trainable copy of the module at ``path``."""
    return state.modules_to_save[_mts_key(path)]


def modules_to_save_owners(gm: GraphModule, live: Sequence[str]) -> dict[str, str]:
    """Module path -> the live adapter whose copy the graph should read; ValueError when two live adapters copy
    one module (the same path, or one inside the other's)."""
    container = adapters_of(gm)
    owners: dict[str, str] = {}
    for name in live:
        for path in getattr(container[name], "modules_to_save_paths", []):
            clash = next((p for p in owners if p == path or path.startswith(p + ".") or p.startswith(path + ".")),
                         None)
            if clash is not None:
                raise ValueError(f"adapters {owners[clash]!r} and {name!r} both have a trainable copy of "
                                 f"{min(clash, path, key=len)!r} (modules_to_save {clash!r} and {path!r}); only "
                                 "one of them can be active at a time")
            owners[path] = name
    return owners


def route_modules_to_save(gm: GraphModule, live: Sequence[str]) -> bool:
    """Point the modules_to_save get_attr nodes at the ``live`` adapters' copies (else at the base parameters);
    returns whether a target changed (the caller recompiles the root)."""
    owners = modules_to_save_owners(gm, live)
    changed = False
    for g in graph_modules(gm):
        here = False
        for node in (n for n in g.graph.nodes if MTS_TAG in n.meta):
            target = node.meta[MTS_TAG]["target"]  # the base tensor the capture read
            full = qualified_name(g, target)
            path = next((p for p in owners if full.startswith(p + ".")), None)  # owners' paths never nest
            if path is not None:
                rel = full[len(path) + 1:]
                target = f"{CONTAINER}.{owners[path]}.modules_to_save.{_mts_key(path)}.{rel}"
            if node.target != target:
                node.target = target
                here = True
        if here and g is not gm:
            g.recompile()  # the caller recompiles the root
        changed = changed or here
    return changed


def bias_targets(gm: GraphModule, state: AdapterState) -> dict[str, tuple[nn.Module, str]]:
    """PEFT key -> (module, attribute) of the base biases ``state``'s ``bias`` mode trains: ``"all"``, every
    ``bias`` outside the adapters and ``modules_to_save`` copies; ``"<method>_only"``, its own sites'."""
    mode = state.config.bias
    if mode == "none":
        return {}
    # PEFT wraps every targeted module: its bias sits under ``base_layer``
    wrapped = {s for st in adapters_of(gm).values() for s in st.site_names}
    mts_paths = list(getattr(state, "modules_to_save_paths", []))
    if mode == "all":
        names = [q for q, _ in gm.named_parameters() if q.rpartition(".")[2] == "bias"
                 and not q.startswith(CONTAINER + ".") and not any(q.startswith(m + ".") for m in mts_paths)]
    else:
        own = set(state.site_names)
        names = list(dict.fromkeys(s.bias for s in read_sites(gm) if s.name in own and s.bias is not None))
    out: dict[str, tuple[nn.Module, str]] = {}
    for qualname in names:
        path, _, leaf = qualname.rpartition(".")
        mod = gm.get_submodule(path)
        if isinstance(mod._parameters.get(leaf), nn.Parameter):
            out[f"{PEFT_ROOT}{path}.base_layer.{leaf}" if path in wrapped else PEFT_ROOT + qualname] = (mod, leaf)
    return out
