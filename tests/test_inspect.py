"""Graph inspection: sites, summary, parameter counts, networkx, DOT and the notebook view."""

from __future__ import annotations

import re
import shutil
import warnings

import networkx as nx
import pytest

import vera_fx
from vera_fx.inspect import ROLE_COLORS
from vera_fx.sites import read_sites

from conftest import shown_nodes, tiny_gpt2, tiny_llama

R = 8
ROLES = {"base", "projection", "lambda", "sampling", "adapter", "output", "mode"}
NODE_LINE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[.*\];$')
EDGE_LINE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)";$')


def _transform(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's fan_in_fan_out note
        return vera_fx.transform(model, config)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    gm = _transform(model, vera_fx.VeraConfig(r=R))  # default targets: c_attn (Conv1D)
    names = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    trainable = 2 * (3 * 32 + R)  # per site: lambda_b (out = 3 * n_embd) + lambda_d (r)
    return model, gm, names, trainable


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    gm = _transform(model, vera_fx.VeraConfig(r=R))  # default targets: q_proj, v_proj
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = 2 * ((32 + R) + (16 + R))  # q_proj out 32, v_proj out 2 kv heads x 8 = 16
    return model, gm, names, trainable


@pytest.fixture(params=["gpt2", "llama"])
def case(request):
    return request.getfixturevalue(request.param)


def test_sites_and_summary_list_every_site(case):
    model, gm, names, _ = case
    sites = vera_fx.sites(gm)
    assert [s.name for s in sites] == names
    assert all(s.adapters == ("default",) and not s.merged for s in sites)
    text = vera_fx.summary(gm)
    rows = [line for line in text.splitlines() if line.split() and line.split()[0] in names]
    assert [r.split()[0] for r in rows] == names
    assert all(r.split()[-1] == "active" for r in rows)
    assert f"{len(names)} adapted site(s)" in text
    every = vera_fx.summary(gm, include_unadapted=True)
    for s in read_sites(gm):  # unadapted linear-like calls too (lm_head, MLP layers)
        assert s.name in every


def test_summary_kinds_and_shapes(gpt2, llama):
    assert "conv1d" in vera_fx.summary(gpt2[1]) and "32 -> 96" in vera_fx.summary(gpt2[1])
    assert "linear" in vera_fx.summary(llama[1]) and "32 -> 16" in vera_fx.summary(llama[1])


def test_trainable_parameters_match_hand_count(case, capsys):
    model, gm, _, trainable = case
    base_total = sum(p.numel() for p in model.parameters())  # tied weights once, as gm counts them
    assert vera_fx.trainable_parameters(gm) == (trainable, base_total + trainable)
    vera_fx.print_trainable_parameters(gm)
    line = capsys.readouterr().out.strip()
    pct = 100 * trainable / (base_total + trainable)
    assert line == (f"trainable params: {trainable:,d} || all params: {base_total + trainable:,d} || "
                    f"trainable%: {pct:.4f}")
    assert f"total: {len(case[2])} site(s), {trainable:,d} adapter parameters" in vera_fx.summary(gm)


def test_networkx_one_node_per_fx_node(case):
    _, gm, names, _ = case
    g = vera_fx.to_networkx(gm)
    shown = shown_nodes(gm)  # the top graph and one block per group
    fx_nodes = [n for _, n in shown]
    assert g.number_of_nodes() == len(fx_nodes)
    assert set(g.nodes) == {k for k, _ in shown}
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in fx_nodes)
    for key, n in shown:
        attrs = g.nodes[key]
        assert attrs["op"] == n.op and isinstance(attrs["target"], str)
        assert attrs["role"] is None or attrs["role"] in ROLES
    roles_by_site: dict[str, set] = {}
    for _, a in g.nodes(data=True):
        if a["role"] not in (None, "mode") and a["adapter"] == "default":
            roles_by_site.setdefault(a["site"], set()).add(a["role"])
    # a block is shown once per group: its sites are those of the first layer of the group
    shown_sites = {n.meta["vera_fx_site"]["name"] for _, n in shown if "vera_fx_site" in n.meta}
    assert sorted(roles_by_site) == sorted(set(names) & shown_sites) and roles_by_site
    assert all(a["multiplicity"] == 2 and a["block"] == k.split("/")[0] for k, a in g.nodes(data=True) if "/" in k)
    # The share pass computes x @ A.T once per input, so a projection node may carry another site's tag.
    # A lean site's arithmetic is its output node (lean_site: vera_fx::lean_add), a weight-path site's its call
    # (weight_site, handed the weight_fold output node); a plain site has "adapter" nodes.
    assert all({"lambda", "output"} <= r for r in roles_by_site.values())
    lowered = {a["site"] for _, a in g.nodes(data=True) if a["role"] == "output"
               and ("lean_site" in a["target"] or "weight_fold" in a["target"])}
    assert all("adapter" in r for s, r in roles_by_site.items() if s not in lowered)
    assert any("projection" in r for r in roles_by_site.values())
    bases = {a["site"] for _, a in g.nodes(data=True) if a["role"] == "base"}
    assert set(names) & shown_sites <= bases
    ids = g.nodes["input_ids"]
    assert len(ids["shape"]) == 2 and ids["dtype"] == "int64"


def _structural_dot_check(text: str, g: nx.DiGraph) -> None:
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):  # braces outside quoted strings
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    lines = text.splitlines()
    nodes = [m.group(1) for m in map(NODE_LINE.match, lines) if m]
    edges = [(m.group(1), m.group(2)) for m in map(EDGE_LINE.match, lines) if m]
    assert sorted(nodes) == sorted(g.nodes)
    assert sorted(edges) == sorted(g.edges)


@pytest.mark.parametrize("adapters_only", [False, True])
def test_dot_parses(case, adapters_only):
    _, gm, names, _ = case
    text = vera_fx.to_dot(gm, adapters_only=adapters_only)
    full = vera_fx.to_networkx(gm)
    adapter_nodes = {n for n, a in full.nodes(data=True) if a["role"] not in (None, "base", "mode")}
    expected = full if not adapters_only else full.subgraph(
        {m for n in adapter_nodes | {full.nodes[a]["base"] for a in adapter_nodes}
         for m in [n, *full.predecessors(n), *full.successors(n)]})
    _structural_dot_check(text, expected)
    roles = {a["role"] for _, a in full.nodes(data=True)} - {None, "mode"}
    assert {"base", "projection", "lambda", "output"} <= roles  # "adapter" only where a site stays plain
    for role in roles:
        assert ROLE_COLORS[role] in text
    shown_sites = {a["site"] for _, a in full.nodes(data=True) if a["role"] not in (None, "base", "mode")}
    assert shown_sites and shown_sites <= set(names) | {None}
    for name in shown_sites:
        assert name in text  # the site clusters are labelled with the site name
    assert "x2: transformer.h.0 .. transformer.h.1" in text or "x2: model.layers.0 .. model.layers.1" in text
    pydot = pytest.importorskip("pydot")
    graphs = pydot.graph_from_dot_data(text)
    assert graphs is not None and len(graphs) == 1
    parsed = nx.nx_pydot.from_pydot(graphs[0])
    # pydot drops nodes without edges declared inside a cluster (an unused block input): compare the rest
    assert {n for n in expected.nodes if expected.degree(n)} <= set(parsed.nodes) <= set(expected.nodes)
    assert parsed.number_of_edges() == expected.number_of_edges()


def test_view_shows_in_a_notebook(gpt2, tmp_path):
    _, gm, names, _ = gpt2
    v = vera_fx.view(gm)
    assert names[0] in repr(v)
    html = v._repr_html_()
    if shutil.which("dot") is None:
        assert v._repr_svg_() is None
        assert "<table>" in html and names[0] in html
        with pytest.raises(ValueError, match="graphviz"):
            v.save(tmp_path / "g.svg")
    else:
        assert "<svg" in v._repr_svg_() and "<svg" in html
    out = v.save(tmp_path / "g.dot")
    assert out.read_text() == v.source and v.source.startswith("digraph")


def test_view_builds_the_site_table_once(gpt2, monkeypatch):
    _, gm, _, _ = gpt2
    calls = []
    real = vera_fx.inspect.summary_rows
    monkeypatch.setattr(vera_fx.inspect, "summary_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = vera_fx.view(gm)
    assert len(calls) == 1
    assert v.text == vera_fx.summary(gm) and v.html_table == vera_fx.inspect.summary_html(gm)


def test_states_follow_sampling_and_adapter_switches():
    gm = _transform(tiny_llama(), vera_fx.PveraConfig(r=R, sample_at_inference=True))
    vera_fx.add_adapter(gm, "other", vera_fx.VeraConfig(r=4, target_modules=["k_proj"]))
    qv_sites = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    k_sites = [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]

    def states(names: list[str]) -> list[str]:
        rows = {r["name"]: r["state"] for r in vera_fx.inspect.summary_rows(gm)}
        return [rows[n] for n in names]

    assert [s.name for s in vera_fx.sites(gm, "default")] == qv_sites
    assert states(qv_sites) == ["sampling"] * 4 and states(k_sites) == ["inactive"] * 2
    g = vera_fx.to_networkx(gm)
    assert any(a["role"] == "sampling" for _, a in g.nodes(data=True))
    assert nx.is_directed_acyclic_graph(g) and g.number_of_nodes() == len(shown_nodes(gm))
    assert ROLE_COLORS["sampling"] in vera_fx.to_dot(gm, adapters_only=True)

    vera_fx.set_adapter(gm, "other")  # inactive adapters have no nodes, but their sites stay listed
    assert states(k_sites) == ["active"] * 2 and states(qv_sites) == ["inactive"] * 4
    with vera_fx.disable_adapters(gm):
        assert states(k_sites) == ["disabled"] * 2
        assert all(n in vera_fx.summary(gm) for n in k_sites + qv_sites)
    vera_fx.merge(gm)
    assert states(k_sites) == ["merged"] * 2
    assert vera_fx.to_networkx(gm).number_of_nodes() == len(shown_nodes(gm))
