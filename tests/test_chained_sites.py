"""Sites that feed other sites (issue 11, section 1): every adapter reads its site's *current* input, the value
after the upstream adapters were added, as PEFT's wrapped modules do. PEFT is the oracle."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import vera_fx

peft = pytest.importorskip("peft")


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


class Diamond(nn.Module):
    """One site (``a``) feeding two (``b``, ``c``), joined again by ``d``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(6, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        return self.d(self.b(h) * torch.tanh(self.c(h)))


class Twice(nn.Module):
    """One layer called twice in a row: its second call reads its own adapted first output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.mid(torch.relu(self.mid(self.inp(x)))))


MODELS = {"chain": Chain, "diamond": Diamond, "twice": Twice}
METHODS = {"vera": (peft.VeraConfig, vera_fx.VeraConfig), "pvera": (peft.PveraConfig, vera_fx.PveraConfig)}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _randomise(pm: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g))


def _pair(name: str, method: str = "vera", adapter_name: str = "default", seed: int = 3, **kw):
    """(model, PEFT model with random lambdas, our graph loaded with PEFT's state)."""
    model = _build(name)
    peft_cls, ours_cls = METHODS[method]
    cfg = dict(r=4, target_modules="all-linear" if "target_modules" not in kw else kw.pop("target_modules"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft_cls(**cfg), adapter_name=adapter_name).eval()
    _randomise(pm, seed)
    gm = vera_fx.transform(model, ours_cls(**cfg), example_inputs=(torch.randn(2, 3, 4),),
                           adapter_name=adapter_name).eval()
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm, adapter_name=adapter_name),
                                    adapter_name=adapter_name)
    return model, pm, gm


def _x() -> torch.Tensor:
    return torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(9))  # not the capture's shape


def _close(gm, pm, model) -> None:
    x = _x()
    with torch.no_grad():
        ref, base = pm(x), model(x)
        out = gm(x)
    assert (ref - base).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_issue_repro_two_linears():
    """The issue's example: site 1's adapter must read site 0's adapted output."""
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).eval()
    cfg = dict(r=4, target_modules=["0", "1"], init_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(m), peft.VeraConfig(**cfg)).eval()
    gm = vera_fx.transform(copy.deepcopy(m), vera_fx.VeraConfig(**cfg), example_inputs=(torch.randn(2, 4),)).eval()
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert (pm(x) - m(x)).abs().max() > 1e-2
        torch.testing.assert_close(gm(x), pm(x), atol=1e-5, rtol=1e-5)
    xa = next(n for n in gm.graph.nodes if n.name == "_1_default_xA")
    assert (xa.args[0].meta.get("vera_fx") or {}).get("role") == "output"  # reads site 0's adapted value


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(MODELS))
def test_chained_sites_match_peft(name, method):
    model, pm, gm = _pair(name, method)
    _close(gm, pm, model)


@pytest.mark.parametrize("name", list(MODELS))
def test_chained_gradients_match_peft(name):
    model, pm, gm = _pair(name)
    x = _x()
    pm(x).pow(2).sum().backward()
    gm(x).pow(2).sum().backward()
    ours = {n.replace("vera_fx_adapters.default.sites.", "").replace(".vera_lambda", ".vera_lambda"): p.grad
            for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["chain", "diamond"])
def test_chained_merge_and_unmerge_match_peft(name):
    model, pm, gm = _pair(name)
    vera_fx.merge(gm)
    assert not any("vera_fx" in n.meta for n in gm.graph.nodes)
    _close(gm, pm, model)
    vera_fx.unmerge(gm)
    _close(gm, pm, model)


def _two_adapters(name: str):
    """PEFT and our graph with adapters 'one' and 'two' (same r and targets, different lambdas)."""
    model = _build(name)
    cfg = dict(r=4, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**cfg), adapter_name="one")
        pm.add_adapter("two", peft.VeraConfig(**cfg))
    pm.eval()
    _randomise(pm, 5)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(**cfg), example_inputs=(torch.randn(2, 3, 4),), adapter_name="one")
    vera_fx.add_adapter(gm, "two", vera_fx.VeraConfig(**cfg))
    gm.eval()
    for adapter in ("one", "two"):
        vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm, adapter_name=adapter), adapter)
    return model, pm, gm


@pytest.mark.parametrize("name", list(MODELS))
def test_chained_sites_with_two_active_adapters(name):
    model, pm, gm = _two_adapters(name)
    pm.base_model.set_adapter(["one", "two"])
    vera_fx.set_adapter(gm, ["one", "two"])
    _close(gm, pm, model)
    vera_fx.merge(gm)
    _close(gm, pm, model)
    vera_fx.unmerge(gm)
    _close(gm, pm, model)


def test_chained_sites_follow_set_adapter():
    model, pm, gm = _two_adapters("diamond")
    for active in (["two"], ["one"], ["two", "one"], ["one"]):
        pm.base_model.set_adapter(active)
        vera_fx.set_adapter(gm, active)
        _close(gm, pm, model)
    with vera_fx.disable_adapters(gm), pm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(gm(_x()), model(_x()))


def test_opt_project_out_feeding_lm_head_matches_peft():
    """The transformers case of the issue: OPT's project_out feeds lm_head, both targeted."""
    from conftest import text_inputs, tiny_opt

    model = tiny_opt(word_embed_proj_dim=16)
    cfg = dict(r=4, target_modules=["project_out", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**cfg)).eval()
    _randomise(pm, 2)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(**cfg)).eval()
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    inputs = text_inputs(model)
    with torch.no_grad():
        out, ref, base = gm(**inputs), pm(**inputs), model(**inputs)
    assert (ref.logits - base.logits).abs().max() > 1e-2
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
