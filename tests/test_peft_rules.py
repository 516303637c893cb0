"""PEFT's selection rules and folders (issue 11, sections 2 and 3), with PEFT as the oracle."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import vera_fx
from conftest import text_inputs, tiny_gpt2, tiny_llama, tiny_opt, tiny_vit

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """``model.blocks.<i>.{up, down}`` and ``head``: layer indices as PEFT reads them."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.blocks = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        for b in self.model.blocks:
            x = b(x)
        return self.head(x)


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return Stack().eval()


def _peft_sites(model: nn.Module, **kw) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=2, **kw))
    return sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                  if hasattr(m, "vera_lambda_b") and hasattr(m, "base_layer"))


def _our_sites(model: nn.Module, example=None, **kw) -> list[str]:
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=2, **kw), example_inputs=example)
    return sorted(s.name for s in vera_fx.sites(gm))


_X = (torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0)),)  # not the import order's RNG


def test_unmatched_entry_next_to_matching_ones_warns_as_peft_adapts_the_rest():
    model = tiny_opt()
    kw = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.warns(UserWarning, match=r"'o_proj' matched no linear layer.*out_proj"):
        ours = _our_sites(model, **kw)
    assert ours == _peft_sites(model, **kw) and len(ours) == 6


def test_nothing_matching_raises():
    with pytest.raises(ValueError, match=r"'nope' matched no linear layer"):
        _our_sites(_stack(), _X, target_modules=["nope", "none"])


def test_target_naming_a_module_without_linear_layers_is_refused_as_in_peft():
    model = tiny_llama()
    with pytest.raises(Exception):
        _peft_sites(model, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="embed_tokens.*Embedding, not a linear layer"):
        _our_sites(model, target_modules=["q_proj", "embed_tokens"])


@pytest.mark.parametrize("targets", [["up", "head"], ["up", "model.blocks.2.down"], ["head"]])
def test_exact_names_are_targeted_whatever_layers_to_transform_says(targets):
    model = _stack()
    kw = dict(target_modules=targets, layers_to_transform=[0])
    ours = _our_sites(model, _X, **kw)
    assert ours == _peft_sites(model, **kw)
    assert [n for n in targets if "." in n or n == "head"][0] in ours


def test_exact_lm_head_with_layers_to_transform_matches_peft():
    model = tiny_llama()
    kw = dict(target_modules=["q_proj", "lm_head"], layers_to_transform=[1])
    ours = _our_sites(model, **kw)
    assert ours == _peft_sites(model, **kw) == ["lm_head", "model.layers.1.self_attn.q_proj"]


def test_empty_layers_to_transform_means_no_filter():
    model = _stack()
    kw = dict(target_modules=["up"], layers_to_transform=[])
    ours = _our_sites(model, _X, **kw)
    assert ours == _peft_sites(model, **kw) == [f"model.blocks.{i}.up" for i in range(3)]


def test_layers_to_transform_with_a_string_target_has_no_effect_and_warns():
    model = _stack()
    kw = dict(target_modules=r".*\.up", layers_to_transform=[0])
    with pytest.warns(UserWarning, match="layers_to_transform=.*no effect"):
        ours = _our_sites(model, _X, **kw)
    assert ours == _peft_sites(model, **kw) and len(ours) == 3


def _roundtrip(model, config, example, tmp_path, inputs):
    """Save our adapter (random lambdas), load it with PeftModel.from_pretrained: same sites, same outputs."""
    gm = vera_fx.transform(model, config, example_inputs=example).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    vera_fx.save_adapter(gm, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    theirs = sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                    if hasattr(m, "vera_lambda_b") and hasattr(m, "base_layer"))
    assert theirs == sorted(s.name for s in vera_fx.sites(gm))
    with torch.no_grad():
        out, ref, base = gm(**inputs), pm(**inputs), model(**inputs)
    key = "logits" if hasattr(ref, "logits") else None
    out, ref, base = (getattr(o, key) for o in (out, ref, base)) if key else (out, ref, base)
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_container_target_adapts_linear_layers_inside_and_round_trips(tmp_path):
    model = _stack()
    with pytest.raises(Exception):  # PEFT refuses a container
        _peft_sites(model, target_modules=["blocks.1"])
    cfg = vera_fx.VeraConfig(r=2, target_modules=["blocks.1", "head"])
    saved = _roundtrip(model, cfg, _X, tmp_path, {"x": torch.randn(4, 5, 6)})
    assert saved["target_modules"] == ["head", "model.blocks.1.down", "model.blocks.1.up"]


def test_regex_matching_a_container_round_trips(tmp_path):
    model = tiny_llama()
    cfg = vera_fx.VeraConfig(r=4, target_modules=r"model\.layers\.0\.mlp")
    saved = _roundtrip(model, cfg, None, tmp_path, text_inputs(model))
    assert saved["target_modules"] == [f"model.layers.0.mlp.{p}_proj" for p in ("down", "gate", "up")]


def test_vit_default_targets_round_trip(tmp_path):
    model = tiny_vit()
    with pytest.raises(Exception):  # PEFT's VeRA has no default targets for ViT
        _peft_sites(model)
    inputs = {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
              "labels": torch.tensor([0, 2, 1])}
    _roundtrip(model, vera_fx.VeraConfig(r=4), None, tmp_path, inputs)


def test_plain_targets_are_written_as_given(tmp_path):
    model = _stack()
    saved = _roundtrip(model, vera_fx.VeraConfig(r=2, target_modules=["up"]), _X, tmp_path,
                       {"x": torch.randn(4, 5, 6)})
    assert saved["target_modules"] == ["up"]


def test_peft_folder_with_base_layer_keys_loads_as_in_peft(tmp_path):
    """save_embedding_layers: a folder holding ``lm_head.base_layer.weight`` (here changed after the base was
    loaded, as after fine-tuning or resizing) loads; the weight applies to the graph, the user's model keeps its
    own, and outputs equal PeftModel.from_pretrained."""
    model = tiny_gpt2()
    kw = dict(r=4, target_modules=["c_attn", "lm_head"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**kw))
        with torch.no_grad():
            pm.base_model.model.lm_head.base_layer.weight.mul_(1.5)
        pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = vera_fx.from_pretrained(model, tmp_path).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the user's model is never written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    inputs = text_inputs(model)
    with torch.no_grad():
        out, ref = gm(**inputs), ref_model(**inputs)
        assert (ref.logits - model(**inputs).logits).abs().max() > 1e-2
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    # load_adapter_state_dict takes the same keys; our checkpoint has PEFT's key set (base layer included).
    theirs = peft.get_peft_model_state_dict(ref_model)
    assert set(vera_fx.adapter_state_dict(gm)) == set(theirs)
    vera_fx.load_adapter_state_dict(gm, theirs)


def test_base_layer_key_for_a_missing_weight_is_refused(tmp_path):
    model = tiny_gpt2()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["c_attn"]))
    sd = vera_fx.adapter_state_dict(gm)
    sd["base_model.model.no_such.base_layer.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="unexpected keys.*no_such"):
        vera_fx.load_adapter_state_dict(gm, sd)
    sd.pop("base_model.model.no_such.base_layer.weight")
    sd["base_model.model.lm_head.base_layer.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lm_head.base_layer.weight: shape"):
        vera_fx.load_adapter_state_dict(gm, sd)


# ------------------------------------------------------------------ issue 30: linear-like modules, "all-linear"

class _MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: an nn.Linear whose own forward emits matmul + add, no linear call."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _Doubled(nn.Linear):
    """An nn.Linear whose forward is no linear map of its weight: no site."""

    def forward(self, x):
        return 2 * (x @ self.weight.T) + self.bias


class _Router(nn.Module):
    """A MoE router: a weight and a bare F.linear call (PEFT cannot target it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _Mixed(nn.Module):
    def __init__(self, odd: type = _MatmulLinear) -> None:
        super().__init__()
        self.proj = _MatmulLinear(6, 6)
        self.odd = odd(6, 6)
        self.gate = _Router()
        self.out = nn.Linear(6, 6)

    def forward(self, x):
        h = self.odd(self.proj(x))
        return self.out(h) + self.gate(h).sum(-1, keepdim=True)


def _mixed(odd: type = _MatmulLinear) -> nn.Module:
    torch.manual_seed(0)
    return _Mixed(odd).eval()


@pytest.mark.parametrize("targets", [["proj", "odd"], "all-linear"])
def test_linear_subclass_with_its_own_forward_is_a_site_as_in_peft(targets):
    model = _mixed()
    ours, pm = _pair(model, targets)
    assert sorted(s.name for s in vera_fx.sites(ours)) == _peft_sites(model, target_modules=targets)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours(x), pm(x), atol=1e-5)
    assert "forward" not in model.proj.__dict__  # the user's module keeps its own forward


def _pair(model, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=2, target_modules=targets,
                                                                       init_weights=False))
    torch.manual_seed(3)
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=2, target_modules=targets, init_weights=False),
                             example_inputs=_X)
    return ours, pm


def test_all_linear_leaves_out_routers_as_peft_does(tmp_path):
    model = _mixed()
    ours, pm = _pair(model, "all-linear")
    names = sorted(s.name for s in vera_fx.sites(ours))
    assert "gate" not in names and names == _peft_sites(model, target_modules="all-linear")
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)  # PEFT loads every folder we save
    # 1e-5 as everywhere against PEFT: the folded weight W + dW rounds differently (2.4e-6 here, by the input)
    assert torch.allclose(loaded(_X[0]), ours(_X[0]), atol=1e-5)


def test_linear_module_that_computes_something_else_is_named_truthfully():
    model = _mixed(_Doubled)
    with pytest.raises(ValueError, match=r"'odd' is a _Doubled, a linear layer PEFT adapts, but the captured "
                                         r"forward makes no linear call"):
        _our_sites(model, _X, target_modules=["odd"])
    with pytest.warns(UserWarning, match=r"'all-linear': 1 linear module\(s\) that PEFT adapts .* left out "
                                         r"\(e.g. odd\)"):
        assert _our_sites(model, _X, target_modules="all-linear") == ["out", "proj"]


def test_the_probe_refuses_a_forward_that_raises():
    from vera_fx.quantized import computes_linear

    class NeedsMore(nn.Linear):
        def forward(self, x, scale):
            return scale * super().forward(x)

    assert not computes_linear(NeedsMore(4, 4)) and computes_linear(_MatmulLinear(4, 4))
    assert not computes_linear(_Doubled(4, 4))


def test_lambdas_drawn_in_registration_order_equal_peft_with_the_same_seed():
    model = tiny_opt()  # OPT registers k_proj and v_proj before q_proj
    targets = ["q_proj", "k_proj", "v_proj"]
    for ours_cfg, peft_cfg in [(vera_fx.VeraConfig, peft.VeraConfig), (vera_fx.PveraConfig, peft.PveraConfig)]:
        torch.manual_seed(11)
        pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg(r=2, target_modules=targets, init_weights=False))
        torch.manual_seed(11)
        ours = vera_fx.transform(model, ours_cfg(r=2, target_modules=targets, init_weights=False))
        theirs = {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if "lambda_d" in k}
        mine = vera_fx.adapter_state_dict(ours)
        assert theirs and all(torch.equal(mine[k], v) for k, v in theirs.items())
