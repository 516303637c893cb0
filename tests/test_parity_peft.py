"""VeRA parity with PEFT as the oracle: projections, outputs, one SGD step, trainable counts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vera_fx
from conftest import minilm, text_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_vit

peft = pytest.importorskip("peft")

CASES = {
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "opt": (tiny_opt, dict(target_modules="all-linear")),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "bert": (tiny_bert, dict(target_modules=["query", "value", "dense"])),
    "vit": (tiny_vit, dict(target_modules=["q_proj", "v_proj"])),
    "minilm": (minilm, dict(target_modules=["query", "value"])),
}


def _inputs(model):
    if type(model).__name__.startswith("ViT"):
        g = torch.Generator().manual_seed(2)
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2, 1])}
    return text_inputs(model, batch=3, length=9)


def _loss(out):
    return out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.pow(2).mean()


def _peft_model(model, kw, r):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, **kw))


@pytest.mark.parametrize("arch", list(CASES))
def test_vera_matches_peft(arch):
    build, kw = CASES[arch]
    model = build()
    r = 16
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=r, **kw))
    pm = _peft_model(model, kw, r)
    theirs = {k: v.clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    ours = vera_fx.adapter_state_dict(gm)
    assert set(ours) == set(theirs)
    assert torch.equal(ours["base_model.vera_A"], theirs["base_model.vera_A"])  # bit-identical projections
    assert torch.equal(ours["base_model.vera_B"], theirs["base_model.vera_B"])
    n_ours = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_ours == n_theirs > 0

    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.5)
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    gm.eval()
    pm.eval()
    inputs = _inputs(model)
    out, ref = gm(**inputs), pm(**inputs)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    assert (getattr(ref, key) - getattr(model(**inputs), key)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(getattr(out, key), getattr(ref, key), atol=1e-5, rtol=1e-5)

    # One SGD step (eval mode: no dropout) moves both sets of lambdas identically.
    opt_ours = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for m, opt in ((gm, opt_ours), (pm, opt_theirs)):
        opt.zero_grad()
        _loss(m(**inputs)).backward()
        opt.step()
    after_ours = vera_fx.adapter_state_dict(gm)
    after_theirs = peft.get_peft_model_state_dict(pm)
    moved = 0
    for k, v in after_theirs.items():
        torch.testing.assert_close(after_ours[k], v, atol=1e-5, rtol=1e-5)
        moved += int("lambda" in k and not torch.equal(v, theirs.get(k, v)))
    assert moved > 0


def test_bias_all_trains_copies_and_matches_peft():
    model = tiny_bert()
    kw = dict(target_modules=["query", "value"], bias="all")
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw))
    pm = _peft_model(model, kw, 8)
    assert set(vera_fx.adapter_state_dict(gm)) == set(peft.get_peft_model_state_dict(pm))
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad)
    bias = gm.get_parameter("bert.encoder.layer.0.attention.self.key.bias")
    assert bias.requires_grad
    assert bias.data_ptr() != model.bert.encoder.layer[0].attention.self.key.bias.data_ptr()  # copied first
