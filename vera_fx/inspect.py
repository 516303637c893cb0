"""Views of an adapted graph for people: a site table, parameter counts, a networkx graph, DOT and SVG.

Node roles: ``base`` (a linear-like call), ``projection`` (the shared A / B and ``x @ A.T``), ``lambda``,
``sampling`` (PVeRA's noise), ``adapter`` (the rest of the adapter's arithmetic), ``output`` (the node adding the
adapter to the base output) and ``mode`` (the ``training`` flag dropout and sampling read)."""

from __future__ import annotations

import functools
import html
import itertools
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .compat import OpOverload, OpOverloadPacket
from .sites import (ADAPTER_KEY, BLOCK_CALL_KEY, SITE_KEY, Site, as_graph_module, block_groups, block_prefix,
                    model_info, read_sites, site_owners)
from .state import active_adapters, adapters_disabled, adapters_of
from .surface import trainable_line

logger = logging.getLogger(__name__)

# Fill colour of each node role in DOT / SVG output.
ROLE_COLORS: dict[str, str] = {"base": "#9ecae1", "projection": "#c7e9c0", "lambda": "#fdd0a2", "sampling": "#dadaeb",
                               "adapter": "#fff7bc", "output": "#fc9272", "mode": "#e0e0e0"}


def print_trainable_parameters(gm: torch.nn.Module) -> None:
    """Print PEFT's one-line report: ``trainable params: X || all params: Y || trainable%: Z``."""
    print(trainable_line(gm))


def _state_word(adapter: str, site: Site, attached: set[str], active: list[str], disabled: bool) -> str:
    if adapter in site.merged:
        return "merged"
    if adapter not in active:
        return "inactive"
    if disabled or adapter not in attached:
        return "disabled"
    return "sampling" if adapter in site.sampling else "active"


def summary_rows(gm: GraphModule, include_unadapted: bool = False) -> list[dict[str, Any]]:
    """One dict per site an adapter covers (every site with ``include_unadapted``): name, kind, in_features,
    out_features, adapters, params, trainable, state."""
    gm = as_graph_module(gm, "summary_rows")
    states, covering = dict(adapters_of(gm).items()), site_owners(gm)
    attached: dict[str, set[str]] = {}
    first: dict[str, Site] = {}
    for s in read_sites(gm):  # a shared layer is called more than once: one row per name
        first.setdefault(s.name, s)
        attached.setdefault(s.name, set()).update(s.adapters)
    active, disabled = active_adapters(gm), adapters_disabled(gm)
    rows = []
    for name, s in first.items():
        adapters = tuple(dict.fromkeys([*covering.get(name, ()), *sorted(attached[name]), *s.merged]))
        if not (adapters or include_unadapted):
            continue
        words = [(a, _state_word(a, s, attached[name], active, disabled)) for a in adapters]
        state = (words[0][1] if len(words) == 1 else ", ".join(f"{a}:{w}" for a, w in words)) if words else "-"
        params: list[torch.Tensor] = []
        for a in adapters:
            try:
                params += states[a].site_parameters(name).values()
            except KeyError:  # not an adapter of this graph, or none of its parameters at this site
                pass
        rows.append({"name": name, "kind": s.kind, "in_features": s.in_features, "out_features": s.out_features,
                     "adapters": adapters, "params": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad), "state": state})
    return rows


def _projection_notes(gm: GraphModule) -> list[str]:
    """One line per adapter: its method, rank and shared frozen projections (views of another's noted)."""
    notes = []
    owners: dict[int, str] = {}
    for name, state in adapters_of(gm).items():
        shapes, count, views = [], 0, set()
        for which in ("A", "B"):
            t = state.projection(which)
            shapes.append(f"{which} {'x'.join(map(str, t.shape))}")
            ptr = t.untyped_storage().data_ptr()
            if ptr in owners:
                views.add(owners[ptr])
            else:
                owners[ptr] = name
                count += t.numel()
        where = f"views of {', '.join(map(repr, sorted(views)))}'s" if views and not count else f"{count:,d} values"
        notes.append(f"adapter {name!r} ({state.method_name}, r={state.config.r}): shared frozen projections "
                     f"{', '.join(shapes)} ({where}, buffers)")
    return notes


def _site_table(gm: GraphModule, include_unadapted: bool) -> tuple[str, list[list[str]], list[str]]:
    """(title, the site table with its header row first, the notes under it)."""
    rows = summary_rows(gm, include_unadapted)
    table = [["site", "kind", "shape", "adapters", "params", "state"]] + [
        [r["name"], r["kind"], f"{r['in_features']} -> {r['out_features']}", ",".join(r["adapters"]) or "-",
         f"{r['params']:,d}", r["state"]] for r in rows]
    adapted = sum(1 for r in rows if r["adapters"])
    notes = [(f"total: {adapted} site(s), {sum(r['params'] for r in rows):,d} adapter parameters "
              f"({sum(r['trainable'] for r in rows):,d} trainable)"), *_projection_notes(gm)]
    for members in block_groups(gm).values():  # layers running copies of one captured graph
        paths = [block_prefix(b) for b in members]
        span = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
        notes.append(f"block {type(members[0]).__name__}: {len(paths)} x ({span}), "
                     f"{len(members[0].graph.nodes)} nodes each")
    title = f"vera_fx summary of {model_info(gm).get('class', type(gm).__name__)}: {adapted} adapted site(s)"
    return title, table, [*notes, trainable_line(gm)]


def _text(title: str, table: list[list[str]], notes: list[str]) -> str:
    widths = [max(len(c) for c in col) for col in zip(*table)]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
             for cells in table]  # params (column 4) right-aligned
    return "\n".join([title, lines[0], rule, *lines[1:], rule, *notes])


def _html(title: str, table: list[list[str]], notes: list[str]) -> str:
    rows = ["<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"
            for tag, cells in zip(["th"] + ["td"] * (len(table) - 1), table)]
    return "\n".join(["<table>", f"<thead>{rows[0]}</thead>", "<tbody>", *rows[1:], "</tbody></table>",
                      "<pre>" + html.escape("\n".join([title, *notes])) + "</pre>"])


def summary(gm: GraphModule, include_unadapted: bool = False) -> str:
    """A text table of the adapted sites (every linear-like call with ``include_unadapted``) with totals; a state
    is ``active``, ``sampling`` (PVeRA at inference), ``inactive``, ``disabled`` or ``merged``."""
    return _text(*_site_table(as_graph_module(gm, "summary"), include_unadapted))


def summary_html(gm: GraphModule, include_unadapted: bool = False) -> str:
    """The summary as an HTML table (for notebooks)."""
    return _html(*_site_table(as_graph_module(gm, "summary_html"), include_unadapted))


def _target_str(node: Node) -> str:
    t = node.target
    if isinstance(t, (str, OpOverload, OpOverloadPacket)):
        return str(t)
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The graph as a ``networkx.DiGraph``: a node per FX node (keyed by its name), an edge per data use.

    Blocks are shown once per group: the first block's nodes are keyed ``"<block path>/<node name>"``, with
    ``multiplicity`` (how many layers run this graph); ``G.graph["blocks"]``: each shown block's count and paths."""
    gm = as_graph_module(gm, "to_networkx")
    g = nx.DiGraph(name=model_info(gm).get("class", type(gm).__name__))
    groups = block_groups(gm)
    shown = {block_prefix(m[0]): [block_prefix(b) for b in m] for m in groups.values()}
    rep_of = {p: rep for rep, paths in shown.items() for p in paths}
    g.graph["blocks"] = {rep: {"count": len(paths), "paths": paths} for rep, paths in shown.items()}
    graphs = [("", gm)] + [(block_prefix(m[0]), m[0]) for m in groups.values()]
    for prefix, graph_module in graphs:
        key = (lambda n, p=prefix: f"{p}/{n.name}") if prefix else (lambda n: n.name)
        for node in graph_module.graph.nodes:
            tag, site = node.meta.get(ADAPTER_KEY) or {}, node.meta.get(SITE_KEY) or {}  # adapter node, base call
            val, called = node.meta.get("val"), node.meta.get(BLOCK_CALL_KEY)
            shape = tuple(int(d) if isinstance(d, int) else str(d) for d in val.shape) \
                if isinstance(val, torch.Tensor) else None
            g.add_node(key(node), op=node.op, target=_target_str(node),
                       role=tag.get("role") if tag else "base" if site else None,
                       site=tag.get("site") if tag else site.get("name"), adapter=tag.get("adapter"),
                       label=tag.get("name") or node.name,
                       base=f"{prefix}/{tag['base']}" if prefix and tag.get("base") else tag.get("base"),
                       shape=shape, dtype=str(val.dtype).replace("torch.", "") if shape is not None else None,
                       block=prefix or (rep_of.get(called) if called else None),
                       multiplicity=len(shown[prefix]) if prefix else None)
        for node in graph_module.graph.nodes:
            for src in node.all_input_nodes:
                g.add_edge(key(src), key(node))
    return g


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_stmt(name: str, attrs: dict[str, Any], context: bool) -> str:
    lines, target = [attrs["label"]], attrs["target"]
    if attrs["op"] in ("call_function", "call_method", "call_module", "get_attr"):
        if target.startswith("aten."):
            target = target[len("aten."):].removesuffix(".default").removesuffix(".Tensor")
        lines.append(target if len(target) <= 48 else "..." + ".".join(target.split(".")[-2:])[-45:])
    if attrs["shape"] is not None:
        lines.append(f"{'x'.join(map(str, attrs['shape'])) or 'scalar'} {attrs['dtype']}")
    parts = ["label=" + _q("\n".join(lines))]
    role = attrs["role"]
    if role in ROLE_COLORS:
        tip = role + (f": {attrs['site']}" if attrs["site"] else "") + (
            f" ({attrs['adapter']})" if attrs["adapter"] else "")
        parts += [f"fillcolor={_q(ROLE_COLORS[role])}", f"tooltip={_q(tip)}"]
    if context:
        parts += ['style="rounded,dashed"', 'color="#999999"']
    if attrs["op"] in ("placeholder", "output"):
        parts.append("shape=ellipse")
    return f"{_q(name)} [{', '.join(parts)}];"


def to_dot(gm: GraphModule, adapters_only: bool = False) -> str:
    """DOT text of the graph, adapter nodes filled by role and grouped per site and adapter. ``adapters_only``
    keeps the adapter nodes, their base calls and the nodes one edge away (drawn dashed)."""
    g = to_networkx(as_graph_module(gm, "to_dot"))
    core = set(g.nodes)  # the nodes drawn solid (the others are context, drawn dashed)
    if adapters_only:
        core = {n for n, a in g.nodes(data=True) if a["role"] not in (None, "base", "mode")}
        core |= {g.nodes[n]["base"] for n in core if g.nodes[n]["base"] in g}
        keep = core | {m for n in core for m in (*g.predecessors(n), *g.successors(n))}
        g = g.subgraph([n for n in g.nodes if n in keep])
    groups: dict[str, tuple[list[str], dict[tuple[str, str], list[str]]]] = {}  # block: (plain, site clusters)
    for name, attrs in g.nodes(data=True):
        plain, sites = groups.setdefault(attrs["block"] if attrs["multiplicity"] else "", ([], {}))
        stmt = _node_stmt(name, attrs, context=name not in core)
        if attrs["role"] not in (None, "base") and attrs["site"] is not None:
            sites.setdefault((attrs["site"], attrs["adapter"] or ""), []).append(stmt)
        else:
            plain.append(stmt)
    lines = [f"digraph {_q(g.graph.get('name') or 'graph')} {{",
             '  graph [rankdir=TB, fontname="Helvetica", fontsize=10];',
             '  node [shape=box, style="rounded,filled", fillcolor="white", fontname="Helvetica", fontsize=9];',
             '  edge [color="#555555", arrowsize=0.6];']
    n_cluster = itertools.count()
    for block in ["", *sorted(b for b in groups if b)]:
        plain, sites = groups.get(block, ([], {}))
        indent = "    " if block else "  "
        if block:
            info = g.graph.get("blocks", {}).get(block, {"count": 1, "paths": [block]})
            label = f"block {block} (x{info['count']}: {info['paths'][0]} .. {info['paths'][-1]})"
            lines += [f"  subgraph {_q(f'cluster_block_{next(n_cluster)}')} {{",
                      f'    graph [label={_q(label)}, style="solid", color="#444444"];']
        lines += [indent + s for s in plain]
        for (site, adapter), stmts in sites.items():
            label = f"{site} ({adapter})" if adapter else site
            lines += [f"{indent}subgraph {_q(f'cluster_{next(n_cluster)}')} {{",
                      f'{indent}  graph [label={_q(label)}, style="dashed", color="#888888"];',
                      *(f"{indent}  {s}" for s in stmts), f"{indent}}}"]
        if block:
            lines.append("  }")
    lines += [f"  {_q(u)} -> {_q(v)};" for u, v in g.edges]
    return "\n".join([*lines, "}"]) + "\n"


@dataclass
class GraphView:
    """What ``view`` returns: SVG in a notebook with graphviz (else the site table as HTML), text in a terminal."""
    source: str  # DOT text
    text: str  # the text summary
    html_table: str  # the summary as HTML

    @functools.cached_property
    def svg(self) -> Optional[str]:
        """The graph as SVG (rendered once), or None without graphviz's ``dot`` binary."""
        exe = shutil.which("dot")
        if exe is None:
            return None
        try:
            done = subprocess.run([exe, "-Tsvg"], input=self.source.encode(), capture_output=True, timeout=120.0)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("graphviz dot failed (%s); showing the summary table instead", e)
            return None
        if done.returncode != 0:
            logger.warning("graphviz dot exited %d: %s", done.returncode, done.stderr.decode(errors="replace")[:200])
            return None
        return done.stdout.decode("utf-8", errors="replace")

    def _repr_svg_(self) -> Optional[str]:
        return self.svg

    def _repr_html_(self) -> str:
        if self.svg is not None:
            return f"<div>{self.svg}</div>"
        return (self.html_table + "<p><i>Install graphviz (the <code>dot</code> binary) to see the graph; "
                "<code>.source</code> holds its DOT text.</i></p>")

    def __repr__(self) -> str:
        return self.text

    def save(self, path: Union[str, Path]) -> Path:
        """Write the view to ``path``: SVG for a ``.svg`` name (needs graphviz), DOT text otherwise."""
        path = Path(path)
        if path.suffix.lower() == ".svg" and self.svg is None:
            raise ValueError(f"path={str(path)!r} asks for SVG, but graphviz's dot binary is not installed: "
                             "install graphviz, or save to a .dot file")
        path.write_text(self.svg if path.suffix.lower() == ".svg" else self.source, encoding="utf-8")
        return path


def view(gm: GraphModule, adapters_only: bool = True) -> GraphView:
    """A notebook view of ``gm``: the graph (adapter part by default) and the site table."""
    gm = as_graph_module(gm, "view")
    table = _site_table(gm, False)
    return GraphView(source=to_dot(gm, adapters_only=adapters_only), text=_text(*table), html_table=_html(*table))
