"""Match pass: site kinds and names, target selection rules (PEFT's), and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_fx
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_vit
from vera_fx.passes.match import select_sites


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for name, build in {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}.items():
        m = build()
        gm = vera_fx.capture(m)
        vera_fx.passes.MatchPass()(gm)
        out[name] = (m, gm)
    return out


def _names(gm, cfg):
    return [s.name for s in select_sites(gm, cfg)]


def test_every_linear_is_a_site_with_kind_and_shape(graphs):
    m, gm = graphs["gpt2"]
    sites = {s.name: s for s in vera_fx.read_sites(gm)}
    assert sites["transformer.h.0.attn.c_attn"].kind == "conv1d"
    assert (sites["transformer.h.0.attn.c_attn"].in_features, sites["transformer.h.0.attn.c_attn"].out_features) == (
        32, 96)
    assert sites["lm_head"].kind == "linear"
    m, gm = graphs["llama"]
    names = {s.name for s in vera_fx.read_sites(gm)}
    expected = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert names == expected


def test_default_targets_per_architecture(graphs):
    assert _names(graphs["llama"][1], vera_fx.VeraConfig(r=4)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert _names(graphs["gpt2"][1], vera_fx.VeraConfig(r=4)) == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(n.endswith(("query", "value")) for n in _names(graphs["bert"][1], vera_fx.VeraConfig(r=4)))


def test_all_linear_excludes_output_head(graphs):
    m, gm = graphs["llama"]
    names = _names(gm, vera_fx.VeraConfig(r=4, target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 14
    m, gm = graphs["gpt2"]
    assert "lm_head" not in _names(gm, vera_fx.VeraConfig(r=4, target_modules="ALL-LINEAR"))


def test_regex_is_a_full_match(graphs):
    gm = graphs["llama"][1]
    assert _names(gm, vera_fx.VeraConfig(r=4, target_modules=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="regex"):
        _names(gm, vera_fx.VeraConfig(r=4, target_modules="q_proj"))  # a full match is needed


@pytest.mark.parametrize("ltt, pattern", [(1, None), ([0], None), ([1], "layers"), (0, ["layers", "h"])])
def test_layers_to_transform_matches_peft(graphs, ltt, pattern):
    peft = pytest.importorskip("peft")
    m, gm = graphs["llama"]
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=ltt, layers_pattern=pattern)
    ours = _names(gm, vera_fx.VeraConfig(**kw))
    import copy

    pm = peft.get_peft_model(copy.deepcopy(m), peft.VeraConfig(**kw))
    theirs = [n[len("base_model.model."):] for n, mod in pm.named_modules()
              if type(mod).__name__ == "Linear" and hasattr(mod, "vera_lambda_b")]
    assert ours == theirs and ours


def test_unmatched_target_names_close_modules(graphs):
    gm = graphs["llama"][1]
    with pytest.raises(ValueError) as err:
        _names(gm, vera_fx.VeraConfig(r=4, target_modules=["qproj"]))
    msg = str(err.value)
    assert "'qproj' matched no linear layer" in msg and "q_proj" in msg
    with pytest.raises(ValueError, match="LlamaRMSNorm, not a linear layer, and holds none"):
        _names(gm, vera_fx.VeraConfig(r=4, target_modules=["q_proj", "input_layernorm"]))
    with pytest.raises(ValueError, match="'model.embed_tokens' is an Embedding, not a linear layer"):
        _names(gm, vera_fx.VeraConfig(r=4, target_modules=["embed_tokens"]))
    # A container module (PEFT refuses it): our extension adapts the linear layers inside it.
    assert _names(gm, vera_fx.VeraConfig(r=4, target_modules=["mlp"]))[:3] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="layers_to_transform=7"):
        _names(gm, vera_fx.VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=7))


def test_no_default_for_unknown_architecture():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="target_modules=None.*no default"):
        vera_fx.transform(Tiny(), vera_fx.VeraConfig(r=2), (torch.randn(2, 3, 4),))


def test_modules_to_save_are_not_targets():
    m = tiny_bert()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    names = [s.name for s in vera_fx.sites(gm)]
    assert "classifier" not in names and "bert.pooler.dense" in names


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 6))
        self.w2 = nn.Parameter(torch.randn(6, 12))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1)), self.w2)


class Single(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return F.linear(x, self.w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Mixer()
        self.proj = Single()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.proj(self.block(x)))


def test_functional_sites_are_named_after_their_owner():
    gm = vera_fx.capture(Net(), (torch.randn(2, 3, 6),))
    vera_fx.passes.MatchPass()(gm)
    sites = {s.name: s for s in vera_fx.read_sites(gm)}
    assert set(sites) == {"block.w1", "block.w2", "proj", "head"}
    assert (sites["block.w1"].in_features, sites["block.w1"].out_features) == (6, 12)
    assert sites["proj"].weight == "proj.w"


def test_other_architectures_have_defaults():
    # ViT's query/value became q_proj/v_proj in transformers 5: the default follows the model's naming.
    for build in (tiny_opt, tiny_vit):
        m = build()
        gm = vera_fx.capture(m)
        vera_fx.passes.MatchPass()(gm)
        names = _names(gm, vera_fx.VeraConfig(r=4))
        assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj", "query", "value")) for n in names)
