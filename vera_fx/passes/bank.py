"""Bank pass: a mixed-adapter graph, in which every row of the batch runs with its own adapter.

``bank_tree`` takes an adapter-free inference copy of an adapted graph tree (built by vera_fx/variants.py's twin
builder) and adds an input ``vera_fx_adapter_index`` (one int64 per row: ``k`` is adapter ``k`` of
``bank_order(gm)``, ``len(order)`` the base model). Adapters are grouped into banks by (method, r), whose members
share projections: at every site a bank emits its method's nodes once over the batch, each lambda read a gather
from the members' lambdas stacked at call time (the very parameters, so training changes the mixed graph too)
plus a zero row for rows outside the bank. Other per-site state (PVeRA's switches and noise streams) goes to
``per_row_function`` as one value per member. For inference.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch.fx import Graph, GraphModule, Node

from ..compat import add_keyword_input
from ..methods import CONTAINER, AdapterState, Emitter
from ..sites import (ADAPTER_KEY, BLOCK_CALL_KEY, Site, block_prefix, graph_modules, read_graph_sites,
                     sampling_by_site)
from ..state import adapters_of, merged_adapters
from ..versions import adapter_flags
from .inject import share_projections, training_node

logger = logging.getLogger(__name__)
aten = torch.ops.aten

BASE_ADAPTER = "__base__"  # PEFT's name for rows that run the base model
INDEX_INPUT = "vera_fx_adapter_index"  # the mixed graph's extra input: one adapter index per row


def bank_order(gm: GraphModule) -> list[str]:
    """The adapters in index order: row index ``k`` is ``bank_order(gm)[k]``; ``len(order)`` is the base."""
    return list(adapters_of(gm))


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
    """An Emitter turning a method's per-adapter reads into per-row reads over a bank's members: lambdas gathered
    from their stack, other per-site state a list with a node (or None) per member, calls through
    ``per_row_function`` with the rows' index as ``index=``."""

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


def _batch_size(graph: Graph) -> Any:
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return next((v.shape[0] for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 1), None)


def _batch_of_block(call: Node, block_graph: Graph, batch: Any) -> Any:
    """The batch dimension as the block sees it: the first dimension of the block input at the position of
    the first call argument whose first dimension is the caller's batch (blocks export with fresh symbols)."""
    placeholders = [n for n in block_graph.nodes if n.op == "placeholder"]
    for arg, ph in zip(call.args, placeholders):
        val, own = (arg.meta.get("val") if isinstance(arg, Node) else None), ph.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(own, torch.Tensor) and val.dim() >= 1 and own.dim() >= 1 \
                and str(val.shape[0]) == str(batch):
            return own.shape[0]
    return None


def _mode_tag(name: str) -> dict[str, Any]:
    return {"site": None, "adapter": None, "role": "mode", "base": None, "name": name}


def _emit_banks(mixed: GraphModule, index: Node, batch: Any, order: list[str], groups: dict[str, list[str]],
                merged: dict, sampling: dict) -> int:
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
    sites = read_graph_sites(mixed, merged, sampling)
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


def bank_tree(mixed: GraphModule) -> GraphModule:
    """Make ``mixed`` (an adapted tree's inference twin stripped of its adapter nodes, whose adapters pass
    ``check_bankable``) the mixed-adapter graph: its inputs plus ``vera_fx_adapter_index`` (int64, one per row),
    one more argument of each block call. ValueError when a site's input does not start with the batch."""
    order = bank_order(mixed)
    groups: dict[str, list[str]] = {}  # bank label "<method>_r<r>" -> its members, in index order
    for name, state in adapters_of(mixed).items():
        groups.setdefault(f"{state.method_name}_r{state.config.r}", []).append(name)
    merged, sampling = adapter_flags(mixed).merged, sampling_by_site(mixed)
    index = _add_index(mixed.graph)
    batch = _batch_size(mixed.graph)
    blocks = {block_prefix(b): b for b in graph_modules(mixed)[1:]}
    count = 0
    for node in list(mixed.graph.nodes):
        block = blocks.pop(node.meta.get(BLOCK_CALL_KEY), None) if node.op == "call_module" else None
        if block is None:
            continue
        b_index = _add_index(block.graph)
        if CONTAINER in block._modules:  # the block's views of the states
            count += _emit_banks(block, b_index, _batch_of_block(node, block.graph, batch), order, groups, merged,
                                 sampling)
        else:
            block.recompile()
            block.training = False
        node.args = (*node.args, index)
    count += _emit_banks(mixed, index, batch, order, groups, merged, sampling)
    logger.info("mixed-adapter graph: %d adapters in %d banks, %d site calls", len(order), len(groups), count)
    return mixed
