"""One adapter state, many graphs: switches under concurrent forwards, switch cost and memory, graphs of other
signatures (plain and mixed-adapter), loading into a merged adapter, input names export renames."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from torch import nn
import torch.fx.graph_module as fx_graph_module

import vera_fx
from vera_fx.sites import graph_modules
from conftest import tiny_llama


def _randomise(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def two_adapters():
    """A tiny Llama with adapters 'default' and 'b' (random lambdas), in eval mode."""
    cfg = dict(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(**cfg))
    vera_fx.add_adapter(m, "b", vera_fx.VeraConfig(**cfg))
    _randomise(m, 0)
    m.eval()
    return m


def _reference_outputs(m, calls):
    """Outputs of every call under each state, computed one state at a time."""
    refs = {}
    with torch.no_grad():
        for state in ("default", "b", ("default", "b")):
            vera_fx.set_adapter(m, list(state) if isinstance(state, tuple) else state)
            refs[state] = [m(**kw).logits.clone() for kw in calls]
    return refs


def _adapter_names_in_graphs(m):
    """The adapters each graph that runs holds nodes of: every signature's graph and, for the inference calls,
    its inference twin for the current adapter structure (vera_fx/variants.py)."""
    graphs = list(m.graphs.values()) + [next(reversed(b.values())) for b in m._twins.values() if b != "as is"]
    out = []
    for gm in graphs:
        names = {(n.meta.get("vera_fx") or {}).get("adapter") for g in graph_modules(gm) for n in g.graph.nodes}
        out.append(names - {None})
    return out


def test_forwards_during_switches_see_one_state(two_adapters):
    m = two_adapters
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    calls = [dict(input_ids=ids), dict(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)]
    refs = _reference_outputs(m, calls)
    vera_fx.set_adapter(m, "default")
    stop = threading.Event()
    seen = {"calls": 0, "bad": 0}

    def forwards():
        i = 0
        while not stop.is_set():
            with torch.no_grad():
                out = m(**calls[i % 2]).logits
            if not any(torch.allclose(out, r[i % 2], atol=1e-6, rtol=0) for r in refs.values()):
                seen["bad"] += 1
            seen["calls"] += 1
            i += 1

    thread = threading.Thread(target=forwards)
    thread.start()
    states = ["b", ["default", "b"], "default"]
    try:
        for i in range(60):
            vera_fx.set_adapter(m, states[i % 3])
            time.sleep(0.003)
    finally:
        stop.set()
        thread.join()
    assert seen["calls"] > 10 and seen["bad"] == 0, seen
    # afterwards every graph carries the adapters of the state set last, and computes it
    for state, expected in (("b", {"b"}), ("default", {"default"})):
        vera_fx.set_adapter(m, state)
        with torch.no_grad():
            outs = [m(**kw).logits for kw in calls]
        m.train()
        [m(**kw) for kw in calls]  # with gradients in train mode: the signatures' own graphs run too
        m.eval()
        assert all(names == expected for names in _adapter_names_in_graphs(m)), _adapter_names_in_graphs(m)
        for out, ref in zip(outs, refs[state]):
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("switch", ["disable / enable", "merge / unmerge"])
def test_forwards_during_other_mutations_see_one_state(switch, monkeypatch):
    """Other writers than set_adapter, and readers that are mixed-adapter calls. Every graph switch is slowed
    down (a hook), so a forward that did not wait for the writer would run on a half-changed state."""
    switch_graphs = vera_fx.versions.GraphVersions.switch

    def slow_switch(self, *args, **kwargs):
        time.sleep(0.004)
        return switch_graphs(self, *args, **kwargs)

    monkeypatch.setattr(vera_fx.versions.GraphVersions, "switch", slow_switch)
    cfg = dict(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(**cfg))
    vera_fx.add_adapter(m, "b", vera_fx.VeraConfig(**cfg))
    _randomise(m, 4)
    vera_fx.set_adapter(m, "default")
    m.eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    sibling = dict(input_ids=ids, output_hidden_states=True)  # another signature: its own graph, re-attached
    with torch.no_grad():
        adapted = m(input_ids=ids).logits.clone()
        with vera_fx.disable_adapters(m):
            base = m(input_ids=ids).logits.clone()
        mixed = m(**sibling, adapter_names=["default", "b"]).logits.clone()
    valid = [adapted] if switch == "merge / unmerge" else [adapted, base]
    if switch == "merge / unmerge":
        steps = [lambda: vera_fx.merge(m), lambda: vera_fx.unmerge(m)]
    else:
        steps = [m.disable_adapter_layers, m.enable_adapter_layers]
    stop = threading.Event()
    seen = {"calls": 0, "bad": 0}

    def forwards():
        i = 0
        while not stop.is_set():
            with torch.no_grad():
                if switch == "disable / enable" and i % 3 == 2:  # mixed calls ignore the disabled flag
                    ok = torch.allclose(m(**sibling, adapter_names=["default", "b"]).logits, mixed, atol=1e-5)
                else:
                    out = m(**(sibling if i % 3 else dict(input_ids=ids))).logits
                    ok = any(torch.allclose(out, r, atol=1e-5, rtol=0) for r in valid)
            seen["bad"] += not ok
            seen["calls"] += 1
            i += 1

    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        for i in range(40):
            steps[i % 2]()
            time.sleep(0.003)
    finally:
        stop.set()
        thread.join()
    assert seen["calls"] > 5 and seen["bad"] == 0, seen
    with torch.no_grad():  # no graph kept a state it was built for while the state changed
        torch.testing.assert_close(m(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(**sibling).logits, adapted, atol=1e-5, rtol=0)
        steps[0]()  # the other state once more: its versions must be right too
        torch.testing.assert_close(m(**sibling).logits, valid[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(m(input_ids=ids).logits, valid[-1], atol=1e-5, rtol=0)
        steps[1]()


def test_switching_back_and_forth_builds_nothing_new(two_adapters):
    m = two_adapters
    ids = torch.randint(0, 96, (2, 5))
    states = ["default", "b", ["default", "b"]]
    with torch.no_grad():
        for s in states:  # each state built once (the source and the signature's graph)
            vera_fx.set_adapter(m, s)
            m(input_ids=ids)
    generated = len(fx_graph_module._loader.eval_cache)
    gc.collect()
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096
    with torch.no_grad():
        for i in range(1000):
            vera_fx.set_adapter(m, states[i % 3])
            if i % 7 == 0:
                m(input_ids=ids)
    gc.collect()
    grown = int(open("/proc/self/statm").read().split()[1]) * 4096 - rss
    assert len(fx_graph_module._loader.eval_cache) == generated  # no code generated for a state seen before
    assert grown < 5 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 1,000 switches"


@pytest.mark.parametrize("layers", [2, 6])
def test_a_switch_to_a_state_seen_before_binds_nothing(layers, monkeypatch):
    """Along model depth: once every state was seen, switching (set_adapter, disable / enable) attaches no graph
    again, so a switch costs the same at any depth. A merge makes new base tensors (copy-on-merge): the graphs
    are bound to them, and to the originals again after unmerge (the outputs after each switch are the
    state's)."""
    cfg = dict(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    m = vera_fx.transform(tiny_llama(num_hidden_layers=layers), vera_fx.VeraConfig(**cfg))
    vera_fx.add_adapter(m, "b", vera_fx.VeraConfig(**cfg))
    _randomise(m, 1)
    m.eval()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    calls = [dict(input_ids=ids), dict(input_ids=ids, output_hidden_states=True)]
    steps = {"b": lambda: vera_fx.set_adapter(m, "b"), "default": lambda: vera_fx.set_adapter(m, "default"),
             "disable": m.disable_adapter_layers, "enable": m.enable_adapter_layers,
             "merge": lambda: vera_fx.merge(m), "unmerge": lambda: vera_fx.unmerge(m)}
    with torch.no_grad():
        refs = {}
        for name, step in steps.items():  # every state seen once, with its reference outputs
            step()
            refs[name] = [m(**kw).logits.clone() for kw in calls]
        attached: dict[str, int] = {}
        real_attach = vera_fx.model.attach_adapters
        for _ in range(3):
            for name, step in steps.items():
                step()
                monkeypatch.setattr(vera_fx.model, "attach_adapters", lambda *a, _n=name, **k: attached.update(
                    {_n: attached.get(_n, 0) + 1}) or real_attach(*a, **k))
                for kw, ref in zip(calls, refs[name]):
                    torch.testing.assert_close(m(**kw).logits, ref, atol=1e-6, rtol=0)
    assert not {k: v for k, v in attached.items() if k not in ("merge", "unmerge")}, attached
    assert attached.get("merge"), "the new merged weights were not bound"


def test_a_graph_edited_outside_forgets_its_versions(two_adapters):
    """Gradient checkpointing rewrites the block calls: switching afterwards must keep that rewrite."""
    m = two_adapters
    ids = torch.randint(0, 96, (2, 5))
    vera_fx.set_adapter(m, "b")
    vera_fx.set_adapter(m, "default")
    m.gradient_checkpointing_enable()
    try:
        vera_fx.set_adapter(m, "b")
        vera_fx.set_adapter(m, "default")
        assert "checkpoint" in m.code
        with torch.no_grad():
            out = m(input_ids=ids).logits
    finally:
        m.gradient_checkpointing_disable()
    with torch.no_grad():
        torch.testing.assert_close(out, m(input_ids=ids).logits)


def test_a_switch_inside_a_forward_of_the_same_model_is_refused(two_adapters):
    lock = vera_fx.state.state_lock(two_adapters)
    with lock.read():
        with pytest.raises(RuntimeError, match="inside a forward"):
            vera_fx.set_adapter(two_adapters, "b")


def test_first_calls_of_a_new_signature_from_threads_capture_once():
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    m.eval()
    ids = torch.randint(0, 96, (2, 6))
    kw = dict(input_ids=ids, output_hidden_states=True)
    results, errors = [], []

    def call():
        try:
            with torch.no_grad():
                results.append(m(**kw).logits)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert m.num_graphs == 2  # the transform's signature and this one, captured once
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, scale=None):
        h = torch.relu(self.a(x))
        return self.b(h if scale is None else h * scale)


def test_mixed_adapter_call_after_a_call_of_another_signature():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    cfg = lambda: vera_fx.VeraConfig(r=4, target_modules=["a", "b"], init_weights=False)  # noqa: E731
    m = vera_fx.transform(_Scaled(), cfg(), example_inputs=(x,))
    vera_fx.add_adapter(m, "o", cfg())
    _randomise(m, 3)
    m.eval()
    names = ["default", "o", "default"]
    s = torch.tensor(2.0)
    with torch.no_grad():
        first = m(x=x, adapter_names=names)
        second = m(x=x, scale=s, adapter_names=names)
        for row, name in enumerate(names):
            vera_fx.set_adapter(m, name)
            torch.testing.assert_close(second[row], m(x=x, scale=s)[row], atol=1e-6, rtol=0)
            torch.testing.assert_close(first[row], m(x=x)[row], atol=1e-6, rtol=0)


def test_loading_into_a_merged_adapter_merges_the_loaded_values(tmp_path):
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                           init_weights=False))
    m.eval()
    ids = torch.randint(0, 96, (2, 7))
    _randomise(m, 1)
    m.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        expected = m(input_ids=ids).logits.clone()
    _randomise(m, 2)
    vera_fx.merge(m)
    vera_fx.load_adapter(m, tmp_path / "a")
    assert vera_fx.state.merged_adapters(m.graph_module) == {"default"}  # still merged
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    vera_fx.unmerge(m)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    # what save_pretrained writes is what the model computes with
    m.save_pretrained(tmp_path / "b")
    sd_a = vera_fx.checkpoint.read_checkpoint(tmp_path / "a")[1]
    sd_b = vera_fx.checkpoint.read_checkpoint(tmp_path / "b")[1]
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_a_failed_load_into_a_merged_adapter_keeps_the_merge(tmp_path):
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=["q_proj"], init_weights=False))
    m.eval()
    ids = torch.randint(0, 96, (2, 7))
    vera_fx.merge(m)
    with torch.no_grad():
        before = m(input_ids=ids).logits.clone()
    bad = {k: v[..., :1] for k, v in vera_fx.adapter_state_dict(m).items()}
    with pytest.raises(ValueError):
        vera_fx.load_adapter_state_dict(m, bad)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, before)
    assert "default" in vera_fx.state.merged_adapters(m.graph_module)


class _Capital(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, X, maskValue=None):
        y = self.proj(X)
        return y if maskValue is None else y * maskValue


@pytest.mark.parametrize("call", ["positional", "keyword", "two keywords"])
def test_inputs_keep_the_model_argument_names(call):
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    mv = torch.rand(2, 5)
    model = _Capital()
    cfg = vera_fx.VeraConfig(r=4, target_modules=["proj"], init_weights=False)
    example = {"positional": (x,), "keyword": {"X": x}, "two keywords": {"X": x, "maskValue": mv}}[call]
    m = vera_fx.transform(model, cfg, example_inputs=example)
    kw = {"X": x, "maskValue": mv} if call == "two keywords" else {"X": x}
    out = m(**kw)
    with vera_fx.disable_adapters(m):
        torch.testing.assert_close(m(**kw), model(**kw))
    assert out.shape == (2, 5) and not torch.equal(out, model(**kw))
    assert "X" in m.code
