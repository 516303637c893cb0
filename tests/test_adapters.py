"""Several adapters on one graph: add, switch, add up, disable, delete; the shared-projection rules."""

from __future__ import annotations

import pytest
import torch

import vera_fx
from conftest import adapter_parameters, all_nodes, text_inputs, tiny_bert, tiny_llama, tree_code

QV = ["q_proj", "v_proj"]


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run(gm, x) -> torch.Tensor:
    with torch.no_grad():
        return gm(**x).logits


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    x = text_inputs(model, labels=False)
    gm = vera_fx.capture(model, x).eval()
    return gm, x, run(gm, x)


@pytest.fixture
def two(llama):
    """Adapters a and b (same r, different values) on the llama graph; removed afterwards."""
    gm, x, base = llama
    vera_fx.add_adapter(gm, "a", vera_fx.VeraConfig(r=8, target_modules=QV))
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=8, target_modules=["q_proj"]))
    randomise(gm.vera_fx_adapters.a.sites, 1)
    randomise(gm.vera_fx_adapters.b.sites, 2)
    yield gm, x, base
    for name in list(gm.vera_fx_adapters):
        vera_fx.delete_adapter(gm, name)
    assert torch.equal(run(gm, x), base)


def _signature(gm) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in all_nodes(gm) if n.target != "training"]


def trainable(gm) -> set[str]:
    """Adapters with a trainable parameter (a block's lambdas are named ``<block>.vera_fx_adapters.<a>...``)."""
    parts = [n.split(".") for n, p in gm.named_parameters() if p.requires_grad]
    return {q[q.index("vera_fx_adapters") + 1] for q in parts if "vera_fx_adapters" in q}


def test_switch_add_up_disable_delete(two, tmp_path):
    gm, x, base = two
    # A later adapter is inactive until set_adapter (as in PEFT); only active lambdas train.
    assert vera_fx.active_adapters(gm) == ["a"] and trainable(gm) == {"a"}
    out_a = run(gm, x)
    vera_fx.set_adapter(gm, "b")
    out_b = run(gm, x)
    code = tree_code(gm)
    assert trainable(gm) == {"b"} and "vera_fx_adapters.a." not in code and "vera_fx_adapters.b." in code
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_b, base)
    vera_fx.set_adapter(gm, ["a", "b"])
    out_ab = run(gm, x)
    assert trainable(gm) == {"a", "b"} and vera_fx.active_adapters(gm) == ["a", "b"]

    # Several active adapters add up exactly as in PEFT.
    peft = pytest.importorskip("peft")
    vera_fx.save_adapter(gm, tmp_path / "a", "a")
    vera_fx.save_adapter(gm, tmp_path / "b", "b")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="one").eval()
    pm.load_adapter(str(tmp_path / "b"), adapter_name="two")
    pm.base_model.set_adapter(["one", "two"])
    with torch.no_grad():
        torch.testing.assert_close(pm(**x).logits, out_ab, atol=1e-5, rtol=0)

    with vera_fx.disable_adapters(gm):
        assert torch.equal(run(gm, x), base)
        assert "lambda" not in tree_code(gm)
    assert torch.equal(run(gm, x), out_ab)  # same active list, same graph, same bits

    b_values = {k: v.clone() for k, v in gm.vera_fx_adapters.b.state_dict().items()}
    vera_fx.delete_adapter(gm, "a")
    assert list(gm.vera_fx_adapters) == ["b"] and vera_fx.active_adapters(gm) == ["b"]
    assert all(torch.equal(v, gm.vera_fx_adapters.b.state_dict()[k]) for k, v in b_values.items())
    assert torch.equal(run(gm, x), out_b)


def test_projections_are_shared_and_rules_checked(two):
    gm, x, base = two
    a, b = gm.vera_fx_adapters.a, gm.vera_fx_adapters.b
    assert b.vera_A.data_ptr() == a.vera_A.data_ptr() and b.vera_B.data_ptr() == a.vera_B.data_ptr()
    code, before = _signature(gm), run(gm, x)
    cases = {
        "projection_prng_key": vera_fx.VeraConfig(r=8, target_modules=QV, projection_prng_key=1),
        "save_projection": vera_fx.VeraConfig(r=8, target_modules=QV, save_projection=False),
        "r=16 is higher": vera_fx.VeraConfig(r=16, target_modules=QV),
        "largest layers first": vera_fx.VeraConfig(r=8, target_modules=["up_proj"]),  # 48 outputs > 32
    }
    for message, cfg in cases.items():
        with pytest.raises(ValueError, match=message):
            vera_fx.add_adapter(gm, "c", cfg)
        assert list(gm.vera_fx_adapters) == ["a", "b"] and _signature(gm) == code
        assert torch.equal(run(gm, x), before)
    with pytest.raises(ValueError, match="not on this graph"):
        vera_fx.set_adapter(gm, ["a", "nope"])
    with pytest.raises(ValueError, match="not on this graph"):
        vera_fx.delete_adapter(gm, "nope")
    assert vera_fx.active_adapters(gm) == ["a"] and torch.equal(run(gm, x), before)

    # A lower r reuses the leading rows / columns of the shared projections.
    vera_fx.add_adapter(gm, "low", vera_fx.VeraConfig(r=2, target_modules=["q_proj"]))
    low = gm.vera_fx_adapters.low
    assert low.vera_A.shape == (2, 32) and low.vera_B.shape == (32, 2)
    assert low.vera_A.data_ptr() == a.vera_A.data_ptr() and torch.equal(low.vera_B, a.vera_B[:, :2])
    randomise(low.sites, 3)
    vera_fx.set_adapter(gm, "low")
    assert not torch.equal(run(gm, x), base)


def test_first_adapter_active_and_pvera_alongside(llama):
    gm, x, base = llama
    pytest.importorskip("vera_fx.methods.pvera")
    vera_fx.add_adapter(gm, "v", vera_fx.VeraConfig(r=4, target_modules=QV))
    vera_fx.add_adapter(gm, "p", vera_fx.PveraConfig(r=4, target_modules=QV, projection_prng_key=7))
    try:
        assert vera_fx.active_adapters(gm) == ["v"]
        randomise(gm.vera_fx_adapters.p.sites, 4)
        vera_fx.set_adapter(gm, "p")
        assert not torch.equal(run(gm, x), base)
        with vera_fx.disable_adapters(gm):
            assert torch.equal(run(gm, x), base)
    finally:
        vera_fx.delete_adapter(gm, "v")
        vera_fx.delete_adapter(gm, "p")
    assert torch.equal(run(gm, x), base) and vera_fx.active_adapters(gm) == []


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer-then-inner", "inner-then-outer"])
def test_modules_to_save_nested_across_adapters(outer_first, tmp_path):
    """One adapter copies ``head``, another only ``head.0`` (a module inside it), added in either order: each
    active adapter's graph reads its own copies and the base elsewhere, as PEFT does with each saved adapter;
    both active at once is refused with the two paths named; deleting the other adapter keeps the routing."""
    import copy
    import warnings

    import peft

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.head(self.fc(x))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 8)
    paths = {"outer": ["head"], "inner": ["head.0"]}
    first, second = ("outer", "inner") if outer_first else ("inner", "outer")
    gm = vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["fc"], modules_to_save=paths[first]),
                           example_inputs={"x": x}, adapter_name=first).eval()
    vera_fx.add_adapter(gm, second, vera_fx.VeraConfig(r=4, target_modules=["fc"], modules_to_save=paths[second]))
    for k, name in enumerate((first, second)):
        randomise(getattr(gm.vera_fx_adapters, name).modules_to_save, k + 1)

    def expected(name: str) -> torch.Tensor:  # lambda_b = 0: the adapters add nothing; only the heads differ
        ref = copy.deepcopy(net)
        copies = getattr(gm.vera_fx_adapters, name).modules_to_save
        if name == "outer":
            ref.head.load_state_dict(copies["head"].state_dict())
        else:
            ref.head[0].load_state_dict(copies["head__0"].state_dict())
        with torch.no_grad():
            return ref(x)

    def out(m) -> torch.Tensor:
        with torch.no_grad():
            return m(x)

    for name in (first, second, first):
        vera_fx.set_adapter(gm, name)
        torch.testing.assert_close(out(gm), expected(name), atol=0, rtol=0)
    gm.save_pretrained(tmp_path)
    for name in (first, second):  # each saved adapter, loaded by PEFT alone, computes what it computes here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / name))  # not "default": a subfolder
        torch.testing.assert_close(out(pm.eval()), expected(name), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"both have a trainable copy of 'head' \(modules_to_save"):
        vera_fx.set_adapter(gm, [first, second])
    vera_fx.set_adapter(gm, second)
    vera_fx.delete_adapter(gm, first)
    torch.testing.assert_close(out(gm), expected(second), atol=0, rtol=0)


def test_modules_to_save_belong_to_their_adapter():
    model = tiny_bert()
    x = text_inputs(model, labels=False)
    cfg = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    gm = vera_fx.transform(model, vera_fx.VeraConfig(**cfg), example_inputs=x).eval()
    with vera_fx.disable_adapters(gm):
        base = run(gm, x)
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(**cfg))
    randomise(gm.vera_fx_adapters.default.modules_to_save, 1)
    randomise(gm.vera_fx_adapters.b.modules_to_save, 2)
    out_default = run(gm, x)
    vera_fx.set_adapter(gm, "b")
    out_b = run(gm, x)
    assert not torch.allclose(out_default, out_b)
    # The copies are the adapters'; the graph's base head stays frozen and shares the user's weights.
    assert not gm.classifier.weight.requires_grad and torch.equal(gm.classifier.weight, model.classifier.weight)
    with pytest.raises(ValueError, match="both have a trainable copy of 'classifier'"):
        vera_fx.set_adapter(gm, ["default", "b"])
    assert vera_fx.active_adapters(gm) == ["b"] and torch.equal(run(gm, x), out_b)
    with vera_fx.disable_adapters(gm):
        assert torch.equal(run(gm, x), base)
    with pytest.warns(UserWarning, match="'b' was active.*now 'default'"):  # as PEFT: another one takes over
        vera_fx.delete_adapter(gm, "b")
    assert vera_fx.active_adapters(gm) == ["default"]
    vera_fx.set_adapter(gm, "default")
    assert torch.equal(run(gm, x), out_default)
    vera_fx.add_adapter(gm, "c", vera_fx.VeraConfig(r=4, target_modules=["query"], bias="all"))
    with pytest.raises(ValueError, match="only one adapter per graph"):
        vera_fx.add_adapter(gm, "d", vera_fx.VeraConfig(r=4, target_modules=["query"], bias="vera_only"))
