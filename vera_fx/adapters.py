"""Several adapters on one graph: add, switch, delete and disable them without re-capture. An inactive adapter has
no nodes (it costs nothing at run time); active adapters add up, as in PEFT."""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

from torch import nn
from torch.fx import GraphModule

from .config import AdapterConfig, as_config
from .methods import AdapterState
from .variants import state_fingerprint
from .passes.inject import InjectPass, emit_adapter, remove_adapter_nodes
from .passes.lower import check_lowering
from .passes.match import MatchPass
from .passes.pipeline import run_passes
from .sites import ADAPTER_KEY, SITE_KEY, adapter_nodes, as_graph_module, graph_modules
from .state import (adapters_of, active_adapters, adapter_container, adapters_disabled, bias_targets, detach_state,
                    merged_adapters, modules_to_save_owners, mutation, resolve_modules_to_save, route_modules_to_save)

logger = logging.getLogger(__name__)


def _check_not_merged(gm: GraphModule, names: Sequence[str], action: str) -> None:
    merged = sorted(set(names) & merged_adapters(gm))
    if merged:
        raise ValueError(f"cannot {action}: adapters {merged} are merged into the base weights; unmerge them "
                         "first (vera_fx.unmerge)")


@contextmanager
def _setting(gm: GraphModule, flag: str, value: object) -> Iterator[None]:
    """Set one of the adapter set's flags for the block's work; put back the old value when it fails."""
    flags = adapter_container(gm).flags
    old = getattr(flags, flag)
    setattr(flags, flag, value)
    try:
        yield
    except Exception:
        setattr(flags, flag, old)
        raise


def _bias_params(gm: GraphModule, state: AdapterState) -> list[nn.Parameter]:
    return [getattr(mod, attr) for mod, attr in bias_targets(gm, state).values()]


def _sync(gm: GraphModule, before: Optional[tuple] = None) -> None:
    """Make the graph tree and ``requires_grad`` follow the active list and the disabled flag; ``before``: the
    ``state_fingerprint`` before the change."""
    container = adapters_of(gm)
    active = active_adapters(gm)
    live = [] if adapters_disabled(gm) else active
    modules_to_save_owners(gm, live)  # conflicts raise before anything changes
    adapter_container(gm).versions.switch(gm, graph_modules(gm), before, state_fingerprint(gm),
                                          lambda: _emit_live(gm, live))
    trainable_bias = {id(p) for name in active for p in _bias_params(gm, container[name])}
    for name, state in container.items():
        mts = getattr(state, "modules_to_save", None)
        for p in [*state.lambda_parameters(), *(mts.parameters() if mts is not None else ())]:
            p.requires_grad_(name in active)
        for p in _bias_params(gm, state):  # (none unless the adapter trains biases)
            p.requires_grad_(id(p) in trainable_bias)


def _emit_live(gm: GraphModule, live: list[str]) -> None:
    """Give the graph tree the nodes of exactly the live adapters that are not merged."""
    container, merged, changed = adapters_of(gm), merged_adapters(gm), False
    missing = [n for n in live if n not in merged and not adapter_nodes(gm, adapter=n)]
    leaving = [n for n in container if n not in merged and n not in live and adapter_nodes(gm, adapter=n)]
    for name in container:
        # Re-emitting every live adapter when one is missing or leaves keeps the sum in the active list's order
        # and each adapter's lowering what the list gives it (a call folds its first adapter only), so one
        # active list always gives one graph (and bit-identical outputs).
        if name not in merged and (name not in live or missing or leaving) and adapter_nodes(gm, adapter=name):
            remove_adapter_nodes(gm, name)
            changed = True
    for name in live:
        if name not in merged and not adapter_nodes(gm, adapter=name):
            emit_adapter(gm, name)
            changed = True
    if route_modules_to_save(gm, live) or changed:
        gm.graph.lint()
        gm.recompile()


def _check_names(gm: GraphModule, names: Sequence[str]) -> None:
    known = list(adapters_of(gm).keys())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapters {unknown} are not on this graph; adapters: {known or 'none'}")


@mutation
def set_adapter(gm: GraphModule, adapter_name: Union[str, Sequence[str]]) -> None:
    """Make ``adapter_name`` (one name or a list: they add up) the active adapters, the only ones trainable."""
    gm = as_graph_module(gm, "set_adapter")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name) \
        if isinstance(adapter_name, (list, tuple)) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_name={adapter_name!r}: expected an adapter name or a non-empty list of names")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_name={names!r} names an adapter twice")
    _check_names(gm, names)
    _check_not_merged(gm, sorted(set(active_adapters(gm)) ^ set(names)), "switch adapters")
    modules_to_save_owners(gm, names)
    before = state_fingerprint(gm)
    with _setting(gm, "active", names):
        _sync(gm, before)
    logger.info("active adapters: %s", names)


@mutation
def add_adapter(gm: GraphModule, adapter_name: str, config: AdapterConfig) -> None:
    """Add adapter ``adapter_name`` with ``config`` (ours or PEFT's), without re-capture. As in PEFT it is
    inactive when the graph already has one; it shares the existing adapters' projections."""
    gm = as_graph_module(gm, "add_adapter")
    config = as_config(config)
    if config.modules_to_save:
        resolve_modules_to_save(gm, config.modules_to_save)  # fail before anything changes
    passes: list = [InjectPass(config, adapter_name)]
    if not any(SITE_KEY in n.meta for g in graph_modules(gm) for n in g.graph.nodes):
        passes.insert(0, MatchPass())
    had = list(adapters_of(gm).keys())
    with _setting(gm, "active", active_adapters(gm) if had else None):
        run_passes(gm, passes)
    _sync(gm)
    logger.info("added adapter %r (%s)%s", adapter_name, type(config).__name__,
                "" if not had else "; inactive until set_adapter")


@mutation
def delete_adapter(gm: GraphModule, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` (nodes, lambdas, ``modules_to_save`` copies); biases it trained keep
    their values, as in PEFT, and are frozen again."""
    gm = as_graph_module(gm, "delete_adapter")
    _check_names(gm, [adapter_name])
    _check_not_merged(gm, [adapter_name], f"delete adapter {adapter_name!r}")
    bias = adapters_of(gm)[adapter_name].config.bias
    if bias != "none":
        logger.warning("adapter %r trained biases (bias=%r); they keep their values after deletion",
                       adapter_name, bias)
    was_active = adapter_name in active_adapters(gm)
    remove_adapter(gm, adapter_name)
    left = list(adapters_of(gm).keys())
    if was_active and left and not active_adapters(gm):
        # PEFT activates a remaining adapter (and says so) rather than leaving nothing to train.
        warnings.warn(f"adapter {adapter_name!r} was active and is now deleted; the active adapter is now "
                      f"{left[0]!r}", UserWarning, stacklevel=2)
        set_adapter(gm, left[0])
    logger.info("deleted adapter %r", adapter_name)


def remove_adapter(gm: GraphModule, adapter_name: str) -> None:
    """``delete_adapter`` without checks or messages (undoes a failed ``load_adapter`` too)."""
    container = adapters_of(gm)
    for p in _bias_params(gm, container[adapter_name]):
        p.requires_grad_(False)
    if adapter_nodes(gm, adapter=adapter_name):  # the others are re-emitted (_sync): their lowering may follow it
        for other in [adapter_name, *(n for n in container if n != adapter_name and n not in merged_adapters(gm))]:
            if adapter_nodes(gm, adapter=other):
                remove_adapter_nodes(gm, other)
    flags = container.flags
    if flags.active is not None:
        flags.active = [n for n in flags.active if n != adapter_name]
    route_modules_to_save(gm, [n for n in ([] if adapters_disabled(gm) else active_adapters(gm))
                                if n != adapter_name])
    detach_state(gm, adapter_name)
    if len(container) == 0:
        flags.active = None  # the next adapter added is active again
    gm.graph.lint()
    gm.recompile()
    _sync(gm)


@contextmanager
def disable_adapters(gm: GraphModule) -> Iterator[GraphModule]:
    """Inside the block the graph computes the base model."""
    gm = as_graph_module(gm, "disable_adapters")
    was = adapters_disabled(gm)
    set_adapters_disabled(gm, True)
    try:
        yield gm
    finally:
        set_adapters_disabled(gm, was)


@mutation
def set_adapters_disabled(gm: GraphModule, disabled: bool) -> None:
    """Disable (``True``) or enable (``False``) every adapter, keeping the active list: PEFT's
    ``disable_adapter_layers`` / ``enable_adapter_layers``. Trained biases stay, as in PEFT (with its warning)."""
    gm = as_graph_module(gm, "set_adapters_disabled")
    if not isinstance(disabled, bool):
        raise TypeError(f"disabled={disabled!r}: expected True or False")
    if disabled == adapters_disabled(gm):
        return
    if disabled:
        _check_not_merged(gm, active_adapters(gm), "disable adapters")
        biased = [n for n in active_adapters(gm) if adapters_of(gm)[n].config.bias != "none"]
        if biased:
            warnings.warn(f"adapters {biased} train biases; disabling adapters keeps the trained biases, so outputs "
                          "are not the base model's", UserWarning, stacklevel=4)
    before = state_fingerprint(gm)
    try:
        with _setting(gm, "disabled", disabled):
            _sync(gm, before)
    except Exception:
        _sync(gm)
        raise
    logger.info("adapters %s", "disabled" if disabled else "enabled")


@mutation
def set_lowering(gm: GraphModule, lowering: Union[str, dict] = "auto", tokens: Optional[int] = None) -> GraphModule:
    """Choose how the adapters are computed (``transform``'s ``lowering`` and ``tokens``, vera_fx/passes/lower.py):
    every adapter with nodes is re-emitted (outputs equal up to rounding). Returns ``gm``."""
    inner = as_graph_module(gm, "set_lowering")
    setting = check_lowering(lowering, tokens)
    with_nodes: dict[str, set[str]] = {}
    for tag in (n.meta[ADAPTER_KEY] for n in adapter_nodes(inner)):
        if tag.get("role") == "output" and tag.get("adapter"):
            with_nodes.setdefault(tag["adapter"], set()).add(tag["site"])
    graphs = graph_modules(inner)
    saved = [copy.deepcopy(g.graph) for g in graphs]
    active = active_adapters(inner)
    order = [a for a in active if a in with_nodes] + [a for a in with_nodes if a not in active]
    try:
        with _setting(inner, "lowering", setting):
            for name in order:
                remove_adapter_nodes(inner, name, with_nodes[name])
            for name in order:
                emit_adapter(inner, name, with_nodes[name])
    except Exception:
        for g, graph in zip(graphs, saved):
            g.graph = graph  # the setter recompiles
        raise
    logger.info("set_lowering %r: re-emitted %s", setting["mode"], order)
    return gm
