"""Several adapters on one graph: add, switch, delete and disable them without re-capture.

Switching rewrites the graph: an inactive adapter has no nodes (``remove_adapter_nodes``) and an active one
gets them back (``emit_adapter``), so inactive adapters cost nothing at run time and ``torch.compile`` sees a
plain graph (a switch recompiles it; it never graph-breaks). Several active adapters add up, as in PEFT.

State: the active list lives in ``gm.meta["vera_fx_active"]`` (absent: every adapter on the graph is active)
and the disabled flag in ``gm.meta["vera_fx_disabled"]``. Adapters of one method share one pair of
projections: a later adapter's ``<prefix>_A`` / ``<prefix>_B`` buffers are views of the largest existing
adapter's tensors, sliced to its own rank. ``modules_to_save`` copies belong to their adapter; the graph's
get_attr nodes point at the active adapter's copy, or back at the base parameters.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule

from .config import AdapterConfig
from .methods import CONTAINER, AdapterState, Method, method_for
from .sites import ADAPTER_KEY, MERGED_KEY, SITE_KEY, as_graph_module

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "active_adapters",
           "adapters_disabled", "shared_projections", "attach_modules_to_save", "resolve_modules_to_save",
           "modules_to_save_copy", "remove_adapter"]

logger = logging.getLogger(__name__)

ACTIVE_KEY = "vera_fx_active"
DISABLED_KEY = "vera_fx_disabled"
_MTS_TAG = "vera_fx_modules_to_save"  # node.meta of get_attr nodes reading a modules_to_save parameter


def _container(gm: GraphModule) -> nn.ModuleDict:
    container = getattr(gm, CONTAINER, None)
    return container if container is not None else nn.ModuleDict()


def active_adapters(gm: GraphModule) -> list[str]:
    """The names of the active adapters, in the order they were set (default: every adapter on the graph).

    The list does not change inside ``disable_adapters``; use ``adapters_disabled(gm)`` for that.
    """
    gm = as_graph_module(gm, "active_adapters")
    names = list(_container(gm).keys())
    chosen = gm.meta.get(ACTIVE_KEY)
    if chosen is None:
        return names
    return [n for n in chosen if n in names]


def adapters_disabled(gm: GraphModule) -> bool:
    """True inside ``with disable_adapters(gm):``."""
    gm = as_graph_module(gm, "adapters_disabled")
    return bool(gm.meta.get(DISABLED_KEY, False))


def _merged_adapters(gm: GraphModule) -> set[str]:
    return {a for names in (gm.meta.get(MERGED_KEY) or {}).values() for a in names}


def _check_not_merged(gm: GraphModule, names: Sequence[str], action: str) -> None:
    merged = sorted(set(names) & _merged_adapters(gm))
    if merged:
        raise ValueError(f"cannot {action}: adapters {merged} are merged into the base weights; unmerge them "
                         "first (vera_fx.unmerge)")


def _has_nodes(gm: GraphModule, name: str) -> bool:
    return any((n.meta.get(ADAPTER_KEY) or {}).get("adapter") == name for n in gm.graph.nodes)


# --- shared projections --------------------------------------------------------------------------------------

def shared_projections(gm: GraphModule, config: AdapterConfig, method: Method, in_max: int,
                       out_max: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The projections a new adapter of ``method`` reuses, or None when it is the first of its method.

    Every adapter uses views of the largest existing adapter's A and B, sliced to its own rank (A's first
    ``latent_rows`` rows, B's first ``r`` columns). Raises ValueError, before anything changes, when the
    new config's ``projection_prng_key`` or ``save_projection`` differs, when another adapter already trains
    biases, or when the new adapter needs larger projections or a higher ``r`` than exist.
    """
    container = _container(gm)
    others = [(n, s) for n, s in container.items()]
    for name, state in others:
        if config.bias != "none" and state.config.bias != "none":
            raise ValueError(f"bias={config.bias!r}: adapter {name!r} already trains biases (bias="
                             f"{state.config.bias!r}) and only one adapter per graph may; use bias='none'")
    peers = [(n, s) for n, s in others if s.method_name == method.name]
    if not peers:
        return None
    ref_name, ref = max(peers, key=lambda p: tuple(p[1].projection("A").shape) + tuple(p[1].projection("B").shape))
    first = ref.config
    if first.projection_prng_key != config.projection_prng_key:
        raise ValueError(f"projection_prng_key={config.projection_prng_key} differs from adapter {ref_name!r}'s "
                         f"({first.projection_prng_key}): all adapters of a graph share one pair of projections; "
                         f"use projection_prng_key={first.projection_prng_key}")
    if first.save_projection != config.save_projection:
        raise ValueError(f"save_projection={config.save_projection} differs from adapter {ref_name!r}'s "
                         f"({first.save_projection}): the shared projections are saved for all adapters or none; "
                         f"use save_projection={first.save_projection}")
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


# --- modules_to_save ------------------------------------------------------------------------------------------

def resolve_modules_to_save(gm: GraphModule, module_names: Sequence[str]) -> list[str]:
    """Module paths of ``gm`` named by ``modules_to_save`` (a path or its last components).

    Names that match nothing are skipped with a warning (PEFT's task types add names such as 'score' that
    a model may lack); ValueError when none matches.
    """
    found: list[str] = []
    for module_name in module_names:
        paths = [n for n, _ in gm.named_modules() if n and not n.startswith(CONTAINER)
                 and (n == module_name or n.endswith("." + module_name))]
        if not paths:
            logger.warning("modules_to_save: %r names no module of the graph; skipped", module_name)
        found.extend(p for p in paths if p not in found)
    if module_names and not found:
        raise ValueError(f"modules_to_save={list(module_names)!r} names no module of the graph; give module "
                         "names such as 'classifier' or 'score'")
    # A path inside another saved path is covered by it.
    return sorted(p for p in found if not any(p.startswith(q + ".") for q in found if q != p))


def _mts_key(path: str) -> str:
    return path.replace(".", "__")


def attach_modules_to_save(gm: GraphModule, adapter_name: str, module_names: Sequence[str]) -> list[str]:
    """Give adapter ``adapter_name`` trainable copies of the modules ``module_names`` names.

    The copies live at ``vera_fx_adapters.<adapter>.modules_to_save.<path with '__'>``; the graph reads them
    while the adapter is active, and the frozen base parameters otherwise. Returns the module paths.
    """
    paths = resolve_modules_to_save(gm, module_names)
    state = _container(gm)[adapter_name]
    copies = nn.ModuleDict()
    for path in paths:
        clone = copy.deepcopy(gm.get_submodule(path))
        for p in clone.parameters():
            p.requires_grad_(True)
        copies[_mts_key(path)] = clone
    state.modules_to_save = copies
    state.modules_to_save_paths = paths
    for node in gm.graph.nodes:
        if node.op != "get_attr" or _MTS_TAG in node.meta:
            continue
        owner = next((p for p in paths if str(node.target).startswith(p + ".")), None)
        if owner is not None:
            node.meta[_MTS_TAG] = {"path": owner, "target": node.target}
    _route_modules_to_save(gm, [] if adapters_disabled(gm) else active_adapters(gm))
    return paths


def modules_to_save_copy(state: AdapterState, path: str) -> nn.Module:
    """The adapter's trainable copy of the module at ``path``."""
    return state.modules_to_save[_mts_key(path)]


def _mts_owners(gm: GraphModule, live: Sequence[str]) -> dict[str, str]:
    """Module path -> the live adapter whose copy the graph should read; ValueError on a conflict."""
    container = _container(gm)
    owners: dict[str, str] = {}
    for name in live:
        for path in getattr(container[name], "modules_to_save_paths", []):
            if path in owners:
                raise ValueError(f"adapters {owners[path]!r} and {name!r} both have a trainable copy of {path!r} "
                                 "(modules_to_save); only one of them can be active at a time")
            owners[path] = name
    return owners


def _route_modules_to_save(gm: GraphModule, live: Sequence[str]) -> bool:
    owners = _mts_owners(gm, live)
    changed = False
    for node in gm.graph.nodes:
        tag = node.meta.get(_MTS_TAG)
        if tag is None:
            continue
        owner = owners.get(tag["path"])
        target = tag["target"]
        if owner is not None:
            rel = target[len(tag["path"]) + 1:]
            target = f"{CONTAINER}.{owner}.modules_to_save.{_mts_key(tag['path'])}.{rel}"
        if node.target != target:
            node.target = target
            changed = True
    return changed


# --- switching -------------------------------------------------------------------------------------------------

def _bias_params(gm: GraphModule, state: AdapterState) -> list[nn.Parameter]:
    from .checkpoint import bias_targets

    return [getattr(mod, attr) for mod, attr in bias_targets(gm, state).values()]


def _sync(gm: GraphModule) -> None:
    """Make the graph and ``requires_grad`` follow the active list and the disabled flag."""
    from .passes.inject import emit_adapter, remove_adapter_nodes

    container = _container(gm)
    active = active_adapters(gm)
    live = [] if adapters_disabled(gm) else active
    merged = _merged_adapters(gm)
    _mts_owners(gm, live)  # conflicts raise before anything changes
    changed = False
    missing = [n for n in live if n not in merged and not _has_nodes(gm, n)]
    for name in container:
        # Re-emitting every live adapter when one is missing keeps the sum in the active list's order, so one
        # active list always gives one graph (and bit-identical outputs).
        if name not in merged and (name not in live or missing) and _has_nodes(gm, name):
            remove_adapter_nodes(gm, name)
            changed = True
    for name in live:
        if name not in merged and not _has_nodes(gm, name):
            emit_adapter(gm, name)
            changed = True
    if _route_modules_to_save(gm, live) or changed:
        gm.graph.lint()
        gm.recompile()
    trainable_bias: set[int] = set()
    for name in active:
        state = container[name]
        if state.config.bias != "none":
            trainable_bias |= {id(p) for p in _bias_params(gm, state)}
    for name, state in container.items():
        on = name in active
        for p in state.sites.parameters():
            p.requires_grad_(on)
        mts = getattr(state, "modules_to_save", None)
        if mts is not None:
            for p in mts.parameters():
                p.requires_grad_(on)
        if state.config.bias != "none":
            for p in _bias_params(gm, state):
                p.requires_grad_(id(p) in trainable_bias)


def _check_names(gm: GraphModule, names: Sequence[str]) -> None:
    known = list(_container(gm).keys())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapters {unknown} are not on this graph; adapters: {known or 'none'}")


def set_adapter(gm: GraphModule, adapter_name: Union[str, Sequence[str]]) -> None:
    """Make ``adapter_name`` (one name or a list) the active adapters; several active adapters add up.

    Only the active adapters' lambdas (and ``modules_to_save`` copies) are trainable. No re-capture: the
    graph's adapter nodes are rewritten and the GraphModule recompiled.
    """
    gm = as_graph_module(gm, "set_adapter")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_name={adapter_name!r}: expected an adapter name or a non-empty list of names")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_name={names!r} names an adapter twice")
    _check_names(gm, names)
    before = active_adapters(gm)
    _check_not_merged(gm, sorted(set(before) ^ set(names)), "switch adapters")
    _mts_owners(gm, names)
    old = gm.meta.get(ACTIVE_KEY)
    gm.meta[ACTIVE_KEY] = names
    try:
        _sync(gm)
    except Exception:
        _restore_active(gm, old)
        raise
    logger.info("active adapters: %s", names)


def _restore_active(gm: GraphModule, old: Optional[list[str]]) -> None:
    if old is None:
        gm.meta.pop(ACTIVE_KEY, None)
    else:
        gm.meta[ACTIVE_KEY] = old


def add_adapter(gm: GraphModule, adapter_name: str, config: AdapterConfig) -> None:
    """Add adapter ``adapter_name`` with ``config`` to a transformed graph, without re-capture.

    As in PEFT, the new adapter is inactive when the graph already has one (``set_adapter`` activates it);
    it shares the existing adapters' projections (see ``shared_projections`` for the rules).
    """
    gm = as_graph_module(gm, "add_adapter")
    from .passes.inject import InjectPass
    from .passes.match import MatchPass
    from .passes.pipeline import _run

    method_for(config)
    if config.modules_to_save:
        resolve_modules_to_save(gm, config.modules_to_save)  # fail before anything changes
    passes: list = [InjectPass(config, adapter_name)]
    if not any(SITE_KEY in n.meta for n in gm.graph.nodes):
        passes.insert(0, MatchPass())
    had = list(_container(gm).keys())
    old = gm.meta.get(ACTIVE_KEY)
    if had:
        gm.meta[ACTIVE_KEY] = active_adapters(gm)  # the new adapter stays out of the active list
    else:
        gm.meta.pop(ACTIVE_KEY, None)  # the first adapter is active
    try:
        _run(gm, passes)
    except Exception:
        _restore_active(gm, old)
        raise
    _sync(gm)
    logger.info("added adapter %r (%s)%s", adapter_name, type(config).__name__,
                "" if not had else "; inactive until set_adapter")


def delete_adapter(gm: GraphModule, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``: its nodes, lambdas and ``modules_to_save`` copies.

    The other adapters keep their values and their active state. Biases it trained (bias='all' /
    '<method>_only') keep their trained values, as in PEFT, and are frozen again.
    """
    gm = as_graph_module(gm, "delete_adapter")
    _check_names(gm, [adapter_name])
    _check_not_merged(gm, [adapter_name], f"delete adapter {adapter_name!r}")
    bias = _container(gm)[adapter_name].config.bias
    if bias != "none":
        logger.warning("adapter %r trained biases (bias=%r); they keep their values after deletion",
                       adapter_name, bias)
    was_active = adapter_name in active_adapters(gm)
    remove_adapter(gm, adapter_name)
    left = list(_container(gm).keys())
    if was_active and left and not active_adapters(gm):
        # PEFT activates a remaining adapter (and says so) rather than leaving nothing to train.
        warnings.warn(f"adapter {adapter_name!r} was active and is now deleted; the active adapter is now "
                      f"{left[0]!r}", UserWarning, stacklevel=2)
        set_adapter(gm, left[0])
    logger.info("deleted adapter %r", adapter_name)


def remove_adapter(gm: GraphModule, adapter_name: str) -> None:
    """``delete_adapter`` without checks or messages (also undoes a failed ``load_adapter``)."""
    from .passes.inject import remove_adapter_nodes

    container = _container(gm)
    state = container[adapter_name]
    if state.config.bias != "none":
        for p in _bias_params(gm, state):
            p.requires_grad_(False)
    if _has_nodes(gm, adapter_name):
        remove_adapter_nodes(gm, adapter_name)
    old = gm.meta.get(ACTIVE_KEY)
    if old is not None:
        gm.meta[ACTIVE_KEY] = [n for n in old if n != adapter_name]
    _route_modules_to_save(gm, [n for n in ([] if adapters_disabled(gm) else active_adapters(gm))
                                if n != adapter_name])
    del container[adapter_name]
    if len(container) == 0:
        gm.meta.pop(ACTIVE_KEY, None)  # the next adapter added is active again
    gm.graph.lint()
    gm.recompile()
    _sync(gm)


@contextmanager
def disable_adapters(gm: GraphModule) -> Iterator[GraphModule]:
    """Inside the block the graph computes the base model: adapter nodes are removed and ``modules_to_save``
    reads the base parameters; on exit the active adapters come back. Trained biases stay (as in PEFT)."""
    gm = as_graph_module(gm, "disable_adapters")
    if adapters_disabled(gm):
        yield gm
        return
    _check_not_merged(gm, active_adapters(gm), "disable adapters")
    biased = [n for n in active_adapters(gm) if _container(gm)[n].config.bias != "none"]
    if biased:
        logger.warning("adapters %s train biases; disabling adapters keeps the trained biases, so outputs are not "
                       "the base model's", biased)
    gm.meta[DISABLED_KEY] = True
    try:
        _sync(gm)
        yield gm
    finally:
        gm.meta[DISABLED_KEY] = False
        _sync(gm)
