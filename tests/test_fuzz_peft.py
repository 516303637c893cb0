"""Seeded fuzz test against PEFT (issue 11): random (architecture, config) cases, VeRA and PVeRA in eval.

Each case where PEFT accepts the config checks: the same sites, A / B bit for bit, the trainable count,
outputs within 1e-5 on another input shape than the capture's, lambda gradients, and the checkpoint both
ways (PEFT's state dict and folder into vera_fx; our folder into ``PeftModel.from_pretrained``). Lambdas are
randomised, and a case counts only where the adapter changes the output. Where PEFT refuses a config,
vera_fx refuses it too, with a ValueError naming the field, and the graph is left as it was; where our
documented extensions accept it (a target naming a container module, ViT's default targets), the saved
folder must load into PEFT onto the same sites with the same outputs.

CI runs the first ``VERA_FX_FUZZ_CASES`` cases (default 16, well under two minutes); set it to 200 or 1000
for the whole run. Cases mix many cheap plain ``nn.Module`` models (random shapes, chains, a diamond, a layer
called twice) with a few tiny transformers models that are captured once and copied per case.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import vera_fx
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_vit
from vera_fx.methods import CONTAINER

peft = pytest.importorskip("peft")

N_CASES = int(os.environ.get("VERA_FX_FUZZ_CASES", "16"))
SEED = int(os.environ.get("VERA_FX_FUZZ_SEED", "0"))
HF_SHARE = 0.25  # fraction of cases on transformers models (capture is slow; the rest are plain modules)

LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down", "fc1", "fc2", "dense", "query", "value"]


# --- plain models ------------------------------------------------------------------------------------------

class RandomBlock(nn.Module):
    """A random block of linears over width ``h``: a chain (h -> m -> h), an optional parallel branch from the
    block input (a diamond), an optional square layer called twice."""

    def __init__(self, rng: random.Random, h: int) -> None:
        super().__init__()
        names = rng.sample(LEAVES, 4)
        m = rng.randint(3, 10)
        self.first, self.second, self.branch, self.twice = names
        setattr(self, self.first, nn.Linear(h, m, bias=rng.random() < 0.7))
        setattr(self, self.second, nn.Linear(m, h, bias=rng.random() < 0.7))
        self.has_branch = rng.random() < 0.5
        self.has_twice = rng.random() < 0.4
        if self.has_branch:
            setattr(self, self.branch, nn.Linear(h, h))
        if self.has_twice:
            setattr(self, self.twice, nn.Linear(h, h, bias=False))
        if rng.random() < 0.4:  # a nested container
            self.mlp = nn.Sequential(nn.Linear(h, m), nn.Tanh(), nn.Linear(m, h))
        self.norm = nn.LayerNorm(h)

    def forward(self, x):
        y = getattr(self, self.second)(torch.relu(getattr(self, self.first)(x)))
        if self.has_branch:
            y = y * torch.sigmoid(getattr(self, self.branch)(x))
        if self.has_twice:
            lin = getattr(self, self.twice)
            y = lin(torch.tanh(lin(y)))
        if hasattr(self, "mlp"):
            y = y + self.mlp(y)
        return self.norm(x + y)


class RandomNet(nn.Module):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.h = rng.randint(4, 12)
        self.inp = nn.Linear(self.h, self.h)
        layers = nn.ModuleList([RandomBlock(rng, self.h) for _ in range(rng.randint(1, 3))])
        if rng.random() < 0.8:  # "body.layers.<i>": PEFT reads layer indices there; "layers.<i>" it does not
            self.body = nn.Module()
            self.body.layers = layers
        else:
            self.layers = layers
        self.head = nn.Linear(self.h, rng.randint(2, 5))

    def blocks(self):
        return self.body.layers if hasattr(self, "body") else self.layers

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks():
            x = b(x)
        return self.head(x)


# --- transformers models: captured once per architecture -------------------------------------------------

def _text(model, batch: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pixels(model, batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


HF = {
    "gpt2": (tiny_gpt2, lambda m: _text(m, 2, 8, 0), lambda m: _text(m, 3, 7, 1)),
    "opt": (tiny_opt, lambda m: _text(m, 2, 8, 0), lambda m: _text(m, 3, 7, 1)),
    "llama": (tiny_llama, lambda m: _text(m, 2, 8, 0), lambda m: _text(m, 3, 7, 1)),
    "bert": (tiny_bert, lambda m: _text(m, 2, 8, 0), lambda m: _text(m, 3, 7, 1)),
    "vit": (tiny_vit, lambda m: _pixels(m, 2, 0), lambda m: _pixels(m, 3, 1)),
}


@functools.lru_cache(maxsize=None)
def _hf_base(arch: str):
    build, example, _ = HF[arch]
    model = build()
    return model, vera_fx.capture(model, example_inputs=example(model))


@dataclass
class Case:
    arch: str
    model: nn.Module
    base: Any  # the captured GraphModule without adapters (copied per use)
    inputs: dict  # another shape than the capture's
    linears: list[str]  # module paths of the linear layers
    containers: list[str]  # module paths holding linear layers


def _plain_case(rng: random.Random) -> Case:
    torch.manual_seed(rng.randrange(2 ** 31))
    model = RandomNet(rng).eval()
    base = vera_fx.capture(model, example_inputs=(torch.randn(2, 3, model.h),))
    return _case("plain", model, base, {"x": torch.randn(4, 5, model.h, generator=torch.Generator().manual_seed(7))})


def _case(arch: str, model: nn.Module, base: Any, inputs: dict) -> Case:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    containers = [n for n, m in model.named_modules() if n and n not in linears
                  and any(q.startswith(n + ".") for q in linears)]
    return Case(arch, model, base, inputs, linears, containers)


def _hf_case(arch: str) -> Case:
    model, base = _hf_base(arch)
    return _case(arch, model, base, HF[arch][2](model))


# --- random configs ------------------------------------------------------------------------------------------

def _random_config(rng: random.Random, case: Case) -> dict:
    leaves = sorted({n.rpartition(".")[2] for n in case.linears})
    kind = rng.choices(["list", "regex", "all-linear", "none"], weights=[6, 2, 1, 1])[0]
    kw: dict[str, Any] = dict(r=rng.randint(1, 8), projection_prng_key=rng.randrange(10 ** 6),
                              save_projection=rng.random() < 0.7, init_weights=rng.random() < 0.5,
                              d_initial=round(rng.uniform(0.05, 1.0), 3))
    if kind == "list":
        pool = rng.sample(leaves, rng.randint(1, min(3, len(leaves))))
        if rng.random() < 0.25:
            pool.append(rng.choice(case.linears))  # a full path
        if rng.random() < 0.15:
            pool.append(rng.choice(["nope", "qproj", "o_prj"]))  # an entry that matches nothing
        if rng.random() < 0.15 and case.containers:
            pool.append(rng.choice(case.containers).rpartition(".")[2])  # a container (our extension)
        kw["target_modules"] = pool
        r = rng.random()
        if r < 0.25:
            kw["layers_to_transform"] = rng.choice([[], 0, 1, [0], [1], [0, 1], [2], [0, 2]])
            if rng.random() < 0.3:
                kw["layers_pattern"] = rng.choice(["layers", "h", "layer", ["layers", "h"]])
    elif kind == "regex":
        leaf = rng.choice(leaves)
        kw["target_modules"] = rng.choice([rf".*\.{leaf}", rf".*{leaf[:2]}.*", rf".*\.0\.{leaf}", leaf])
        if rng.random() < 0.1:
            kw["layers_to_transform"] = [0]
    elif kind == "all-linear":
        kw["target_modules"] = "all-linear"
    bias = rng.choices(["none", "all", "only"], weights=[6, 2, 2])[0]
    kw["bias"] = bias
    if case.arch == "gpt2" and rng.random() < 0.7:
        kw["fan_in_fan_out"] = True
    return kw


def _configs(method: str, kw: dict):
    kw = dict(kw)
    if kw["bias"] == "only":
        kw["bias"] = f"{method}_only"
    peft_cls = peft.VeraConfig if method == "vera" else peft.PveraConfig
    ours_cls = vera_fx.VeraConfig if method == "vera" else vera_fx.PveraConfig
    return peft_cls, ours_cls, kw


# --- the checks --------------------------------------------------------------------------------------------

def _quiet(fn: Callable, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _out(o):
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _peft_sites(pm) -> list[str]:
    return sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                  if hasattr(m, "base_layer") and any("lambda_b" in k for k, _ in m.named_parameters()))


def _randomise(module: nn.Module, rng: random.Random) -> None:
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def _projections(sd: dict, prefix: str) -> tuple:
    return tuple(v for k, v in sorted(sd.items()) if re.search(rf"base_model\.{prefix}_[AB](\.|$)", k))


def _lambda_grads(named) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in named:
        if "lambda" in n and p.grad is not None:
            key = n.replace(f"{CONTAINER}.default.sites.", "").replace("base_model.model.", "")
            out[key.replace(".default", "")] = p.grad
    return out


def _run_case(index: int, tmp_path: Path) -> str:
    rng = random.Random(SEED * 100003 + index)
    hf = rng.random() < HF_SHARE
    case = _hf_case(rng.choice(sorted(HF))) if hf else _plain_case(rng)
    method = "vera" if rng.random() < 0.6 else "pvera"
    peft_cls, ours_cls, kw = _configs(method, _random_config(rng, case))
    label = f"case {index}: {case.arch} {method} {kw}"

    try:
        pm = _quiet(peft.get_peft_model, copy.deepcopy(case.model), peft_cls(**kw)).eval()
        peft_error: Optional[Exception] = None
    except Exception as e:  # PEFT refuses: TypeError, ValueError or its own error types
        pm, peft_error = None, e

    gm = copy.deepcopy(case.base)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    try:
        cfg = ours_cls(**kw)
        _quiet(vera_fx.add_adapter, gm, "default", cfg)
        our_error: Optional[Exception] = None
    except Exception as e:
        our_error = e

    if our_error is not None:
        assert isinstance(our_error, ValueError), f"{label}: {type(our_error).__name__}: {our_error}"
        assert peft_error is not None, f"{label}: PEFT accepts, vera_fx refuses: {our_error}"
        fields = ("target_modules", "layers_to_transform", "layers_pattern", "bias", "r", "modules_to_save")
        assert any(f"{f}=" in str(our_error) for f in fields), f"{label}: the error names no field: {our_error}"
        assert getattr(gm, CONTAINER, None) is None or len(getattr(gm, CONTAINER)) == 0, label
        assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items()), label
        assert not any("vera_fx" in n.meta for n in gm.graph.nodes), label
        return "refused"

    gm.eval()
    ours_sites = sorted(s.name for s in vera_fx.sites(gm))
    if peft_error is not None:  # our extensions: the folder we write must load into PEFT onto the same sites
        _randomise(gm, rng)
        vera_fx.save_adapter(gm, tmp_path / "ours")
        pm = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(case.model), tmp_path / "ours").eval()
        assert _peft_sites(pm) == ours_sites, f"{label}: PEFT refused ({peft_error}); our folder loads elsewhere"
        with torch.no_grad():
            out, ref, base = _out(gm(**case.inputs)), _out(pm(**case.inputs)), _out(case.model(**case.inputs))
        assert (ref - base).abs().max() > 1e-4, label
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=label)
        return "extension"

    assert ours_sites == _peft_sites(pm), f"{label}: sites differ"
    prefix = method
    theirs = peft.get_peft_model_state_dict(pm)
    if kw["save_projection"]:
        a_b = _projections(theirs, prefix)
    else:  # not in the state dict: read the buffers
        a_b = (getattr(pm.base_model, f"{prefix}_A")["default"], getattr(pm.base_model, f"{prefix}_B")["default"])
    state = getattr(gm, CONTAINER)["default"]
    ours_ab = (state.projection("A"), state.projection("B"))
    assert all(torch.equal(x, y) for x, y in zip(ours_ab, a_b)), f"{label}: A / B differ"
    n_ours = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_ours == n_theirs, f"{label}: trainable {n_ours} vs {n_theirs}"

    # PEFT -> ours: random lambdas through PEFT's state dict.
    _randomise(pm, rng)
    theirs = peft.get_peft_model_state_dict(pm)
    vera_fx.load_adapter_state_dict(gm, theirs)
    out, ref = _out(gm(**case.inputs)), _out(pm(**case.inputs))
    with torch.no_grad():
        base = _out(case.model(**case.inputs))
    assert (ref - base).abs().max() > 1e-4, f"{label}: the adapter does not change the output"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=label)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    g_ours, g_theirs = _lambda_grads(gm.named_parameters()), _lambda_grads(pm.named_parameters())
    assert set(g_ours) == set(g_theirs) and g_ours, label
    for k in g_theirs:
        torch.testing.assert_close(g_ours[k], g_theirs[k], atol=1e-5, rtol=1e-4, msg=f"{label}: grad {k}")

    # Ours -> PEFT (our folder), PEFT's folder -> ours.
    vera_fx.save_adapter(gm, tmp_path / "ours")
    pm2 = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(case.model), tmp_path / "ours").eval()
    assert _peft_sites(pm2) == ours_sites, label
    with torch.no_grad():
        torch.testing.assert_close(_out(pm2(**case.inputs)), ref.detach(), atol=1e-5, rtol=1e-5, msg=label)
    _quiet(pm.save_pretrained, tmp_path / "peft")
    gm2 = copy.deepcopy(case.base)
    _quiet(vera_fx.load_adapter, gm2, tmp_path / "peft")
    gm2.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(gm2(**case.inputs)), ref.detach(), atol=1e-5, rtol=1e-5, msg=label)
    return "compared"


@pytest.mark.parametrize("index", range(N_CASES))
def test_fuzz_against_peft(index, tmp_path, fuzz_outcomes):
    fuzz_outcomes[_run_case(index, tmp_path)] += 1


@pytest.fixture(scope="module")
def fuzz_outcomes():
    counts = {"compared": 0, "refused": 0, "extension": 0}
    yield counts
    print(f"\nfuzz against peft: {counts} of {N_CASES} cases (seed {SEED})")
