"""Mixed-adapter batches (serving.py) and loading many adapters at once.

Every mixed row is checked against that row run alone with its adapter active (set_adapter), and
"__base__" rows against the base model (disable_adapters).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vera_fx
from conftest import adapter_parameters, text_inputs, tiny_gpt2, tiny_llama
from vera_fx.sites import graph_modules
from vera_fx.serving import load_adapters, mixed_adapter_forward, mixed_graph


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def rows(x, i):
    return {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else tuple(v[i:i + 1] for v in x)


def call(gm, x):
    return gm(**x) if isinstance(x, dict) else gm(*x)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def alone(gm, x, names, before_row=None):
    """Each row run alone with its adapter active, in row order."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with vera_fx.disable_adapters(gm):
                    outs.append(logits(call(gm, rows(x, i))))
            else:
                vera_fx.set_adapter(gm, name)
                outs.append(logits(call(gm, rows(x, i))))
    return torch.cat(outs)


def mixed(gm, x, names):
    with torch.no_grad():
        return logits(mixed_adapter_forward(gm, names, **x) if isinstance(x, dict)
                      else mixed_adapter_forward(gm, names, *x))


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    x = text_inputs(model, batch=5, labels=False)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                           example_inputs=text_inputs(model, labels=False), adapter_name="a")
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=8, target_modules=["q_proj"]))
    vera_fx.add_adapter(gm, "c", vera_fx.VeraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    for k, name in enumerate("abc"):
        randomise(gm.vera_fx_adapters[name].sites, k)
    return gm.eval(), x


def test_mixed_rows_equal_single_adapter_runs(llama):
    """Two banks (r=8: a, b; r=4: c), sites targeted by some adapters only, "__base__" rows; then training a
    through the ordinary graph changes the cached mixed graph's rows of a, with no rebuild."""
    gm, x = llama
    names = ["a", "__base__", "c", "b", "a"]
    got = mixed(gm, x, names)
    torch.testing.assert_close(got, alone(gm, x, names), atol=1e-5, rtol=0)
    with torch.no_grad():  # the model object's keyword, as in PEFT
        torch.testing.assert_close(gm(**x, adapter_names=names).logits, got, atol=0, rtol=0)
    with vera_fx.disable_adapters(gm), torch.no_grad():
        torch.testing.assert_close(got[1:2], gm(**rows(x, 1)).logits, atol=1e-5, rtol=0)
    built = mixed_graph(gm)
    code = "".join(g.code for g in graph_modules(built))  # the root and its blocks
    assert len(graph_modules(built)) == 3  # the two decoder layers stay blocks, called with the index
    assert "index_select" in code and code.count("vera_fx_adapter_index") >= 3

    vera_fx.set_adapter(gm, "a")
    gm.train()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=1.0)
    gm(**x).logits.square().mean().backward()
    opt.step()
    gm.eval()
    again = mixed(gm, x, names)
    assert mixed_graph(gm) is built
    assert not torch.allclose(again[0], got[0]) and torch.equal(again[1:4], got[1:4])
    torch.testing.assert_close(again, alone(gm, x, names), atol=1e-5, rtol=0)


def test_mixed_errors(llama):
    gm, x = llama
    with pytest.raises(ValueError, match=r"not loaded: \['zz'\]; loaded adapters: \['a', 'b', 'c'\]"):
        mixed_adapter_forward(gm, ["a", "zz", "a", "a", "a"], **x)
    with pytest.raises(ValueError, match="has 2 names but the batch has 5 rows"):
        mixed_adapter_forward(gm, ["a", "b"], **x)
    with pytest.raises(TypeError, match="list of adapter names"):
        mixed_adapter_forward(gm, "a", **x)
    with pytest.raises(TypeError, match="vera_fx_adapter_index"):
        mixed_adapter_forward(gm, ["a"] * 5, vera_fx_adapter_index=torch.zeros(5, dtype=torch.long), **x)
    gm.train()
    try:
        with pytest.raises(ValueError, match="for inference.*gm.eval"):
            mixed_adapter_forward(gm, ["a"] * 5, **x)
    finally:
        gm.eval()
    vera_fx.set_adapter(gm, "b")
    vera_fx.merge(gm)
    try:
        with pytest.raises(ValueError, match=r"\['b'\] are merged.*vera_fx.unmerge"):
            mixed_adapter_forward(gm, ["a"] * 5, **x)
    finally:
        vera_fx.unmerge(gm)
    bare = vera_fx.capture(tiny_llama(), text_inputs(tiny_llama(), labels=False))
    with pytest.raises(ValueError, match="no adapter"):
        mixed_graph(bare)


def test_mixed_refuses_modules_to_save():
    model = tiny_llama()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                           example_inputs=text_inputs(model, labels=False)).eval()
    with pytest.raises(ValueError, match="modules_to_save.*cannot differ per row"):
        mixed_adapter_forward(gm, ["default"] * 3, **text_inputs(model, labels=False))


def test_mixed_pvera_samples_per_row():
    """PVeRA in eval: mean path, then sampling on for one adapter: each row draws from its own adapter's
    seeded stream, in row order (rows of p2 and "__base__" draw nothing)."""
    model = tiny_llama()
    x = text_inputs(model, batch=4, labels=False)
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], generator_seed=3)
    gm = vera_fx.transform(model, vera_fx.PveraConfig(**cfg), example_inputs=text_inputs(model, labels=False),
                           adapter_name="p1")
    vera_fx.add_adapter(gm, "p2", vera_fx.PveraConfig(**{**cfg, "generator_seed": 4}))
    randomise(gm.vera_fx_adapters.p1.sites, 1)
    randomise(gm.vera_fx_adapters.p2.sites, 2)
    gm.eval()
    names = ["p1", "p2", "p1", "__base__"]
    torch.testing.assert_close(mixed(gm, x, names), alone(gm, x, names), atol=1e-5, rtol=0)
    vera_fx.set_sample_at_inference(gm, True, adapter_name="p1")
    vera_fx.sampling.reseed(gm, adapter_name="p1")
    ref = alone(gm, x, names)
    vera_fx.sampling.reseed(gm, adapter_name="p1")
    got = mixed(gm, x, names)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got, mixed(gm, x, names))  # the streams moved on


def test_mixed_gpt2_conv1d():
    model = tiny_gpt2()
    x = text_inputs(model, batch=3, labels=False)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                           example_inputs=text_inputs(model, labels=False), adapter_name="a")
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    randomise(gm.vera_fx_adapters.a.sites, 1)
    randomise(gm.vera_fx_adapters.b.sites, 2)
    gm.eval()
    names = ["b", "a", "__base__"]
    torch.testing.assert_close(mixed(gm, x, names), alone(gm, x, names), atol=1e-5, rtol=0)


def test_mixed_quantized_int8():
    bnb = pytest.importorskip("bitsandbytes")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(64, 128)
            self.head = nn.Linear(128, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.up(x)))

    torch.manual_seed(0)
    net = Net()
    q = bnb.nn.Linear8bitLt(64, 128, True, has_fp16_weights=False)
    q.load_state_dict(net.up.state_dict())
    net.up = q.to("cpu")
    net.eval()
    gm = vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["up", "head"]),
                           example_inputs=(torch.randn(2, 6, 64),), adapter_name="a")
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=4, target_modules=["up"]))
    randomise(gm.vera_fx_adapters.a.sites, 1)
    randomise(gm.vera_fx_adapters.b.sites, 2)
    gm.eval()
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)),)
    names = ["a", "b", "__base__"]
    assert {s.kind for s in vera_fx.sites(gm)} == {"int8", "linear"}
    torch.testing.assert_close(mixed(gm, x, names), alone(gm, x, names), atol=1e-5, rtol=0)


# --- load_adapters ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three adapters (r=8 q/v, r=8 q, r=4 k) saved from one graph, and the outputs they give alone."""
    path = tmp_path_factory.mktemp("bank")
    model = tiny_llama()
    x = text_inputs(model, batch=4, labels=False)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                           example_inputs=text_inputs(model, labels=False), adapter_name="t0")
    vera_fx.add_adapter(gm, "t1", vera_fx.VeraConfig(r=8, target_modules=["q_proj"]))
    vera_fx.add_adapter(gm, "t2", vera_fx.VeraConfig(r=4, target_modules=["k_proj"]))
    folders = {}
    for k, name in enumerate(["t0", "t1", "t2"]):
        randomise(gm.vera_fx_adapters[name].sites, 10 + k)
        vera_fx.save_adapter(gm, path / name, name)
        folders[name] = path / name
    gm.eval()
    names = ["t2", "__base__", "t0", "t1"]
    return model, x, folders, names, alone(gm, x, names)


def fresh(model):
    return vera_fx.capture(model, text_inputs(model, labels=False)).eval()


def test_load_adapters_then_mix(saved):
    model, x, folders, names, ref = saved
    gm = fresh(model)
    assert load_adapters(gm, folders) == ["t0", "t1", "t2"]
    assert vera_fx.active_adapters(gm) == ["t0"]
    assert not any(p.requires_grad for n, p in gm.named_parameters() if ".t1." in n or ".t2." in n)
    torch.testing.assert_close(mixed(gm, x, names), ref, atol=1e-5, rtol=0)
    # A graph with adapters keeps its active list; later adapters go into the bank (a rebuilt mixed graph).
    before = mixed_graph(gm)
    load_adapters(gm, {"u0": folders["t0"]})
    assert vera_fx.active_adapters(gm) == ["t0"] and mixed_graph(gm) is not before
    other = ["u0", "t0", "t2", "t1"]
    got = mixed(gm, x, other)
    torch.testing.assert_close(got, alone(gm, x, other), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3:], ref[3:], atol=1e-5, rtol=0)


def test_load_adapters_is_atomic(saved, tmp_path):
    model, x, folders, names, ref = saved
    gm = fresh(model)
    load_adapters(gm, {"t0": folders["t0"]})
    code, params = gm.code, dict(gm.named_parameters())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folders["t1"] / "adapter_config.json").read_text()
                                             .replace('"r": 8', '"r": 16'))
    (bad / "adapter_model.safetensors").write_bytes((folders["t1"] / "adapter_model.safetensors").read_bytes())
    cases = [({"x1": folders["t1"], "x2": tmp_path / "missing"}, "missing.*does not exist"),
             ({"x1": folders["t1"], "x2": bad}, r"bad.*config says r=16"),  # the file's shapes against its r
             ({"t0": folders["t1"]}, "'t0' is already on this graph"),
             ({"__base__": folders["t1"]}, "reserved"),
             ({"1x": folders["t1"]}, "invalid"),
             ({}, "non-empty dict")]
    for spec, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            load_adapters(gm, spec)
        assert gm.code == code and dict(gm.named_parameters()).keys() == params.keys()
        assert list(gm.vera_fx_adapters) == ["t0"]
    empty = fresh(model)
    with pytest.raises(ValueError, match="missing"):
        load_adapters(empty, {"x": tmp_path / "missing"})
    assert not hasattr(empty, "vera_fx_adapters")


def test_load_adapters_checks_keys_and_extras(saved, tmp_path):
    model, x, folders, names, ref = saved
    gm = fresh(model)
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "adapter_config.json").write_text((folders["t1"] / "adapter_config.json").read_text()
                                                .replace('"q_proj"', '"v_proj"'))
    (shapes / "adapter_model.safetensors").write_bytes((folders["t1"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shapes.*missing keys.*v_proj"):
        load_adapters(gm, {"a": folders["t0"], "b": shapes})
    assert not hasattr(gm, "vera_fx_adapters") and "vera_fx_adapters" not in gm.code
    mts = tmp_path / "mts"
    src = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                            example_inputs=text_inputs(model, labels=False))
    vera_fx.save_adapter(src, mts)
    with pytest.raises(ValueError, match="mts.*load_adapters takes adapters of lambdas only"):
        load_adapters(gm, {"m": mts})
