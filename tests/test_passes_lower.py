"""Lower pass: each path against the plain (activation) path and peft, forced choices, the cost model, merge,
several adapters, dropout, a quantized site, PVeRA's KL term and one torch.compile check of the lean op."""

from __future__ import annotations

import copy
import itertools
import json
import random
import warnings

import pytest
import torch
from torch import nn

import vera_fx
from conftest import text_inputs, tiny_llama
from vera_fx.methods.fold import weight_fold, weight_site
from vera_fx.methods.lean import fused_site, lean_site
from vera_fx.sites import as_graph_module, graph_modules, read_sites
from vera_fx.passes.lower import (CACHE_BYTES, DEFAULT_TOKENS, PASS_COST, PASS_COST_CACHED,
                                  PASS_COST_FUSED, PASS_COST_FUSED_CACHED, GroupShape, choose_options,
                                  group_options, lower_adapters, lowering_setting, pass_cost,
                                  path_costs, plan_auto)

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """q/k/v read one input (one site group), o reads another, and q is called twice (a shared layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 24)
        self.k = nn.Linear(16, 24)
        self.v = nn.Linear(16, 16)
        self.o = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(x)) * self.k(x) + self.q(0.5 * x)
        return self.o(h) + self.v(x)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


def _config(method: str, **kw):
    base = dict(r=8, target_modules=["q", "k", "v", "o"])
    base.update(kw)
    return vera_fx.VeraConfig(**base) if method == "vera" else vera_fx.PveraConfig(**base)


def _randomize(gm: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(gm.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _paths(gm) -> dict[str, int]:
    """Adapter outputs by lowering path, over every graph of the tree (the root and its blocks)."""
    counts: dict[str, int] = {}
    for n in (n for g in graph_modules(as_graph_module(gm)) for n in g.graph.nodes):
        tag = n.meta.get("vera_fx") or {}
        if tag.get("role") == "output":
            p = tag.get("path") or "activation"
            counts[p] = counts.get(p, 0) + 1
    return counts


def _step(gm, x: torch.Tensor, kl: bool = False, seed: int = 0):
    """Output, lambda gradients and input gradient of one training forward/backward."""
    x = x.clone().requires_grad_(True)
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = gm(x)
    loss = out.pow(2).mean() + (vera_fx.kl_divergence(gm) if kl else 0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad.clone(), loss.detach()


def _assert_same(a, b) -> None:
    out_a, grads_a, gx_a, loss_a = a
    out_b, grads_b, gx_b, loss_b = b
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_a, gx_b, atol=1e-5, rtol=1e-5)
    assert set(grads_a) == set(grads_b) and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], atol=1e-5, rtol=1e-5, msg=k)
    assert any(g.abs().max() > 1e-4 for g in grads_a.values())


# --- parity with the plain path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lowering", ["lean", "fused"])
@pytest.mark.parametrize("method,seed", [("vera", None), ("pvera", 0), ("pvera", None)])
def test_lean_and_fused_match_activation_path(method, seed, lowering):
    """Outputs, lambda gradients, input gradients and (PVeRA) the KL term and its gradient, in training mode
    with sampling: the lean op reuses the forward's noise in backward; the fused tail adds into the base
    output in place."""
    net, x = _net(), _x()
    kw = {} if method == "vera" else {"generator_seed": seed}
    runs = {}
    for path in ("activation", lowering):
        gm = vera_fx.transform(net, _config(method, **kw), example_inputs=(x,), lowering=path).train()
        _randomize(gm)
        runs[path] = _step(gm, x, kl=method == "pvera")
        assert _paths(gm) == {path: 5}  # 4 sites, q called twice
    _assert_same(runs[lowering], runs["activation"])
    if lowering == "fused":  # every base output has one reader here: each tail writes into it
        calls = [n for n in gm.graph.nodes if n.target is fused_site]
        assert len(calls) == 5 and all(n.args[-1] is True for n in calls)


@pytest.mark.parametrize("shape", [(3, 5, 16), (4, 8, 16)], ids=["lean-calls", "folded-calls"])
def test_weight_path_matches_activation_path(shape):
    """15 tokens (fewer than in 16 / 24: the weight calls are the lean op with the base inside) and 32 (every
    call folds, forward and backward): outputs, lambda and input gradients equal the plain path's."""
    net, x = _net(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    runs = {}
    for lowering in ("activation", "weight"):
        gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering=lowering).train()
        _randomize(gm)
        runs[lowering] = _step(gm, x)
    assert _paths(gm) == {"weight": 5}
    calls = [n for n in gm.graph.nodes if n.meta.get("vera_fx_site")]
    assert len(calls) == 5 and all(n.target is weight_site and n.args[1].target is weight_fold for n in calls)
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.meta.get("vera_fx_site")]
    _assert_same(runs["weight"], runs["activation"])
    # removing the adapter gives every call its plain linear back
    vera_fx.set_lowering(gm, "activation")
    assert all(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes if n.meta.get("vera_fx_site"))
    assert "weight_site" not in gm.code and "weight_fold" not in gm.code
    _randomize(gm)
    _assert_same(_step(gm, x), runs["activation"])


@pytest.mark.parametrize("length", [6, 64], ids=["lean-calls", "folded-calls"])
def test_weight_path_folds_gpt2_conv1d(length):
    """GPT-2's Conv1D sites (addmm(bias, view(x), W), W stored (in, out)) fold too: 12 tokens (lean form
    against in 32 / 128) and 128 (every call folds); outputs and lambda gradients equal the plain path's, and
    switching back gives each call its addmm."""
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    inputs = text_inputs(model, batch=2, length=length)
    runs = {}
    for lowering in ("activation", "weight"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out is set for Conv1D
            gm = vera_fx.transform(model, _config("vera", target_modules=["c_attn", "c_proj", "c_fc"]),
                                   lowering=lowering).eval()  # eval: GPT-2's own dropout off; gradients still flow
        _randomize(gm)
        gm.zero_grad(set_to_none=True)
        out = gm(**inputs)
        out.loss.backward()
        runs[lowering] = out.logits.detach(), {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
        with torch.autocast("cpu", torch.bfloat16):  # the plain chain's ops there (h keeps x's 3-D shape)
            runs[lowering + " autocast"] = gm(**inputs).logits.detach().float()
    assert _paths(gm) == {"weight": 8}
    got, want = runs["weight autocast"], runs["activation autocast"]
    assert (got - want).norm() <= 1e-2 * want.norm()
    torch.testing.assert_close(runs["weight"][0], runs["activation"][0], atol=1e-5, rtol=1e-5)
    assert runs["weight"][1].keys() == runs["activation"][1].keys()
    for n, g in runs["activation"][1].items():
        torch.testing.assert_close(runs["weight"][1][n], g, atol=1e-5, rtol=1e-5, msg=n)
    vera_fx.set_lowering(gm, "activation")
    calls = [n for g in graph_modules(as_graph_module(gm)) for n in g.graph.nodes
             if (n.meta.get("vera_fx_site") or {}).get("kind") == "conv1d"]
    assert len(calls) == 8 and all(n.target is torch.ops.aten.addmm.default for n in calls)  # 2 layers x 4


@pytest.mark.parametrize("tokens", [1, 5, 12], ids=["lean-call-h-scaled", "lean-call", "folded-call"])
def test_weight_call_gradients_are_exact(tokens):
    """The weight call's hand-written backward against finite differences (float64), in both forms, with a
    trainable base weight and bias too (then it keeps x, as the plain linear does); one token: lambda_d scales
    h (tokens x r, the smaller) rather than lambda_b * B (out x r)."""
    g = torch.Generator().manual_seed(0)
    r, fan_in, out = 3, 6, 4

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    a, b = t(r, fan_in, grad=False), t(out, r, grad=False)
    lam_d, lam_b = t(r), t(out)
    for trained_base, keep in ((False, False), (True, False), (False, True)):  # keep: W' kept for backward
        w, bias = t(out, fan_in, grad=trained_base), t(out, grad=trained_base)
        x = t(1, tokens, fan_in)

        def f(x, w, bias, lam_d, lam_b):
            h = x @ a.T
            return weight_site(x, weight_fold(w, h, a, b, lam_d, lam_b, keep), bias)

        def plain(x, w, bias, lam_d, lam_b):
            return torch.nn.functional.linear(x, w, bias) + ((x @ a.T) * lam_d) @ b.T * lam_b

        args = (x, w, bias, lam_d, lam_b)
        assert torch.autograd.gradcheck(f, args)
        torch.testing.assert_close(f(*args), plain(*args))
    # without a bias, and under autocast (the plain chain's ops; gradients close to the plain chain's)
    x = t(2, tokens, fan_in).float().detach().requires_grad_(True)
    w, lam_d32, lam_b32, a32, b32 = (v.float().detach() for v in (w, lam_d, lam_b, a, b))
    lams = [lam_d32.clone().requires_grad_(True), lam_b32.clone().requires_grad_(True)]
    outs = []
    for fn in ("weight", "plain"):
        x.grad = None
        for p in lams:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            h = torch.nn.functional.linear(x, a32)
            y = (weight_site(x, weight_fold(w, h, a32, b32, *lams)) if fn == "weight" else
                 torch.nn.functional.linear(x, w) + torch.nn.functional.linear(h * lams[0], b32) * lams[1])
        y.float().pow(2).sum().backward()
        outs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in lams]))
    (y1, gx1, gl1), (y2, gx2, gl2) = outs
    assert y1.dtype == y2.dtype and torch.equal(y1, y2)
    for got, want in zip((gx1, *gl1), (gx2, *gl2)):  # bfloat16 rounding apart: relative to the norm
        assert (got - want).norm() <= 1e-2 * want.norm(), (got, want)


@pytest.mark.parametrize("lead", [(2, 5), (1, 1)], ids=["b-scaled", "tokens-scaled"])
@pytest.mark.parametrize("probabilistic", [False, True], ids=["vera", "pvera"])
def test_fused_tail_gradients_and_fallbacks(probabilistic, lead):
    """The fused tail's hand-written backward against finite differences (float64), in place and not; it
    writes into y only where allowed; under autocast, with mixed dtypes and broadcasting y it is the plain
    chain's ops (same values and dtype). ``lead``: 10 tokens scale B (out x r, smaller than the token
    tensors), one token scales the token tensors instead."""
    g = torch.Generator().manual_seed(0)
    r, out = 3, 4

    def t(*shape, grad=True, dtype=torch.float64):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    b, lam_b = t(out, r, grad=False), t(out)
    lam_d = None if probabilistic else t(r)

    def plain(y, z, lam_d, lam_b):
        return y + torch.nn.functional.linear(z if lam_d is None else z * lam_d, b) * lam_b

    for inplace in (False, True):
        def f(y, z, lam_d, lam_b):
            return fused_site(y * 1.0, z, lam_d, b, lam_b, inplace)  # y * 1.0: a fresh, writable tensor

        args = (t(*lead, out), t(*lead, r), lam_d, lam_b)
        assert torch.autograd.gradcheck(f, args)
        torch.testing.assert_close(f(*args), plain(*args))
    # in place only where the tensor allows it: a fresh output is written into, a view or a trained leaf is not
    y, z = torch.randn(2, 5, out, dtype=torch.float64), t(2, 5, r)
    assert fused_site(y, z, lam_d, b, lam_b, True) is y
    view = torch.randn(5, 2, out, dtype=torch.float64).transpose(0, 1)
    before = view.clone()
    assert fused_site(view, z, lam_d, b, lam_b, True) is not view and torch.equal(view, before)
    leaf = t(2, 5, out)
    res = fused_site(leaf, z, lam_d, b, lam_b, True)
    assert res is not leaf and res.grad_fn is not None
    torch.testing.assert_close(res, plain(leaf, z, lam_d, lam_b))
    # fallbacks: broadcast y, float32 y against float64 parameters, autocast
    small = torch.randn(1, 1, out, dtype=torch.float64)
    torch.testing.assert_close(fused_site(small, z, lam_d, b, lam_b, True), plain(small, z, lam_d, lam_b))
    y32 = torch.randn(2, 5, out)
    got = fused_site(y32, z, lam_d, b, lam_b, True)
    assert got.dtype == plain(y32, z, lam_d, lam_b).dtype and torch.equal(got, plain(y32, z, lam_d, lam_b))
    f32 = [v.float().detach() if v is not None else None for v in (z, lam_d, b, lam_b)]
    with torch.autocast("cpu", torch.bfloat16):
        y16 = torch.nn.functional.linear(torch.randn(2, 5, 6), torch.randn(out, 6))
        got = fused_site(y16, f32[0], f32[1], f32[2], f32[3], True)
        want = y16 + torch.nn.functional.linear(f32[0] if f32[1] is None else f32[0] * f32[1], f32[2]) * f32[3]
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_pvera_eval_mean_path_and_sampling_switch_on_lean_graph():
    net, x = _net(), _x()
    graphs = {}
    for lowering in ("activation", "lean"):
        gm = vera_fx.transform(net, _config("pvera", generator_seed=1), example_inputs=(x,), lowering=lowering)
        _randomize(gm)
        graphs[lowering] = gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(graphs["lean"](x), graphs["activation"](x), atol=1e-6, rtol=1e-6)
        for gm in graphs.values():
            vera_fx.set_sample_at_inference(gm, {"q": True})
        a, b = graphs["lean"](x), graphs["activation"](x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a, graphs["lean"].eval()(x))  # the stream moved on: it samples


def test_dropout_same_seed_same_mask():
    """Dropout stays a plain node in front of x·Aᵀ on every path, so the same seed gives the same mask."""
    net, x = _net(), _x()
    runs = {}
    for lowering in ("activation", "lean", "fused"):
        gm = vera_fx.transform(net, _config("vera", vera_dropout=0.3), example_inputs=(x,), lowering=lowering).train()
        _randomize(gm)
        runs[lowering] = _step(gm, x, seed=7)
    _assert_same(runs["lean"], runs["activation"])
    _assert_same(runs["fused"], runs["activation"])
    with pytest.warns(UserWarning, match="dropout"):
        gm = vera_fx.transform(net, _config("vera", vera_dropout=0.3), example_inputs=(x,), lowering="weight")
    assert _paths(gm) == {"lean": 5}


def test_several_adapters():
    net, x = _net(), _x()
    runs = {}
    paths = {}
    for lowering in ("activation", "lean", "weight", "fused", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering=lowering)
            vera_fx.add_adapter(gm, "second", _config("pvera", r=4, target_modules=["q", "o"], generator_seed=2))
            vera_fx.add_adapter(gm, "third", _config("vera", r=4, target_modules=["k", "v"]))
            vera_fx.set_adapter(gm, ["default", "second", "third"])
        gm.train()
        _randomize(gm)
        runs[lowering] = _step(gm, x, kl=True)
        paths[lowering] = _paths(gm)
        if lowering == "fused":
            inplace = [n.args[-1] for n in gm.graph.nodes if n.target is fused_site]
    for lowering in ("lean", "weight", "fused", "fast"):
        _assert_same(runs[lowering], runs["activation"])
    # PVeRA ("second") falls back to lean, and so does "third" at k and v, whose calls fold "default" already
    assert paths["weight"] == {"weight": 5, "lean": 2 + 3}
    # fused: a site's second and third adapters add into the first one's sum, in place too
    assert paths["fused"] == {"fused": 10} and inplace == [True] * 10


def test_quantized_site_lean_matches_activation():
    bnb = pytest.importorskip("bitsandbytes")
    net, x = _net(), _x()
    new = bnb.nn.Linear8bitLt(16, 24, True, has_fp16_weights=False)
    new.load_state_dict(net.k.state_dict())
    net.k = new.to("cpu")
    runs = {}
    for lowering in ("activation", "lean", "fused"):
        gm = vera_fx.transform(net, _config("pvera", generator_seed=0), example_inputs=(x,), lowering=lowering)
        assert {s.name: s.kind for s in vera_fx.sites(gm)}["k"] == "int8"
        gm.train()
        _randomize(gm)
        runs[lowering] = _step(gm, x, kl=True)
    _assert_same(runs["lean"], runs["activation"])
    _assert_same(runs["fused"], runs["activation"])
    inplace = {n.meta["vera_fx"]["site"]: n.args[-1] for n in gm.graph.nodes if n.target is fused_site}
    assert inplace["k"] is False and inplace["v"] is True  # the 8-bit call's output is not written into


# --- parity with peft ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,lowering,length", [("vera", "lean", 6), ("pvera", "lean", 6),
                                                    ("vera", "weight", 24), ("pvera", "fused", 6),
                                                    ("vera", "fast", 24)],
                         ids=["vera-lean", "pvera-lean", "vera-folded", "pvera-fused", "vera-fast"])
def test_lowered_paths_match_peft(method, lowering, length):
    """The lean path, the weight path with every call folded (48 tokens >= in 32 / 48), the fused tail, and
    ``fast`` (calls that fold keep W', down_proj fused), against peft on a tiny Llama: outputs and lambda
    gradients (eval mode: no sampling)."""
    model = tiny_llama()
    # fast at r=32: folding q/k/v and keeping W' beats the fused tails there (at r=8 the passes dominate)
    kw = dict(r=32 if lowering == "fast" else 8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    cfg = (peft.VeraConfig if method == "vera" else peft.PveraConfig)(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lambda" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ours = (vera_fx.VeraConfig if method == "vera" else vera_fx.PveraConfig)(**kw)
    gm = vera_fx.transform(model, ours, lowering=lowering, tokens=2 * length)
    if lowering == "fast":  # every call folds (in 32 / 48, 48 tokens) and keeps W'
        assert _paths(gm) == {"weight": 8} and len(_kept(gm)) == 8
    else:
        assert _paths(gm) == {lowering: 8}
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    gm.eval()
    pm.eval()
    inputs = text_inputs(model, batch=2, length=length)
    if lowering in ("weight", "fast"):  # every call folds: its tokens reach its in_features
        assert all(2 * length >= site.in_features for site in read_sites(as_graph_module(gm)))
    results = []
    for m in (gm, pm):
        m.zero_grad(set_to_none=True)
        out = m(**inputs)
        out.loss.backward()
        results.append((out.logits.detach(), {n.split("default.")[-1] if "default." in n else n: p.grad
                                              for n, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    ours_grads = {k: v for k, v in results[0][1].items()}
    theirs = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:  # base_model.model.<path>.<prefix>_lambda_b.default
            theirs[n.removeprefix("base_model.model.").removesuffix(".default")] = p.grad
    for n, p in gm.named_parameters():
        if p.requires_grad:
            key = n.replace("vera_fx_adapters.default.sites.", "")  # a block's: <block>.vera_fx_adapters...
            torch.testing.assert_close(p.grad, theirs[key], atol=1e-5, rtol=1e-5, msg=key)
    assert ours_grads


# --- the cost model and forced choices ------------------------------------------------------------------------

@pytest.fixture
def products_only(monkeypatch):
    """The cost model without its elementwise-pass term: multiply-adds alone decide (the reasoning below)."""
    import vera_fx.passes.lower as lower
    for name in ("PASS_COST", "PASS_COST_CACHED", "PASS_COST_FUSED", "PASS_COST_FUSED_CACHED", "FOLD_PASS_COST"):
        monkeypatch.setattr(lower, name, 0)


def test_cost_model_counts(products_only):
    for tokens in (10, 3):  # weight: folded with T >= in; below that the lean op with the base call inside
        g = GroupShape(tokens=tokens, in_features=4, rows=2, r=2, outs=(3, 5))
        c = path_costs(g)
        t = tokens
        assert c["activation"] == c["fused"] == 2 * t * 4 * 2 + 2 * t * 2 * 3 + 2 * t * 2 * 5
        assert c["lean"] == c["activation"] + t * 2 * 3 + t * 2 * 5
        assert c["peft"] == 2 * (2 * t * 4 * 2) + 2 * t * 2 * 3 + 2 * t * 2 * 5  # x-A per site
        folded = t * 4 * 2 + (2 * 3 * 2 * 4 + t * 3 * 2) + (2 * 5 * 2 * 4 + t * 5 * 2)
        assert c["weight"] == (folded if t >= 4 else c["lean"])
        assert c["kept"] == (folded - 3 * 2 * 4 - 5 * 2 * 4 if t >= 4 else c["lean"])  # one fold per site less
    # a group's options: extra work over the activation path, values per step kept off, paths; Pareto-best,
    # cheapest first. Without the weight path: fused (the activation path's products) or lean per site
    g = GroupShape(tokens=10, in_features=4, rows=2, r=2, outs=(3, 5))
    opts = group_options(g, weight_allowed=False)
    assert opts == [(0, 0, ("fused", "fused")), (60, 30, ("lean", "fused")), (100, 50, ("fused", "lean")),
                    (160, 80, ("lean", "lean"))]
    # with it: a fold costs -4 out (two folds + g.T h - z B.T, d z), keeping W' 8 out less (one fold) for 4 out
    # values kept (out x in against 10 out); wholly folded groups skip d h @ A (80)
    opts = group_options(g, weight_allowed=True)
    assert opts == [(-36 - 60 - 80, 18 + 30, ("kept", "kept")), (-12 - 60 - 80, 30 + 30, ("weight", "kept")),
                    (-36 - 20 - 80, 18 + 50, ("kept", "weight")), (-12 - 20 - 80, 80, ("weight", "weight"))]
    pvera = group_options(GroupShape(10, 4, 4, 2, (3,)), weight_allowed=False)  # never folded; 5 r latent values
    assert pvera == [(0, 0, ("fused",)), (10 * 2 * 3, 10 * (3 + 10), ("lean",))]
    # many sites on one input: exact (a frontier per site), not an enumeration of every combination
    wide = GroupShape(64, 16, 4, 4, tuple(range(8, 40)))
    opts = group_options(wide, weight_allowed=True)
    assert opts[0][2] == ("kept",) * 32 and opts[-1][2] == ("weight",) * 32
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(opts, opts[1:]))


def test_cost_model_decisions(products_only):
    h, inter = 2048, 5632
    block = ((h, (h, h, h)), (h, (h,)), (h, (inter, inter)), (inter, (h,)))  # q/k/v, o, gate/up, down
    for r in (16, 256, 1024):
        # VeRA, 512 tokens (fewer than in: the weight call is the lean op there): the share pass saves 2 x-A
        # products of q/k/v and 1 of gate/up (12288 T r); the most out-width whose extra products fit is gate +
        # three 2048-wide sites (11776), not gate + up (11264)
        shapes = [GroupShape(512, i, r, r, outs) for i, outs in block]
        for allowed, low in ((False, "lean"), (True, "weight")):
            plan = plan_auto(shapes, [allowed] * 4)
            assert sum(p == low for paths in plan for p in paths) == 4
            assert plan[2].count(low) == 1 and set(p for paths in plan for p in paths) == {low, "fused"}
            assert plan_auto(shapes, [allowed] * 4, "time") == [["fused"] * len(outs) for _, outs in block]
        costs = [path_costs(g) for g in shapes]
        assert sum(c["peft"] - c["activation"] for c in costs) == 12288 * 512 * r
        # 4096 tokens: folding is cheaper than the activation path everywhere, so every site folds; for the
        # least work every call keeps W' (one fold less), for the least memory none does
        shapes = [GroupShape(4096, i, r, r, outs) for i, outs in block]
        assert plan_auto(shapes, [True] * 4) == [["weight"] * 3, ["weight"], ["weight"] * 2, ["weight"]]
        assert plan_auto(shapes, [True] * 4, "time") == [["kept"] * 3, ["kept"], ["kept"] * 2, ["fused"]]  # T < 5632
        # PVeRA: A has 2r rows, so the saving doubles and pays for every site (and it never folds)
        shapes = [GroupShape(512, i, 2 * r, r, outs) for i, outs in block]
        assert plan_auto(shapes, [False] * 4) == [["lean"] * 3, ["lean"], ["lean"] * 2, ["lean"]]
    # today's benchmark shape (hidden 512, 1376, 512 tokens, r=256): o folds for free (its fold and g.T h cost
    # what z B.T and its gradient do), q/k/v fold for one x-A product, down is lean (T < 1376) and gate folds;
    # the least work keeps W' where it folds (T = in: as many values as u) and down fused
    today = ((512, (512, 512, 512)), (512, (512,)), (512, (1376, 1376)), (1376, (512,)))
    shapes = [GroupShape(512, i, 256, 256, outs) for i, outs in today]
    # (counted without passes: W' kept by q and k saves nothing at T = in, but their group then folds wholly and
    # its d h @ A saving pays for up's fold, more values than q's and k's)
    assert plan_auto(shapes, [True] * 4) == [["kept", "kept", "weight"], ["weight"], ["weight"] * 2, ["weight"]]
    assert plan_auto(shapes, [True] * 4, "time") == [["kept"] * 3, ["kept"], ["kept"] * 2, ["fused"]]
    # q/v: the one saved x-A product pays for both extra products exactly
    assert plan_auto([GroupShape(1024, h, 256, 256, (h, h))], [False]) == [["lean", "lean"]]
    # a single site saves nothing against PEFT: it keeps its activations (fused) ...
    assert plan_auto([GroupShape(1024, 256, 1024, 1024, (32000,))], [False]) == [["fused"]]
    # ... unless folding it is fewer operations than the activation path: then it folds and pays for others
    fold = GroupShape(1 << 16, 512, 1024, 1024, (512,))
    assert plan_auto([fold, fold], [True, False]) == [["weight"], ["lean"]]
    # a flat capture of many identical layers plans fast (kinds combined) and within the budget
    shapes = [GroupShape(512, i, 256, 256, outs) for _ in range(48) for i, outs in today]
    plan = plan_auto(shapes, [True] * len(shapes))
    options = {(g, tuple(p)): w for g in set(shapes) for w, _, p in group_options(g, True)}
    assert sum(options[(g, tuple(p))] for g, p in zip(shapes, plan)) <= sum(
        path_costs(g)["peft"] - path_costs(g)["activation"] for g in shapes)


def test_elementwise_passes_count():
    """The activation path's passes over each tokens x out tensor are work the other paths skip: 256
    multiply-add equivalents per value beyond 4 MiB for the lean and weight paths, 192 for the fused tail (it
    runs two of the four); within 4 MiB 64 for the folding call and the fused tail, none for the lean op
    (measured: its call costs what the passes do) nor for a weight call that does not fold (the lean op with
    the base call inside). A fold costs 32 per value of W' besides its product."""
    small, large = GroupShape(512, 2048, 256, 256, (2048,)), GroupShape(512, 2048, 256, 256, (5632,))
    folding = GroupShape(512, 512, 256, 256, (512,))
    assert pass_cost(folding, 512) == PASS_COST_CACHED == 64 and pass_cost(small, 2048, "lean") == 0
    assert pass_cost(small, 2048) == pass_cost(small, 2048, "kept") == 0  # T < in: the lean op
    assert pass_cost(small, 2048, "fused") == PASS_COST_FUSED_CACHED == 64
    assert pass_cost(large, 5632) == pass_cost(large, 5632, "lean") == PASS_COST == 256
    assert pass_cost(large, 5632, "fused") == PASS_COST_FUSED == 192
    assert CACHE_BYTES == 512 * 2048 * 4  # exactly 4 MiB: still cached
    assert group_options(small, True)[-1][0] == 512 * 256 * 2048  # T < in: not folded, the lean op's cost
    fold = 2 * 512 * 256 * 512 + 512 * 512 * 256 - 2 * 512 * 256 * 512  # two folds, g.T h - z B.T, d z
    assert group_options(folding, True)[-1] == (fold - 64 * 512 * 512 + 2 * 32 * 512 * 512 - 512 * 512 * 256,
                                                512 * 512, ("weight",))  # + two folds' W', - d h @ A
    assert group_options(small, True)[0] == (-64 * 512 * 2048, 0, ("fused",))
    assert group_options(small, False)[-1][0] == 512 * 256 * 2048
    assert group_options(large, False)[-1][0] == 0  # r = 256: its lean product costs what its passes do
    # realistic Llama (hidden 2048, 5632, 1024 tokens): at r=256 every site's lean product is paid by the passes
    # it skips; at r=1024 all but q and k fit the share pass's saving with the fused tails' passes
    h, inter = 2048, 5632
    block = ((h, (h, h, h)), (h, (h,)), (h, (inter, inter)), (inter, (h,)))
    plan = plan_auto([GroupShape(1024, i, 256, 256, outs) for i, outs in block], [True] * 4)
    assert plan == [["weight"] * 3, ["weight"], ["weight"] * 2, ["weight"]]
    plan = plan_auto([GroupShape(1024, i, 1024, 1024, outs) for i, outs in block], [True] * 4)
    assert plan == [["weight", "fused", "fused"], ["weight"], ["weight"] * 2, ["weight"]]
    # half precision values are half the bytes: 8192 tokens x 256 in bfloat16 stay cached
    assert pass_cost(GroupShape(8192, 64, 8, 8, (256,), value_bytes=2), 256) == PASS_COST_CACHED


def test_choose_options_is_exact():
    # subset sum: 5 + 4 + 3 fill 12 where largest-first takes 5 + 5 and stops at 10
    groups = [[(0, 0), (5, 5)], [(0, 0), (5, 5)], [(0, 0), (4, 4)], [(0, 0), (3, 3)]]
    assert choose_options(groups, 12) == [1, 0, 1, 1]  # the earlier of the two 5s
    # the most saved values, not the most work; an option saving work pays for another group's
    assert choose_options([[(0, 0), (4, 4)], [(0, 0), (2, 3)], [(0, 0), (2, 3)]], 4) == [0, 1, 1]
    assert choose_options([[(0, 0), (-2, 1)], [(0, 0), (3, 5)]], 1) == [1, 1]
    assert choose_options([], 10) == [] and choose_options([[(3, 1)], [(20, 9), (0, 0)]], 10) == [0, 1]
    # against brute force on random instances, with repeated groups (kinds)
    rng = random.Random(0)
    for _ in range(300):
        groups: list[list[tuple[int, int]]] = []
        for _ in range(rng.randint(1, 6)):
            fresh = sorted({(rng.randint(-3, 9), rng.randint(0, 9)) for _ in range(rng.randint(1, 4))})
            groups.append(fresh if not groups or rng.random() < 0.6 else groups[rng.randrange(len(groups))])
        budget = rng.randint(0, 20)
        feasible = [c for c in itertools.product(*(range(len(g)) for g in groups))
                    if sum(g[j][0] for g, j in zip(groups, c)) <= budget]
        if not feasible:
            continue
        score = lambda c: (sum(g[j][1] for g, j in zip(groups, c)), -sum(g[j][0] for g, j in zip(groups, c)))
        picks = choose_options(groups, budget)
        assert -score(picks)[1] <= budget and score(picks) == max(map(score, feasible)), (groups, budget)


def _site_paths(gm) -> set[tuple[str, str]]:
    return {(n.meta["vera_fx"]["site"], n.meta["vera_fx"].get("path") or "activation") for n in gm.graph.nodes
            if (n.meta.get("vera_fx") or {}).get("role") == "output"}


def _kept(gm) -> list[str]:
    """The sites whose folding call keeps W' (the weight path's ``"kept"`` plan)."""
    return sorted(n.meta["vera_fx"]["site"] for g in graph_modules(as_graph_module(gm)) for n in g.graph.nodes
                  if (n.meta.get("vera_fx") or {}).get("keep"))


def test_auto_follows_tokens_and_site_overrides(products_only):
    net, x = _net(), _x()
    # widths of 16-24 against r=8. With one token per step nothing folds (the weight call is the lean op): x
    # feeds q/k/v, so the share pass saves two x-A products (2 * 2 * T * 16 * 8 = 512 T); the extras are
    # T * 8 * out (192 T for q, k and q's second call, 128 T for v and o): two 24-wide sites and one 16-wide fill
    # the budget exactly (ties: the earlier groups' options); the others keep their activations (fused tails)
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), tokens=1)
    assert _paths(gm) == {"weight": 3, "fused": 2} and lowering_setting(gm) == {"mode": "auto", "tokens": 1}
    assert _site_paths(gm) == {("q", "weight"), ("k", "fused"), ("v", "fused"), ("o", "weight")}
    # 16 tokens: q/k/v fold (T >= in 16); wholly folded the group skips d h @ A: 3 * (2 * 8 * 16 * out) + 16 * 8
    # * 64 - 2 * 16 * 8 * 64 - 16 * 16 * 8 = 6144 of the budget's 8192, q's second call 1024; o (in 24, lean)
    # 2048 more fits once v keeps its W' (16 x 16 values, as many as its u: one fold, 2048, less)
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), tokens=16)
    assert _site_paths(gm) == {("q", "weight"), ("k", "weight"), ("v", "weight"), ("o", "weight")}
    assert _kept(gm) == ["v"]
    # with the default 1024 tokens folding costs fewer operations than the activation path: every site folds
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,))
    assert _paths(gm) == {"weight": 5} and lowering_setting(gm) == {"mode": "auto", "tokens": None}
    gm = vera_fx.transform(net, _config("pvera"), example_inputs=(x,))
    assert _paths(gm) == {"lean": 5}  # never folded (it samples); 2r rows of A: the saving pays for every site
    # overrides: o and v are forced; q/k keep one auto group whose saving (one x-A product, 4096 at 16 tokens)
    # pays for q and k folded (4096) once q keeps its W' (one fold less), and q's second call with it
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering={"o": "activation", "v": "weight"},
                           tokens=16)
    assert _site_paths(gm) == {("q", "weight"), ("k", "weight"), ("o", "activation"), ("v", "weight")}
    assert _paths(gm) == {"weight": 4, "activation": 1} and _kept(gm) == ["q"]
    assert DEFAULT_TOKENS == 1024


def test_fast_plans_least_work_per_site_override_too():
    """``fast`` as the mode and as a per-site override: at r=8 on 16-24 wide sites the passes the fused tails skip
    outweigh any fold, so fast fuses every site; beside it the other sites follow their own modes (v lean, q
    auto: folded). Outputs and gradients equal the plain path's."""
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering="fast", tokens=16)
    assert _paths(gm) == {"fused": 5} and lowering_setting(gm)["mode"] == "fast"
    mixed = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering={"o": "fast", "v": "lean"},
                              tokens=16)
    assert _site_paths(mixed) == {("q", "weight"), ("k", "fused"), ("o", "fused"), ("v", "lean")}
    plain = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering="activation")
    for g in (gm, mixed, plain):
        g.train()
        _randomize(g)
    _assert_same(_step(gm, x), _step(plain, x))
    _assert_same(_step(mixed, x), _step(plain, x))


def test_set_lowering_switches_paths_and_keeps_outputs():
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("pvera", generator_seed=0), example_inputs=(x,))
    _randomize(gm)
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
    for lowering in ("activation", "lean", "auto"):
        vera_fx.set_lowering(gm, lowering)
        assert _paths(gm) == {"activation" if lowering == "activation" else "lean": 5}
        with torch.no_grad():
            torch.testing.assert_close(gm(x), ref, atol=1e-6, rtol=1e-6)
    code = gm.code
    with pytest.raises(ValueError, match="lowering='quick' is not one of"):
        vera_fx.set_lowering(gm, "quick")
    with pytest.raises(TypeError, match="lowering must be one of"):
        vera_fx.set_lowering(gm, 3)
    with pytest.raises(ValueError, match="tokens=0 is invalid"):
        vera_fx.set_lowering(gm, "auto", tokens=0)
    with pytest.raises(ValueError, match="entries"):
        vera_fx.set_lowering(gm, {"q": "quick"})
    with pytest.raises(TypeError, match="set_lowering takes"):
        vera_fx.set_lowering(net, "lean")
    assert gm.code == code


def test_transform_refuses_bad_lowering_before_capture():
    with pytest.raises(ValueError, match="lowering='plain' is not one of"):
        vera_fx.transform(_net(), _config("vera"), example_inputs=(_x(),), lowering="plain")


def test_lowering_plans_only_what_was_just_emitted(products_only):
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering="lean").graph_module
    code = gm.code
    assert lower_adapters(gm, []) == 0 and gm.code == code  # nothing handed over: nothing searched, nothing changed
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering="activation").graph_module
    assert vera_fx.set_lowering(gm, "lean") is gm and _paths(gm) == {"lean": 5}
    # auto: another adapter's emission plans its own sites only (the first one's fused tails and folds stay)
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), tokens=1)
    before = _site_paths(gm)
    assert ("v", "fused") in before
    def by_adapter():
        return sorted((t["adapter"], t["site"], t.get("path")) for n in gm.graph.nodes
                      if (t := n.meta.get("vera_fx") or {}).get("role") == "output")
    first = by_adapter()
    vera_fx.add_adapter(gm, "second", _config("vera"))
    assert by_adapter() == first  # inactive: no nodes yet, the first adapter's plan untouched
    vera_fx.set_adapter(gm, ["default", "second"])
    after = by_adapter()
    assert [p for p in after if p[0] == "default"] == first
    # its own plan: one adapter folds per call, so at default's folding calls (q, o) it is lean, elsewhere fused
    assert [p[1:] for p in after if p[0] == "second"] == [("k", "fused"), ("o", "lean"), ("q", "lean"),
                                                          ("q", "lean"), ("v", "fused")]


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs (parameters and inputs
    that are leaves excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter) and not (t.requires_grad and t.is_leaf):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_lean_saves_less_for_backward():
    """Counted bytes autograd keeps: the lean and weight paths keep no per-site (tokens x out) tensor."""
    net = _net()
    x = torch.randn(4, 64, 16, requires_grad=True)
    for method, paths in (("pvera", ("activation", "lean", "fused")),
                          ("vera", ("activation", "lean", "weight", "fused", "fast"))):
        saved = {}
        for lowering in paths:
            gm = vera_fx.transform(net, _config(method, r=8), example_inputs=(x,), lowering=lowering,
                                   tokens=256).train()
            saved[lowering] = _saved_bytes(lambda: gm(x))
        assert saved["lean"] < 0.5 * saved["activation"], (method, saved)
        assert saved["fused"] <= saved["activation"], (method, saved)  # u per site, as the plain chain
        if method == "pvera":  # less: its KL term is recorded as the lean path's (from h, computed when read)
            assert saved["fused"] < 0.75 * saved["activation"], saved
        if method == "vera":  # folded calls (256 tokens) keep only the shared x @ A.T, as the lean op does
            assert saved["weight"] <= saved["lean"], saved  # (the lean path's base linears keep views of W)
            # fast: every call folds and keeps its W' (out x in floats: q twice, k, v, o), far less than its u
            assert _paths(gm) == {"weight": 5} and len(_kept(gm)) == 5
            assert saved["fast"] == saved["weight"] + 4 * (24 * 16 * 3 + 16 * 16 + 16 * 24), saved


# --- merge, checkpoints, inspection, compile ----------------------------------------------------------------

def test_lean_kl_is_computed_when_read():
    """A lean site records its KL term unevaluated (a forward whose loss has no KL term does not pay for it);
    reading it gives the plain path's value and gradients, a read under no_grad stays re-readable with
    gradients, saved-tensor hooks (checkpointing) get it computed in the forward, and old terms are freed."""
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    from vera_fx.methods.pvera import KL_RECORD, LazyKL

    net, x = _net(), _x()
    grads = {}
    for lowering in ("activation", "lean"):
        gm = vera_fx.transform(net, _config("pvera", generator_seed=0), example_inputs=(x,),
                               lowering=lowering).train()
        _randomize(gm)
        gm(x)
        record = getattr(gm.vera_fx_adapters.default, KL_RECORD)
        lazy = [v for v in record.values.values() if isinstance(v, LazyKL)]
        assert len(lazy) == (5 if lowering == "lean" else 0), record.values
        if lowering == "lean":
            assert all(repr(v) == "LazyKL(pending)" for v in lazy)
            with torch.no_grad():
                first = vera_fx.kl_divergence(gm)
            assert first.grad_fn is None and all(repr(v) == "LazyKL(pending)" for v in lazy)
        kl = vera_fx.kl_divergence(gm)
        assert kl.grad_fn is not None
        if lowering == "lean":
            torch.testing.assert_close(first, kl.detach(), atol=0, rtol=0)
            assert all(repr(v) == "LazyKL(computed)" for v in lazy)
            assert all(v.value() is v.value() for v in lazy)  # each term is computed once
            torch.testing.assert_close(vera_fx.kl_divergence(gm), kl, atol=0, rtol=0)
        gm.zero_grad(set_to_none=True)
        kl.backward()
        grads[lowering] = (kl.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()
                                         if p.grad is not None})
    torch.testing.assert_close(grads["lean"][0], grads["activation"][0], atol=1e-6, rtol=1e-5)
    assert set(grads["lean"][1]) == set(grads["activation"][1]) and any("lambda_d" in n for n in grads["lean"][1])
    for n, g in grads["activation"][1].items():
        torch.testing.assert_close(grads["lean"][1][n], g, atol=1e-6, rtol=1e-5, msg=n)
    # under activation checkpointing the term is computed in the (recomputed) forward: nothing holds h
    out = checkpoint(gm, x.clone().requires_grad_(True), use_reentrant=False)
    assert not any(isinstance(v, LazyKL) for v in record.values.values())
    (out.pow(2).mean() + vera_fx.kl_divergence(gm)).backward()
    # reentrant checkpointing re-runs the forward inside backward: that run computes its terms too
    checkpoint(gm, x.clone().requires_grad_(True), use_reentrant=True).pow(2).mean().backward()
    assert record.values and not any(isinstance(v, LazyKL) for v in record.values.values())
    # each forward replaces the last terms: a term (and the h it holds) is freed with its step
    gm(x)
    old = [weakref.ref(v) for v in record.values.values()]
    gm(x)
    gc.collect()
    assert all(ref() is None for ref in old)


@pytest.mark.parametrize("lowering", ["lean", "weight"])
def test_merge_and_unmerge_lowered_graph(lowering):
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("vera"), example_inputs=(x,), lowering=lowering)
    _randomize(gm)
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
    vera_fx.merge(gm)
    assert not any(n.meta.get("vera_fx") for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
    vera_fx.unmerge(gm)
    assert _paths(gm) == {lowering: 5}
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, atol=1e-6, rtol=1e-6)


def test_lowering_is_not_in_adapter_config_and_peft_loads_it(tmp_path):
    model = tiny_llama()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), lowering="lean")
    vera_fx.save_adapter(gm, tmp_path / "a")
    text = (tmp_path / "a" / "adapter_config.json").read_text()
    assert "lower" not in text and "tokens" not in json.loads(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")
    assert pm.peft_config["default"].r == 8


def test_inspection_reads_lowered_nodes():
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("pvera", generator_seed=0), example_inputs=(x,), lowering="lean")
    names = {n.name for n in gm.graph.nodes}
    assert {"q_default_sample", "q_default_kl", "q_default_add"} <= names
    rows = {r["name"]: r["state"] for r in vera_fx.inspect.summary_rows(gm)}
    assert set(rows) == {"q", "k", "v", "o"}
    roles = {a.get("role") for _, a in vera_fx.to_networkx(gm).nodes(data=True)}
    assert {"projection", "lambda", "sampling", "output"} <= roles
    add = next(n for n in gm.graph.nodes if n.name == "q_default_add")
    assert add.target is lean_site and add.meta["vera_fx"]["role"] == "output"
    assert add.args[-1] is False  # forced lean: the op stays under torch.compile too
    vera_fx.delete_adapter(gm, "default")
    assert not any(n.meta.get("vera_fx") for n in gm.graph.nodes)


def test_compile_fullgraph_lean_path():
    net, x = _net(), _x()
    gm = vera_fx.transform(net, _config("pvera", generator_seed=0), example_inputs=(x,), lowering="lean").train()
    _randomize(gm)
    eager = _step(gm, x, kl=True)
    vera_fx.sampling.reseed(gm)
    ref = _step(gm, x, kl=True)
    _assert_same(eager, ref)  # reseeding restarts the streams
    vera_fx.sampling.reseed(gm)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    x2 = x.clone().requires_grad_(True)
    gm.zero_grad(set_to_none=True)
    out = compiled(x2)
    loss = out.pow(2).mean() + vera_fx.kl_divergence(gm)
    loss.backward()
    torch.testing.assert_close(out.detach(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, ref[2], atol=1e-5, rtol=1e-5)
    for n, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[1][n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["vera", "pvera"])
def test_auto_sites_trace_their_backward_under_compile(method):
    """torch.compile traces the sites auto lowered (VeRA: folded weight calls, PVeRA: lean) as their own
    forward and backward (an autograd.Function dynamo traces, so inductor can fuse it), the sites forced lean
    as the opaque op; outputs and gradients equal eager's, and the compiled auto graph keeps less for backward
    than the compiled plain chain."""
    kw = {} if method == "vera" else {"generator_seed": 0}
    for lowering, want_op in (("auto", False), ("lean", True)):
        net, x = _net(), torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))  # 32 tokens: VeRA folds
        gm = vera_fx.transform(net, _config(method, **kw), example_inputs=(x,), lowering=lowering).train()
        _randomize(gm)
        assert _paths(gm) == {"weight" if method == "vera" and lowering == "auto" else "lean": 5}, _paths(gm)
        ref = _step(gm, x, kl=method == "pvera")
        if method == "pvera":
            vera_fx.sampling.reseed(gm)  # the compiled step draws the eager step's noise
        graphs = []

        def backend(g, example_inputs, graphs=graphs):
            graphs.append(g)
            return g.forward

        torch._dynamo.reset()
        out, grads, gx, loss = _step(torch.compile(gm, fullgraph=True, backend=backend), x, kl=method == "pvera")
        got = out, {k.removeprefix("_orig_mod."): v for k, v in grads.items()}, gx, loss
        targets = [str(n.target) for g in graphs for n in g.graph.nodes]
        ops = [t for t in targets if "lean_add" in t]
        traced = [t for t in targets if "autograd_function_apply" in t]
        assert bool(ops) == want_op and bool(traced) != want_op, (lowering, ops, traced)
        _assert_same(got, ref)
    if method == "vera":
        return  # the memory check once: PVeRA's backward has VeRA's scaled-B products and more
    saved = {}
    for lowering in ("auto", "activation"):
        net, x = _net(), _x()
        gm = vera_fx.transform(net, _config(method, **kw), example_inputs=(x,), lowering=lowering).train()
        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()
        saved[lowering] = _saved_bytes(lambda: compiled(x.clone().requires_grad_(True)))
    assert saved["auto"] < saved["activation"], saved


@pytest.mark.parametrize("lead", [(2, 5), (1, 1)], ids=["b-scaled", "tokens-scaled"])
@pytest.mark.parametrize("probabilistic, noise", [(False, False), (True, False), (True, True)],
                         ids=["vera", "pvera-mean", "pvera-sampled"])
def test_lean_add_gradients_are_exact(probabilistic, noise, lead):
    """The lean op's hand-written backward against finite differences (float64), also with a broadcast y;
    ``lead``: 10 tokens (VeRA's lambda_d scales B, out x r the smaller) or one (it scales h)."""
    g = torch.Generator().manual_seed(0)
    r, out = 3, 4
    rows = 2 * r if probabilistic else r

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    h, lam_d, b, lam_b = t(*lead, rows), t(rows), t(out, r, grad=False), t(out)
    eps = t(*lead, r, grad=False) if noise else None
    for y in (t(*lead, out), t(out)):
        def f(y, h, lam_d, lam_b):
            return torch.ops.vera_fx.lean_add(y, h, lam_d, b, lam_b, eps, r, probabilistic)

        def eager(y, h, lam_d, lam_b):  # an eager step's autograd.Function (PVeRA keeps eps * exp(lv / 2))
            out = lean_site(y, h, lam_d, b, lam_b, eps, r, probabilistic, False)
            assert type(out.grad_fn).__name__ == "_LeanAddBackward"
            return out
        assert torch.autograd.gradcheck(f, (y, h, lam_d, lam_b))
        assert torch.autograd.gradcheck(eager, (y, h, lam_d, lam_b))
        for need in ((y, h), (lam_d,), (lam_b,)):  # each gradient alone, as a frozen-lambda step asks
            args = [a.detach().requires_grad_(any(a is n for n in need)) for a in (y, h, lam_d, lam_b)]
            torch.testing.assert_close(torch.autograd.grad(eager(*args).sum(), [a for a in args if a.requires_grad]),
                                       torch.autograd.grad(f(*args).sum(), [a for a in args if a.requires_grad]))
