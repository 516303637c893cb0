"""Merge pass: outputs and graph after merge, unmerge, copy-on-merge, merge_into, safe_merge, half precision,
PVeRA sampling sites, several adapters and every error path.

Transformers captures are the slow part (seconds each), so each test on a transformers model runs several
checks on one graph; the error paths and dtypes use a small MLP that captures in well under a second.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import vera_fx
from conftest import all_nodes, minilm, text_inputs, tiny_gpt2, tiny_llama
from vera_fx.adapters import add_adapter, disable_adapters, set_adapter
from vera_fx.methods import CONTAINER
from vera_fx.passes import merge as merge_module
from vera_fx.versions import adapter_flags


class MLP(nn.Module):
    def __init__(self, tie_unused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)
        if tie_unused:  # a parameter tied to `up.weight` that the forward never reads
            self.spare = nn.Linear(16, 32)
            self.spare.weight = self.up.weight

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


class TiedMLP(nn.Module):
    """Two calls read one weight (as GPT-2's tied embedding and lm_head do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))


def _randomise(gm: GraphModule, seed: int = 0, scale: float = 0.5) -> None:
    """Nonzero lambdas, so that merging changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _mlp(config: vera_fx.VeraConfig | None = None, **kw) -> tuple[nn.Module, GraphModule]:
    model = MLP(**kw)
    gm = vera_fx.transform(model, config or vera_fx.VeraConfig(r=4, target_modules=["up", "down"]), (X,))
    _randomise(gm)
    return model, gm.eval()


def _calls(gm: GraphModule) -> list:
    """Every node as (op, target, args, kwargs) with nodes replaced by their position: node for node."""
    nodes = all_nodes(gm)  # every graph of the tree
    index = {n: i for i, n in enumerate(nodes)}
    pos = lambda a: torch.fx.node.map_arg(a, lambda n: ("%", index[n]))  # noqa: E731
    return [(n.op, str(n.target), pos(n.args), pos(n.kwargs)) for n in nodes]


def _snapshot(module: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()}


def _assert_same(module: nn.Module, snap: dict) -> None:
    now = module.state_dict(keep_vars=True)
    assert set(now) == set(snap)
    for k, (ptr, value) in snap.items():
        assert now[k].data_ptr() == ptr, k
        assert torch.equal(now[k].detach(), value), k


def _logits(gm, x):
    with torch.no_grad():
        return gm(**x).logits


@pytest.mark.parametrize("build, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_merge_roundtrip(build, targets):
    model = build()
    x = text_inputs(model)
    base = vera_fx.capture(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2: fan_in_fan_out is taken from the site
        gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=targets))
    _randomise(gm)
    gm.eval()
    user = _snapshot(model)
    params = dict(gm.named_parameters())
    ref = _logits(gm, x)
    assert not torch.allclose(ref, _logits(base.eval(), x), atol=1e-3)  # the adapter matters

    assert vera_fx.merge(gm) is gm
    torch.testing.assert_close(_logits(gm, x), ref, atol=1e-5, rtol=1e-5)
    assert _calls(gm) == _calls(base)  # node for node the captured base graph
    sites = vera_fx.sites(gm)
    assert sites and all(s.merged == ("default",) and s.adapters == () for s in sites)
    _assert_same(model, user)  # copy-on-merge: the user's model is untouched
    changed = [n for n, p in gm.named_parameters() if p is not params[n]]
    assert sorted(changed) == sorted(s.weight for s in sites)

    vera_fx.merge(gm)  # merging twice is a no-op
    torch.testing.assert_close(_logits(gm, x), ref, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        vera_fx.merge(gm, adapter_names=["default"])

    vera_fx.unmerge(gm)  # the original tensors come back: exact
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert torch.equal(_logits(gm, x), ref)
    assert not adapter_flags(gm).merged
    _assert_same(model, user)

    vera_fx.merge(gm)  # merge, unmerge, merge is stable
    torch.testing.assert_close(_logits(gm, x), ref, atol=1e-5, rtol=1e-5)
    assert _calls(gm) == _calls(base)


def test_merge_real_minilm():
    model = minilm()
    x = text_inputs(model, labels=False)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=16))
    _randomise(gm, scale=0.2)
    gm.eval()
    with torch.no_grad():
        ref = gm(**x).last_hidden_state
        base = model(**x).last_hidden_state
    assert (ref - base).abs().max() > 1e-3
    vera_fx.merge(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(**x).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(**x).last_hidden_state, base)  # the model is untouched
    assert not any((n.meta.get("vera_fx") or {}) for n in all_nodes(gm))


def test_merge_into_gives_the_model_the_adapter(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    x = text_inputs(model)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     modules_to_save=["lm_head"]))
    _randomise(gm)
    with torch.no_grad():  # a trained copy of lm_head, as after training with modules_to_save
        mts = [p for n, p in gm.named_parameters() if p.requires_grad and "lambda" not in n]
        assert mts
        for p in mts:
            p.add_(0.1)
    gm.eval()
    ref = _logits(gm, x)
    q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")

    assert vera_fx.merge_into(model, gm) is model  # gm not merged: folded on the way
    assert model.get_parameter("model.layers.0.self_attn.q_proj.weight") is q  # same Parameter, new values
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(gm, x), ref)  # the graph keeps computing what it computed
    assert any(n.meta.get("vera_fx") for n in all_nodes(gm))  # and keeps its adapter nodes

    ids = x["input_ids"][:1, :4]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, x), ref, atol=1e-5, rtol=1e-5)

    fresh = tiny_llama()  # a merged graph writes the same weights
    vera_fx.merge(gm)
    vera_fx.merge_into(fresh, gm)
    torch.testing.assert_close(_logits(fresh, x), ref, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_and_changes_nothing():
    model, gm = _mlp()
    code, params = gm.code, dict(gm.named_parameters())
    ref = gm(X)
    with torch.no_grad():
        gm.get_parameter(f"{CONTAINER}.default.sites.down.vera_lambda_b")[0] = float("nan")
    with pytest.raises(ValueError, match=r"site 'down'.*non-finite"):
        vera_fx.merge(gm, safe_merge=True)
    assert gm.code == code and all(p is params[n] for n, p in gm.named_parameters())
    assert not adapter_flags(gm).merged and not vera_fx.sites(gm)[0].merged
    with torch.no_grad():
        gm.get_parameter(f"{CONTAINER}.default.sites.down.vera_lambda_b")[0] = 0.5
    vera_fx.merge(gm, safe_merge=True)
    assert vera_fx.sites(gm)[1].merged == ("default",)
    assert not torch.allclose(gm(X), ref)  # the lambda changed, so the output did too


def test_merge_is_atomic(monkeypatch):
    model, gm = _mlp()
    code, params, ref = gm.code, dict(gm.named_parameters()), gm(X)

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(merge_module, "remove_adapter_nodes", fail)  # fails after the weights were swapped in
    with pytest.raises(RuntimeError, match="boom"):
        vera_fx.merge(gm)
    assert gm.code == code and all(p is params[n] for n, p in gm.named_parameters())
    assert not adapter_flags(gm).merged and not adapter_flags(gm).folded
    assert torch.equal(gm(X), ref)
    monkeypatch.undo()

    vera_fx.merge(gm)
    merged_code = gm.code
    monkeypatch.setattr(merge_module, "emit_adapter", fail)
    with pytest.raises(RuntimeError, match="boom"):
        vera_fx.unmerge(gm)
    assert gm.code == merged_code and vera_fx.sites(gm)[0].merged == ("default",)
    monkeypatch.undo()
    vera_fx.unmerge(gm)
    assert gm.code == code and torch.equal(gm(X), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merges_in_float32(dtype):
    model = MLP().to(dtype)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["up", "down"]), (X.to(dtype),))
    _randomise(gm)
    gm.eval()
    x = X.to(dtype)
    ref = gm(x)
    state = getattr(gm, CONTAINER)["default"]
    site = vera_fx.sites(gm)[0]
    w = gm.get_parameter(site.weight)
    expected = (w.float() + state.method.delta_weight(state, site).detach()).to(dtype)
    vera_fx.merge(gm)
    merged = gm.get_parameter(site.weight)
    assert merged.dtype == dtype and torch.equal(merged, expected)
    torch.testing.assert_close(gm(x), ref, atol=3e-2, rtol=3e-2)
    vera_fx.unmerge(gm)
    assert gm.get_parameter(site.weight) is w


def test_unmerge_after_the_merged_weight_changed():
    model, gm = _mlp()
    w = gm.get_parameter("up.weight").detach().clone()
    ref = gm(X)
    vera_fx.merge(gm)
    with torch.no_grad():
        gm.get_parameter("up.weight").copy_(gm.get_parameter("up.weight"))  # e.g. load_state_dict
    with pytest.warns(UserWarning, match="'up.weight'.*changed after merge"):
        vera_fx.unmerge(gm)
    torch.testing.assert_close(gm.get_parameter("up.weight"), w, atol=1e-6, rtol=0)
    torch.testing.assert_close(gm(X), ref, atol=1e-5, rtol=1e-5)


def test_deepcopy_of_a_merged_graph_unmerges():
    model, gm = _mlp()
    ref = gm(X)
    vera_fx.merge(gm)
    other = copy.deepcopy(gm)
    vera_fx.unmerge(other)
    torch.testing.assert_close(other(X), ref)
    assert vera_fx.sites(gm)[0].merged == ("default",)  # the original stays merged


def test_sampling_sites_stay_unmerged():
    model = MLP()
    cfg = vera_fx.PveraConfig(r=4, target_modules=["up", "down"], sample_at_inference={"down": True})
    gm = vera_fx.transform(model, cfg, (X,))
    _randomise(gm)
    gm.eval()
    with pytest.warns(UserWarning, match=r"'down'.*sample at inference"):
        vera_fx.merge(gm)
    up, down = vera_fx.sites(gm)
    assert up.merged == ("default",) and down.adapters == ("default",) and not down.merged
    vera_fx.set_sample_at_inference(gm, False)  # the unmerged site now follows its mean path
    ref = copy.deepcopy(gm)
    vera_fx.unmerge(ref)
    torch.testing.assert_close(gm(X), ref(X), atol=1e-5, rtol=1e-5)


def test_merge_into_refuses_a_site_it_cannot_bake():
    """merge_into never returns a model without an adapter: a sampling site (it has no deterministic weight)
    raises a ValueError naming it, and nothing is written, not even the sites that could be baked."""
    model = MLP()
    cfg = vera_fx.PveraConfig(r=4, target_modules=["up", "down"], sample_at_inference={"down": True})
    gm = vera_fx.transform(model, cfg, (X,))
    _randomise(gm)
    gm.eval()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot bake the adapters into 1 site.*nothing was written: 'down': "
                                         r"adapter\(s\) \['default'\] sample at inference"):
        vera_fx.merge_into(model, gm)
    _assert_same(model, snap)
    vera_fx.set_sample_at_inference(gm, False)
    assert vera_fx.merge_into(model, gm) is model
    torch.testing.assert_close(model(X), gm(X), atol=1e-5, rtol=1e-5)


def test_several_adapters():
    model, gm = _mlp()
    add_adapter(gm, "other", vera_fx.VeraConfig(r=4, target_modules=["down"]))
    _randomise(gm, seed=1)
    set_adapter(gm, ["default", "other"])
    gm.eval()
    ref = gm(X)
    vera_fx.merge(gm, adapter_names=["other"])
    assert [s.merged for s in vera_fx.sites(gm)] == [(), ("other",)]
    vera_fx.merge(gm)  # the rest of the active adapters
    assert [s.merged for s in vera_fx.sites(gm)] == [("default",), ("other", "default")]
    torch.testing.assert_close(gm(X), ref, atol=1e-5, rtol=1e-5)
    vera_fx.unmerge(gm)
    torch.testing.assert_close(gm(X), ref, atol=1e-6, rtol=1e-6)
    set_adapter(gm, "default")
    with pytest.warns(UserWarning, match="nothing to fold"):
        vera_fx.merge(gm, adapter_names=["other"])  # inactive: it has no nodes to fold


def test_tied_weights_are_left_unmerged():
    model = TiedMLP()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["a"]), (X,))
    _randomise(gm)
    gm.eval()
    ref = gm(X)
    with pytest.warns(UserWarning, match=r"'a'.*tied"):
        vera_fx.merge(gm)
    assert vera_fx.sites(gm)[0].adapters == ("default",)
    torch.testing.assert_close(gm(X), ref)


def test_merge_accepts_a_compiled_graph():
    model, gm = _mlp()
    compiled = torch.compile(gm)  # not called: no compilation happens here
    assert vera_fx.merge(compiled) is compiled
    assert vera_fx.sites(gm)[0].merged == ("default",)
    assert vera_fx.unmerge(compiled) is compiled and not vera_fx.sites(gm)[0].merged


def test_errors():
    model, gm = _mlp()
    calls, user = _calls(gm), _snapshot(model)
    with pytest.raises(TypeError, match="GraphModule"):
        vera_fx.merge(model)
    with pytest.raises(TypeError, match="GraphModule"):
        vera_fx.unmerge(model)
    with pytest.raises(ValueError, match="no adapter"):
        vera_fx.merge(vera_fx.capture(MLP(), (X,)))
    with pytest.raises(ValueError, match=r"\['nope'\] not on this graph; adapters: \['default'\]"):
        vera_fx.merge(gm, adapter_names=["nope"])
    with pytest.raises(TypeError, match=r"adapter_names=\['default'\]"):
        vera_fx.merge(gm, adapter_names="default")
    with pytest.raises(TypeError, match="safe_merge"):
        vera_fx.merge(gm, safe_merge="yes")
    with disable_adapters(gm):
        with pytest.raises(ValueError, match="disabled"):
            vera_fx.merge(gm)
    assert vera_fx.unmerge(gm) is gm  # nothing merged: no-op
    assert _calls(gm) == calls
    _assert_same(model, user)


def test_merge_into_errors_change_nothing():
    model, gm = _mlp()
    with pytest.raises(TypeError, match="nn.Module"):
        vera_fx.merge_into("model", gm)
    with pytest.raises(TypeError, match="GraphModule"):
        vera_fx.merge_into(model, model)
    with pytest.raises(TypeError, match="safe_merge"):
        vera_fx.merge_into(model, gm, safe_merge=1)

    other = MLP()
    other.down = nn.Linear(32, 8)  # another shape
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"'down.weight': shape \(8, 32\) on the model, \(16, 32\) on the graph"):
        vera_fx.merge_into(other, gm)
    _assert_same(other, snap)

    missing = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="'up.weight': no such parameter on Sequential"):
        vera_fx.merge_into(missing, gm)

    tied, tgm = _mlp(tie_unused=True)
    snap = _snapshot(tied)
    with pytest.raises(ValueError, match=r"'(up|spare).weight' is tied to \['(spare|up).weight'\]"):
        vera_fx.merge_into(tied, tgm)
    _assert_same(tied, snap)

    with torch.no_grad():
        gm.get_parameter(f"{CONTAINER}.default.sites.up.vera_lambda_d")[0] = float("inf")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="site 'up'"):
        vera_fx.merge_into(model, gm, safe_merge=True)
    _assert_same(model, snap)
