"""Inject pass: functional sites, trainability, adapter dropout, atomic failure, state-dict checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_fx
from conftest import text_inputs, tiny_bert, tiny_llama


class FunctionalNet(nn.Module):
    """Calls F.linear in its own forward: PEFT cannot target these weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ffn = nn.Module()
        self.ffn.w_up = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.ffn.w_down = nn.Parameter(torch.randn(16, 32) * 0.2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = F.linear(torch.relu(F.linear(x, self.ffn.w_up)), self.ffn.w_down)
        return self.head(h + x)


def test_functional_linear_is_targeted_and_trains():
    m = FunctionalNet()
    x = torch.randn(4, 6, 16)
    target = torch.randn(4, 6, 3)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules=["ffn.w_up", "ffn.w_down"]), (x,))
    sites = vera_fx.sites(gm)
    assert [s.name for s in sites] == ["ffn.w_up", "ffn.w_down"] and sites[0].kind == "linear"
    torch.testing.assert_close(gm(x), m(x))  # lambda_b starts at zero: the base model's outputs
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all("vera_lambda" in n for n in trainable)
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(gm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert not torch.allclose(gm(x), m(x))


def test_gradients_reach_only_trainable_parameters():
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    gm.train()
    out = gm(**text_inputs(m, 2, 5))
    out.loss.backward()
    for name, p in gm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and "vera_lambda" in name, name
        else:
            assert p.grad is None, name
    # lambda_b starts at 0, so lambda_d's gradient is 0 at the first step; lambda_b's is not
    lam_b = gm.get_parameter("vera_fx_adapters.default.sites.model.layers.0.self_attn.q_proj.vera_lambda_b")
    assert lam_b.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())  # the user's model saw nothing


def test_adapter_dropout_follows_train_eval():
    m = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, vera_dropout=0.5, target_modules=["query"]))
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lambda_b" in n:
                p.fill_(1.0)
    kw = text_inputs(m, 2, 6)
    gm.train()
    assert not torch.allclose(gm(**kw).logits, gm(**kw).logits)
    gm.eval()
    torch.testing.assert_close(gm(**kw).logits, gm(**kw).logits)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: mod.training for n, mod in model.named_modules()},
            [type(mod) for mod in model.modules()])


def test_failed_transform_leaves_model_unchanged():
    m = tiny_llama()
    m.train()
    before = _snapshot(m)
    with pytest.raises(ValueError, match="qproj"):
        vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules=["qproj"]))
    with pytest.raises(ValueError, match="adapter_name"):
        vera_fx.transform(m, vera_fx.VeraConfig(r=8), adapter_name="not valid")
    with pytest.raises(TypeError, match="VeraConfig or vera_fx.PveraConfig .or PEFT.s"):
        vera_fx.transform(m, {"r": 8})  # type: ignore[arg-type]
    after = _snapshot(m)
    assert before[1:] == after[1:]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_bad_modules_to_save_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save.*'scorer'"):
        vera_fx.transform(tiny_bert(), vera_fx.VeraConfig(r=4, modules_to_save=["scorer"]))


def test_modules_to_save_trains_a_copy():
    m = tiny_bert()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, modules_to_save=["classifier"]))
    copies = [p for n, p in gm.named_parameters() if p.requires_grad and "classifier" in n]
    assert len(copies) == 2 and all(p.data_ptr() != m.classifier.weight.data_ptr() for p in copies)
    assert "base_model.model.classifier.weight" in vera_fx.adapter_state_dict(gm)


def test_fan_in_fan_out_warning_keeps_config():
    from conftest import tiny_gpt2

    cfg = vera_fx.VeraConfig(r=4, fan_in_fan_out=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False does not fit site 'transformer.h.0.attn.c_attn'"):
        vera_fx.transform(tiny_gpt2(), cfg)
    assert cfg.fan_in_fan_out is False


def test_load_adapter_state_dict_checks_everything_first():
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8))
    sd = {k: torch.randn_like(v) for k, v in vera_fx.adapter_state_dict(gm).items()}
    original = {k: v.clone() for k, v in vera_fx.adapter_state_dict(gm).items()}

    def unchanged():
        return all(torch.equal(original[k], v) for k, v in vera_fx.adapter_state_dict(gm).items())

    key = "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"
    with pytest.raises(ValueError, match="missing keys.*q_proj.vera_lambda_b"):
        vera_fx.load_adapter_state_dict(gm, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        vera_fx.load_adapter_state_dict(gm, {**sd, "base_model.model.extra.vera_lambda_b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        vera_fx.load_adapter_state_dict(gm, {**sd, key: torch.zeros(5)})
    with pytest.raises(ValueError, match="not a floating dtype"):
        vera_fx.load_adapter_state_dict(gm, {**sd, key: torch.zeros(32, dtype=torch.long)})
    with pytest.raises(ValueError, match="adapter_name='other'"):
        vera_fx.load_adapter_state_dict(gm, sd, adapter_name="other")
    with pytest.raises(TypeError, match="dict"):
        vera_fx.load_adapter_state_dict(gm, [1])  # type: ignore[arg-type]
    assert unchanged()
    vera_fx.load_adapter_state_dict(gm, sd)
    assert all(torch.equal(sd[k], v) for k, v in vera_fx.adapter_state_dict(gm).items())
    with pytest.raises(ValueError, match="no adapter"):
        vera_fx.adapter_state_dict(vera_fx.capture(m))
