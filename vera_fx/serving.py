"""Serving many adapters: mixed-adapter batches (row ``i`` runs adapter ``adapter_names[i]``), ``load_adapters``
and ``export``. The *mixed graph* is the inference twin without adapter nodes plus an input
``vera_fx_adapter_index``; per site, each bank (adapters of one method and r, sharing projections) emits its
method's nodes once, each lambda read a gather from the members' lambdas stacked at call time (so training needs
no rebuild) plus a zero row for rows outside the bank."""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from tqdm.auto import tqdm

from .adapters import set_adapter
from .signatures import InputCheck, clone_inputs, dynamic_shapes_of
from .checkpoint import PathLike, load_checked, plan_load, read_folder
from .config import AdapterConfig
from .generation import kl_terms_kept
from .compat import add_keyword_input
from .methods import CONTAINER, AdapterState, Emitter, method_for
from .passes.inject import new_state, remove_adapter_nodes, share_projections, training_node
from .passes.match import MatchPass, select_sites
from .sites import (ADAPTER_KEY, BLOCK_CALL_KEY, SITE_KEY, Site, as_graph_module, block_prefix, graph_modules,
                    read_graph_sites)
from .variants import INFERENCE_FORM, emit_layout, inference_twin, live_layout
from .state import (adapter_container, adapters_of, attach_state, block_site_names, detach_state, merged_adapters,
                    mutation, reads_state, shared_projections, state_lock)

logger = logging.getLogger(__name__)
aten = torch.ops.aten

BASE_ADAPTER = "__base__"  # PEFT's name for rows that run the base model
INDEX_INPUT = "vera_fx_adapter_index"  # the mixed graph's extra input: one adapter index per row


def check_bankable(gm: GraphModule) -> None:
    """ValueError when the adapters of ``gm`` cannot run as a mixed batch."""
    states = adapters_of(gm)
    if not len(states):
        raise ValueError("this graph has no adapter: load some with vera_fx.load_adapter / load_adapters first")
    merged = sorted(merged_adapters(gm))
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights, so rows cannot choose their "
                         "adapter: call vera_fx.unmerge(gm) before a mixed-adapter batch")
    for name, state in states.items():
        if getattr(state, "modules_to_save_paths", None):
            raise ValueError(f"adapter {name!r} has modules_to_save copies {state.modules_to_save_paths}, which "
                             "cannot differ per row: run it with set_adapter, or delete it for mixed batches")
        if state.config.bias != "none":
            raise ValueError(f"adapter {name!r} trains biases (bias={state.config.bias!r}), which every row would "
                             "share: run it with set_adapter, or delete it for mixed batches")


class BankEmitter(Emitter):
    """An Emitter over a bank's members: lambdas gathered per row, other per-site state a node (or None) per member."""

    def __init__(self, graph: Graph, after: Node, site: Site, label: str, states: dict[str, AdapterState],
                 members: list[str], index: Node, ndim: int) -> None:
        super().__init__(graph, after, site, label)
        self.states, self.members, self.index, self.ndim, self.rep = states, members, index, ndim, members[0]
        self.method = states[self.rep].method

    def get_attr(self, target: str, role: str, name: str) -> Any:
        # The method names targets after ``em.adapter`` (the bank's label): read them from the members.
        rest = next((target[len(p):] for p in (f"{CONTAINER}.{self.adapter}.", f"{CONTAINER}.{self.rep}.")
                     if target.startswith(p)), None)
        if rest is None:
            return super().get_attr(target, role, name)
        if not rest.startswith("sites."):  # shared projections and per-adapter scalars: the first member's
            return super().get_attr(f"{CONTAINER}.{self.rep}.{rest}", role, name)
        if role == "lambda":
            nodes = [super(BankEmitter, self).get_attr(f"{CONTAINER}.{m}.{rest}", role, f"{name}_{m}")
                     for m in self.members]
            zero = self.call(aten.zeros_like.default, (nodes[0],), role, f"{name}_zero")
            stacked = self.call(aten.stack.default, ([*nodes, zero], 0), role, f"{name}_bank")
            rows = self.call(aten.index_select.default, (stacked, 0, self.index), role, f"{name}_rows")
            for _ in range(self.ndim - 2):
                rows = self.call(aten.unsqueeze.default, (rows, 1), role, f"{name}_rows")
            return rows
        site_path, _, attr = rest[len("sites."):].rpartition(".")
        out: list[Optional[Node]] = []
        for m in self.members:
            mod = self.states[m].sites.get_submodule(site_path)
            has = attr in mod._buffers or attr in mod._parameters or attr in mod.__dict__
            out.append(super(BankEmitter, self).get_attr(f"{CONTAINER}.{m}.{rest}", role, f"{name}_{m}")
                       if has else None)
        return out

    def call(self, fn: Callable[..., Any], args: tuple, role: str, name: str,
             kwargs: Optional[dict[str, Any]] = None) -> Node:
        per_row = self.method.per_row_function(fn)
        if per_row is None:
            return self.cursor
        if per_row is not fn:
            kwargs = {**(kwargs or {}), "index": self.index}
        return super().call(per_row, args, role, name, kwargs)


def _add_index(graph: Graph) -> Node:
    """The index input, after the last placeholder (the graph's last keyword input; get_attr nodes may come first)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(list(graph.nodes)[-1]):
        index = graph.placeholder(INDEX_INPUT)
    index.meta[ADAPTER_KEY] = _mode_tag(INDEX_INPUT)
    add_keyword_input(graph, INDEX_INPUT)
    return index


def _batch_of_block(call: Node, block_graph: Graph, batch: Any) -> Any:
    """The batch dimension as the block sees it (blocks export with fresh symbols)."""
    placeholders = [n for n in block_graph.nodes if n.op == "placeholder"]
    for arg, ph in zip(call.args, placeholders):
        val, own = (arg.meta.get("val") if isinstance(arg, Node) else None), ph.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(own, torch.Tensor) and val.dim() >= 1 and own.dim() >= 1 \
                and str(val.shape[0]) == str(batch):
            return own.shape[0]
    return None


def _mode_tag(name: str) -> dict[str, Any]:
    return {"site": None, "adapter": None, "role": "mode", "base": None, "name": name}


def _emit_banks(mixed: GraphModule, index: Node, batch: Any, order: list[str], groups: dict[str, list[str]]) -> int:
    """Bank every site of one graph of the tree (the root or a block); returns the site calls."""
    graph, states = mixed.graph, adapters_of(mixed)  # the root's states, or a block's views of them
    device = next((p.device for p in mixed.parameters()), torch.device("cpu"))
    first_op = index.next  # the bank index nodes go right after the index input
    tables: dict[tuple[int, ...], Node] = {}

    def rows_of(members: list[str]) -> Node:
        """The rows' index into the bank of ``members`` (``len(members)``: the zero row)."""
        table = tuple(members.index(a) if a in members else len(members) for a in order) + (len(members),)
        if table not in tables:
            buf = f"vera_fx_bank_map_{len(tables)}"
            mixed.register_buffer(buf, torch.tensor(table, dtype=torch.long, device=device), persistent=False)
            with graph.inserting_before(first_op):
                mapping = graph.get_attr(buf)
                tables[table] = graph.call_function(aten.index_select.default, (mapping, 0, index))
            for node in (mapping, tables[table]):
                node.meta[ADAPTER_KEY] = _mode_tag("bank_index")
        return tables[table]

    training = training_node(mixed)
    sites = read_graph_sites(mixed)  # (no merged adapter: check_bankable)
    for site in sites:
        x_val = site.input.meta.get("val")
        ndim = x_val.dim() if isinstance(x_val, torch.Tensor) else 3
        if isinstance(x_val, torch.Tensor) and batch is not None and (ndim < 2 or str(x_val.shape[0]) != str(batch)):
            raise ValueError(f"site {site.name!r} reads a tensor of shape {tuple(x_val.shape)} whose first "
                             f"dimension is not the batch ({batch}), so its rows cannot choose an adapter; leave "
                             "it out of target_modules for mixed-adapter batches")
        cur = site.output
        for label, names in groups.items():
            members = [a for a in names if a in states and site.name in states[a].site_names]
            if not members:
                continue
            own = f"bank_{label}"
            state = states[members[0]]
            out = state.method.emit(BankEmitter(graph, cur, site, own, states, members, rows_of(members), ndim),
                                    state, site.input, cur, training)
            cur.replace_all_uses_with(out, delete_user_cb=lambda u, out=out, s=site.name, own=own: u is not out
                                      and not ((u.meta.get(ADAPTER_KEY) or {}).get("adapter") == own
                                               and u.meta[ADAPTER_KEY].get("site") == s))
            cur = out
    share_projections(mixed, recompile=False)
    graph.lint()
    mixed.recompile()
    mixed.training = False  # the flag the graph reads; the shared submodules keep theirs
    return len(sites)


def bank_tree(inner: GraphModule) -> GraphModule:
    """The mixed-adapter graph of ``inner``; ValueError when a site's input does not start with the batch."""
    mixed = inference_twin(inner, INFERENCE_FORM, checked=False)  # ``_filled`` checks the inputs, less the index
    remove_adapter_nodes(mixed, None)
    order = list(adapters_of(mixed))
    groups: dict[str, list[str]] = {}  # bank label "<method>_r<r>" -> its members, in index order
    for name, state in adapters_of(mixed).items():
        groups.setdefault(f"{state.method_name}_r{state.config.r}", []).append(name)
    index = _add_index(mixed.graph)
    vals = [n.meta.get("val") for n in mixed.graph.nodes if n.op == "placeholder"]
    batch = next((v.shape[0] for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
    blocks = {block_prefix(b): b for b in graph_modules(mixed)[1:]}
    count = 0
    for node in list(mixed.graph.nodes):
        block = blocks.pop(node.meta.get(BLOCK_CALL_KEY), None) if node.op == "call_module" else None
        if block is None:
            continue
        b_index = _add_index(block.graph)
        if CONTAINER in block._modules:  # the block's views of the states
            count += _emit_banks(block, b_index, _batch_of_block(node, block.graph, batch), order, groups)
        else:
            block.recompile()
            block.training = False
        node.args = (*node.args, index)
    count += _emit_banks(mixed, index, batch, order, groups)
    logger.info("mixed-adapter graph: %d adapters in %d banks, %d site calls", len(order), len(groups), count)
    return mixed


def mixed_graph(gm: nn.Module) -> GraphModule:
    """``bank_tree`` of ``gm``, built once per adapter structure."""
    inner = as_graph_module(gm)
    check_bankable(inner)
    container = adapters_of(inner)
    key = (id(container),) + tuple((name, state.method_name, state.config.r, tuple(state.site_names))
                                   for name, state in container.items())
    return container.versions.derived(inner, "mixed", key, lambda: bank_tree(inner))


def adapter_index(gm: nn.Module, adapter_names: Sequence[str]) -> torch.Tensor:
    """The ``vera_fx_adapter_index`` input for ``adapter_names`` (one per row; ``"__base__"``: the base model)."""
    inner = as_graph_module(gm)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names={adapter_names!r}: expected a list of adapter names, one per row")
    order = list(adapters_of(inner))
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
    """An eval-mode forward of a batch whose row ``i`` uses adapter ``adapter_names[i]`` (``"__base__"``: the base
    model), each row as if run alone with its adapter active (PVeRA: its switches and noise stream)."""
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
    config, tensors, source = read_folder(folder)
    if config.modules_to_save or config.bias != "none":
        raise ValueError(f"{folder}: modules_to_save={config.modules_to_save!r}, bias={config.bias!r}: "
                         "load_adapters takes adapters of lambdas only; load this one with vera_fx.load_adapter")
    try:
        state = _new_state(inner, config, *caches)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    attach_state(inner, name, state, blocks)  # the root's state and the blocks' views of it
    added.append(name)
    if any(replace for *_, replace in plan_load(inner, tensors, name, source)[0]):
        raise ValueError(f"{source} holds base-model weights besides the adapter; load_adapters takes "
                         "adapters of lambdas only: load this one with vera_fx.load_adapter")
    load_checked(inner, name, config, tensors, source)  # writes only the new adapter (projections checked equal)


@mutation
def load_adapters(gm: nn.Module, folders: Mapping[str, PathLike], progress: bool = True) -> list[str]:
    """Load ``{adapter name: folder}`` (lambdas only), each checked as ``load_adapter`` does and added inactive
    without graph nodes (a graph with no adapter activates the first); all or nothing. Returns the names."""
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
    old_active = container.flags.active
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
        container.flags.active = old_active
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
    """``inner`` with its non-tensor keywords fixed, through a forward with one named parameter per tensor input."""

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
    per example row) its mixed-adapter graph. Non-tensor inputs, the mode and sampling switches are fixed;
    ``dynamic``: every tensor dimension ``Dim.AUTO``; ``plain_outputs``: a plain dict for a transformers output."""
    inner = as_graph_module(gm)
    if adapter_names is None and any((n.meta.get(ADAPTER_KEY) or {}).get("path") not in (None, "activation")
                                     for g in graph_modules(inner) for n in g.graph.nodes):
        # the lean / weight paths only change backward: the program runs a copy with plain nodes (torch + runtime)
        flags, copied = adapters_of(inner).flags, inference_twin(inner, None)
        with state_lock(inner).write():
            setting, flags.lowering = flags.lowering, {"mode": "activation", "tokens": None}
            try:
                emit_layout(copied, live_layout(inner))
            finally:
                flags.lowering = setting
        inner = copied
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
