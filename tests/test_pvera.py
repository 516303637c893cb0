"""PVeRA in the graph: parity with peft, sampling switches, noise streams, KL term, Monte Carlo, intervals."""

from __future__ import annotations

import copy
import gc
import logging
import math
import weakref

import pytest
import torch
from torch import nn

import vera_fx
from vera_fx.methods import method_for
from vera_fx.methods.base import kaiming_uniform
from vera_fx.methods.pvera import GENERATOR_STATE, KL_RECORD, NOISE_GROUPS, SAMPLE_SWITCH, pvera_reparametrize
from vera_fx.sampling import pvera_states, reseed
from vera_fx.uncertainty import student_t_quantile

from conftest import minilm, text_inputs, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

SEED = 7


# ----------------------------------------------------------------------------------------------- helpers

class OneSite(nn.Module):
    """One nn.Linear (8 -> 6); with ``twice`` it is called on x and on 2x (a shared layer)."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 6)
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y + self.lin(2 * x) if self.twice else y


def one_site(twice: bool = False, **kw) -> torch.fx.GraphModule:
    torch.manual_seed(1)  # init_weights=False draws lambdas from the global generator
    cfg = vera_fx.PveraConfig(**{"r": 4, "target_modules": ["lin"], "init_weights": False, **kw})
    return vera_fx.transform(OneSite(twice).eval(), cfg, example_inputs=(torch.randn(2, 4, 8),))


def x_one(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(3))


def randomise_lambdas(peft_model: nn.Module) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "pvera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def peft_layers(peft_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.pvera.layer import PveraLayer

    return [m for m in peft_model.modules() if isinstance(m, PveraLayer)]


def peft_sampling(peft_model: nn.Module, on: bool) -> None:
    for layer in peft_layers(peft_model):
        layer.sample_at_inference["default"] = on


def adapted_pair(builder, example_inputs=None, **kw):
    """A peft PVeRA model with random lambdas and our graph with peft's adapter state loaded."""
    pm = peft.get_peft_model(builder(), peft.PveraConfig(**kw))
    randomise_lambdas(pm)
    sd = peft.get_peft_model_state_dict(pm)
    gm = vera_fx.transform(builder(), vera_fx.PveraConfig(**kw), example_inputs=example_inputs)
    ours = vera_fx.adapter_state_dict(gm)
    assert sorted(ours) == sorted(sd)
    for key in ("base_model.pvera_A", "base_model.pvera_B"):
        assert torch.equal(ours[key], sd[key]), key  # same bits from the same projection_prng_key
    vera_fx.load_adapter_state_dict(gm, sd)
    return gm.eval(), pm.eval()


@pytest.fixture(scope="module")
def llama_pair():
    gm, _ = adapted_pair(tiny_llama, r=8, target_modules=["q_proj", "v_proj"], generator_seed=SEED)
    pm = peft.get_peft_model(tiny_llama(), peft.PveraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft.set_peft_model_state_dict(pm, vera_fx.adapter_state_dict(gm))  # unseeded peft: independent noise
    yield gm, pm


@pytest.fixture
def llama(llama_pair):
    """The shared llama pair in eval, sampling off, noise streams restarted."""
    gm, pm = llama_pair
    vera_fx.set_sample_at_inference(gm, False)
    reseed(gm)
    peft_sampling(pm, False)
    return gm.eval(), pm.eval()


# ------------------------------------------------------------------------------------------------ init

def test_kaiming_bits_and_projection_order_match_torch():
    for fan in (1, 2, 3, 7, 32, 100, 384, 768, 1000, 4096):
        g1, g2 = torch.Generator().manual_seed(fan), torch.Generator().manual_seed(fan)
        ours = kaiming_uniform((5, fan), g1)
        ref = torch.nn.init.kaiming_uniform_(torch.empty(5, fan), generator=g2)
        assert torch.equal(ours, ref), fan
    cfg = vera_fx.PveraConfig(projection_prng_key=5)
    a, b = method_for(cfg).init_projections(cfg, in_max=384, out_max=1536)
    assert a.shape == (512, 384) and b.shape == (1536, 256)
    g = torch.Generator().manual_seed(5)
    ref_a = torch.nn.init.kaiming_uniform_(torch.empty(512, 384), generator=g)  # A (2r rows) first, then B
    ref_b = torch.nn.init.kaiming_uniform_(torch.empty(1536, 256), generator=g)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


def test_config_matches_peft_fields_and_defaults():
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(vera_fx.PveraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PveraConfig)}
    for name, default in ours.items():
        assert name in theirs, name
        assert theirs[name] == default, name
    peft_specific = {"r", "pvera_dropout", "d_initial", "sample_at_inference", "generator_seed", "projection_prng_key",
                     "save_projection", "target_modules", "bias", "init_weights"}
    assert peft_specific <= set(ours)


# --------------------------------------------------------------------------------------------- parity

def test_parity_llama_eval_and_checkpoint_keys(llama):
    gm, pm = llama
    x = text_inputs(tiny_llama())
    with torch.no_grad():
        ours, ref = gm(**x), pm(**x)
    assert (ours.logits - ref.logits).abs().max() < 1e-5
    assert abs(ours.loss - ref.loss) < 1e-5
    keys = vera_fx.adapter_state_dict(gm)
    assert "base_model.model.model.layers.0.self_attn.q_proj.pvera_lambda_d" in keys
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.pvera_lambda_d"].shape == (16,)
    assert keys["base_model.pvera_A"].shape == (16, 32) and keys["base_model.pvera_B"].shape == (32, 8)


def test_parity_gpt2_eval():
    gm, pm = adapted_pair(tiny_gpt2, r=8, target_modules=["c_attn"], fan_in_fan_out=True)
    x = text_inputs(tiny_gpt2(), batch=2, length=9)
    with torch.no_grad():
        assert (gm(**x).logits - pm(**x).logits).abs().max() < 1e-5


def test_parity_minilm_eval():
    model = minilm()
    gm, pm = adapted_pair(minilm, r=16)
    x = text_inputs(model, labels=False)
    with torch.no_grad():
        diff = (gm(**x).last_hidden_state - pm(**x).last_hidden_state).abs().max()
    assert diff < 1e-5


# ------------------------------------------------------------------------------------------- sampling

def test_seeded_sites_draw_independent_noise(llama):
    """Each site's stream is seeded from (generator_seed, site): q_proj and v_proj of a layer (same noise shape)
    get different noise, unlike peft, which seeds every layer with the same seed."""
    gm, _ = llama
    state = gm.vera_fx_adapters.default
    states = [state.site_module(s)._buffers[GENERATOR_STATE] for s in state.site_names]
    assert len(states) == 4
    assert all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1:])
    x = text_inputs(tiny_llama(), labels=True)
    with torch.no_grad():
        gm.train()
        y1, y2 = gm(**x).logits, gm(**x).logits
        reseed(gm)
        y3 = gm(**x).logits
    assert (y1 - y2).abs().max() > 1e-3 and torch.equal(y1, y3)


def test_switches_train_eval_and_no_recapture():
    gm = one_site(generator_seed=SEED)
    x = x_one()
    code = gm.code
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))  # the adapters start in training mode (PEFT's new layers do)
        gm.eval()
        mean1, mean2 = gm(x), gm(x)
        assert torch.equal(mean1, mean2)  # eval, sampling off: deterministic
        gm.train()
        assert not torch.equal(gm(x), gm(x))
        gm.eval()
        vera_fx.set_sample_at_inference(gm, True)
        s1, s2 = gm(x), gm(x)
        assert not torch.equal(s1, s2) and not torch.equal(s1, mean1)
        assert vera_fx.sites(gm)[0].sampling == ("default",)
        assert method_for(gm.vera_fx_adapters.default.config).sampling_sites(gm.vera_fx_adapters.default) == ("lin",)
        vera_fx.set_sample_at_inference(gm, {"lin": False})
        assert torch.equal(gm(x), mean1)
        assert vera_fx.sites(gm)[0].sampling == ()
    assert gm.code == code
    assert gm.vera_fx_adapters.default.switches["sample_at_inference"] == {"lin": False}
    names = [n.name for n in gm.graph.nodes if (n.meta.get("vera_fx") or {}).get("role") == "sampling"]
    assert "lin_default_sample" in names and "lin_default_kl" in names


def test_config_dict_sets_sites_and_rejects_unknown():
    gm = one_site(sample_at_inference={"lin": True})
    assert getattr(gm.vera_fx_adapters.default.sites.lin, SAMPLE_SWITCH) is True
    with pytest.raises(ValueError, match=r"unknown sites \['lni'\].*\['lin'\]"):
        one_site(sample_at_inference={"lni": True})


def test_seed_reproducible_across_transforms_and_dtype_moves():
    x = x_one()
    a, b = one_site(generator_seed=SEED), one_site(generator_seed=SEED)
    c = one_site(generator_seed=SEED + 1)
    for gm in (a, b, c):
        gm.train()
    with torch.no_grad():
        ya, yb, yc = a(x), b(x), c(x)
        assert torch.equal(ya, yb) and not torch.equal(ya, yc)
        a.to(torch.float64), b.double()
        za, zb = a(x.double()), b(x.double())
    assert za.dtype == torch.float64 and torch.equal(za, zb)
    buf = a.vera_fx_adapters.default.sites.lin._buffers[GENERATOR_STATE]
    assert buf.dtype == torch.uint8
    assert not any(GENERATOR_STATE in k for k in a.state_dict())
    assert not any(GENERATOR_STATE in k for k in vera_fx.adapter_state_dict(a))


def test_statistics_match_peft_sampled_outputs(llama):
    """Unseeded peft against our seeded Monte Carlo: per-element means and standard deviations agree within what
    n samples resolve (5 standard errors)."""
    gm, pm = llama
    peft_sampling(pm, True)
    x = text_inputs(tiny_llama(), batch=1, length=4)
    n = 150
    torch.manual_seed(0)
    with torch.no_grad():
        ref = torch.stack([pm(**x).logits[0] for _ in range(n)])
    ours = vera_fx.monte_carlo(gm, **x, n_samples=n).logits[:, 0]
    m1, m2, s1, s2 = ours.mean(0), ref.mean(0), ours.std(0), ref.std(0)
    assert s2.min() > 1e-3  # peft really samples
    z = (m1 - m2) / torch.sqrt((s1 ** 2 + s2 ** 2) / n)
    assert z.abs().max() < 5
    assert (s1 / s2).log().abs().max() < 5 / math.sqrt(n - 1)


# ---------------------------------------------------------------------------------------- monte carlo

def test_monte_carlo_equals_sequential_forwards_and_chunking(llama, caplog):
    gm, _ = llama
    x = text_inputs(tiny_llama(), batch=2, length=5)
    gm.train()
    with caplog.at_level(logging.WARNING, logger="vera_fx.uncertainty"):
        mc = vera_fx.monte_carlo(gm, **x, n_samples=5)
    assert "no batch dimension" in caplog.text
    assert type(mc).__name__ == "CausalLMOutputWithPast" and mc.loss is None
    assert mc.logits.shape == (5, 2, 5, 96)
    assert gm.training  # mode, switches and noise groups restored
    assert vera_fx.sites(gm, "default")[0].sampling == ()
    assert getattr(gm.vera_fx_adapters.default, NOISE_GROUPS) == 1
    gm.eval()
    reseed(gm)
    vera_fx.set_sample_at_inference(gm, True)
    with torch.no_grad():
        loop = torch.stack([gm(**x).logits for _ in range(5)])
    assert (mc.logits - loop).abs().max() < 1e-5
    for max_batch in (2, 5, 8):  # chunks of 1, 2 and 4 samples: same streams, same samples
        reseed(gm)
        chunked = vera_fx.monte_carlo(gm, **x, n_samples=5, max_batch=max_batch)
        assert (chunked.logits - mc.logits).abs().max() < 1e-5, max_batch
    # only the switched-on sites sample
    site = "model.layers.0.self_attn.q_proj"
    vera_fx.set_sample_at_inference(gm, False)
    vera_fx.set_sample_at_inference(gm, {site: True})
    reseed(gm)
    one = vera_fx.monte_carlo(gm, **x, n_samples=3).logits
    assert [s.name for s in vera_fx.sites(gm) if s.sampling] == [site]
    reseed(gm)
    with torch.no_grad():
        loop = torch.stack([gm(**x).logits for _ in range(3)])
    assert (one - loop).abs().max() < 1e-5
    assert (one - mc.logits[:3]).abs().max() > 1e-3


def test_monte_carlo_one_site_and_restores_on_error():
    gm = vera_fx.transform(OneSite().eval(), vera_fx.PveraConfig(r=4, target_modules=["lin"], generator_seed=SEED),
                           example_inputs=(torch.randn(2, 4, 8),))
    two = one_site(generator_seed=SEED)
    x = x_one(batch=2)
    with torch.no_grad():
        vera_fx.set_sample_at_inference(two, False)
        mean = two(x)
    out = vera_fx.monte_carlo(two, x, n_samples=4)
    assert out.shape == (4, 2, 5, 6) and out.std(0).min() > 0
    assert vera_fx.sites(two)[0].sampling == ()
    lo, hi = vera_fx.confidence_interval(out)
    assert lo.shape == mean.shape and bool((lo <= hi).all())
    # an error inside the forward: everything is restored
    gm.train()
    record = getattr(gm.vera_fx_adapters.default, KL_RECORD)
    gm(x)
    before = dict(record.values)
    with pytest.raises((RuntimeError, AssertionError)):  # the graph's shape guard rejects 7 features
        vera_fx.monte_carlo(gm, torch.randn(2, 5, 7), n_samples=3)
    assert gm.training and vera_fx.sites(gm)[0].sampling == ()
    assert getattr(gm.vera_fx_adapters.default, NOISE_GROUPS) == 1
    assert record.values.keys() == before.keys()
    assert all(record.values[k] is before[k] for k in before)


# ---------------------------------------------------------------------------------------------- KL term

def test_kl_divergence_by_hand_gradient_and_shared_layer():
    for twice in (False, True):
        gm = one_site(twice=twice)
        gm.train()
        x = x_one()
        gm(x)
        kl = vera_fx.kl_divergence(gm)
        state = gm.vera_fx_adapters.default
        lam_d = state.sites.lin.pvera_lambda_d
        terms = []
        for inp in ((x, 2 * x) if twice else (x,)):
            h = (inp @ state.pvera_A[:, :8].T) * lam_d
            mu, logvar = h[..., :4], h[..., 4:]
            terms.append((-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).mean())
        expected = sum(terms) / len(terms)
        assert torch.allclose(kl, expected, rtol=1e-5, atol=1e-6)
        kl.backward()
        assert lam_d.grad is not None and lam_d.grad[:4].abs().sum() > 0 and lam_d.grad[4:].abs().sum() > 0
        assert state.sites.lin.pvera_lambda_b.grad is None  # the KL term does not depend on lambda_b
    assert vera_fx.kl_divergence(gm, "default").shape == ()


def test_kl_memory_stays_flat_over_50_steps():
    gm = one_site()
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    record = getattr(gm.vera_fx_adapters.default, KL_RECORD)
    x = x_one()
    recorded = []  # a weak reference to every step's KL term: only the last one may stay alive
    for step in range(50):
        loss = gm(x).pow(2).mean() + 0.1 * vera_fx.kl_divergence(gm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert len(record.values) == 1
        recorded.append(weakref.ref(next(iter(record.values.values()))))
    del loss
    gc.collect()
    alive = [i for i, ref in enumerate(recorded) if ref() is not None]
    assert alive == [49], alive  # each forward replaced the last term, and its autograd graph was freed


def test_deepcopy_after_forward_and_merge_hooks():
    gm = one_site(generator_seed=SEED)
    gm.train()
    gm(x_one())
    clone = copy.deepcopy(gm)
    assert getattr(clone.vera_fx_adapters.default, KL_RECORD).values == {}
    clone(x_one())
    assert vera_fx.kl_divergence(clone).ndim == 0
    # the mean path as a weight update: eval output == linear with W + delta
    gm.eval()
    state = gm.vera_fx_adapters.default
    site = vera_fx.sites(gm)[0]
    delta = state.method.delta_weight(state, site)
    assert delta.shape == (6, 8) and delta.dtype == torch.float32
    lin = gm.lin
    with torch.no_grad():
        assert torch.allclose(gm(x_one()), nn.functional.linear(x_one(), lin.weight + delta, lin.bias), atol=1e-5)
    assert state.method.sampling_sites(state) == ()
    vera_fx.set_sample_at_inference(gm, True)
    assert state.method.sampling_sites(state) == ("lin",)


def test_compile_fullgraph_follows_switches():
    """torch.compile(fullgraph=True) traces the sampling nodes (the noise op is one opaque node), matches the
    eager graph call for call and recompiles, without breaking, when a switch flips."""
    gm, ref = one_site(generator_seed=SEED), one_site(generator_seed=SEED)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    x = x_one()
    gm.train(), ref.train()
    for _ in range(2):
        assert torch.allclose(compiled(x), ref(x), atol=1e-6)
    kl = vera_fx.kl_divergence(compiled)
    assert torch.allclose(kl, vera_fx.kl_divergence(ref))
    kl.backward()
    assert gm.vera_fx_adapters.default.sites.lin.pvera_lambda_d.grad.abs().sum() > 0
    gm.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), compiled(x))
        vera_fx.set_sample_at_inference(gm, True)
        vera_fx.set_sample_at_inference(ref, True)
        c1, c2 = compiled(x), compiled(x)
        assert torch.allclose(c1, ref(x), atol=1e-6) and torch.allclose(c2, ref(x), atol=1e-6)
        assert not torch.equal(c1, c2)
        mc = vera_fx.monte_carlo(compiled, x, n_samples=3)
    assert mc.shape == (3, 3, 5, 6)


# ------------------------------------------------------------------------------------------ intervals

def test_student_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 15, 31, 100, 1000):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.05):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9), (p, df)
    assert student_t_quantile(0.5, 3) == 0.0


def test_confidence_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    samples = torch.randn(16, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for level in (0.9, 0.95, 0.99):
        lo, hi = vera_fx.confidence_interval(samples, level=level)
        m = samples.mean(0).numpy()
        sem = stats.sem(samples.numpy(), axis=0)
        ref_lo, ref_hi = stats.t.interval(level, 15, loc=m, scale=sem)
        assert torch.allclose(lo, torch.from_numpy(ref_lo)) and torch.allclose(hi, torch.from_numpy(ref_hi))
    lo1, hi1 = vera_fx.confidence_interval(samples.transpose(0, 2), dim=-1)
    lo0, hi0 = vera_fx.confidence_interval(samples)
    assert torch.allclose(lo1, lo0.T) and torch.allclose(hi1, hi0.T)
    lo_i, hi_i = vera_fx.confidence_interval(torch.tensor([1, 2, 3, 4]))
    assert lo_i < 2.5 < hi_i


# --------------------------------------------------------------------------------------------- errors

def test_error_paths():
    gm = one_site()
    x = x_one()
    with pytest.raises(ValueError, match=r"unknown sites \['nope'\].*\['lin'\]"):
        vera_fx.set_sample_at_inference(gm, {"nope": True})
    with pytest.raises(ValueError, match="True or False"):
        vera_fx.set_sample_at_inference(gm, {"lin": 1})
    with pytest.raises(TypeError, match="True, False or a dict"):
        vera_fx.set_sample_at_inference(gm, "yes")
    with pytest.raises(ValueError, match="adapter_name='other' is not on this graph"):
        vera_fx.set_sample_at_inference(gm, True, adapter_name="other")
    with pytest.raises(ValueError, match="run a forward"):
        vera_fx.kl_divergence(gm)
    with pytest.raises(ValueError, match="generator_seed=None"):
        reseed(gm)
    with pytest.raises(ValueError, match="at least 2 samples"):
        vera_fx.confidence_interval(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="level=1.5"):
        vera_fx.confidence_interval(torch.zeros(4, 3), level=1.5)
    with pytest.raises(ValueError, match="dim=2"):
        vera_fx.confidence_interval(torch.zeros(4, 3), dim=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        vera_fx.confidence_interval([1.0, 2.0])
    with pytest.raises(ValueError, match="n_samples=0"):
        vera_fx.monte_carlo(gm, x, n_samples=0)
    with pytest.raises(ValueError, match="max_batch=2 is invalid"):
        vera_fx.monte_carlo(gm, x, max_batch=2)
    with pytest.raises(ValueError, match="batch size"):
        vera_fx.monte_carlo(gm, x, torch.zeros(4))
    with pytest.raises(ValueError, match="p=1.0"):
        student_t_quantile(1.0, 3)
    with pytest.raises(TypeError, match="GraphModule"):
        vera_fx.kl_divergence(nn.Linear(2, 2))
    assert gm.vera_fx_adapters.default.switches["sample_at_inference"] == {"lin": False}
    vera = vera_fx.transform(OneSite(), vera_fx.VeraConfig(r=4, target_modules=["lin"]),
                             example_inputs=(torch.randn(2, 4, 8),))
    with pytest.raises(ValueError, match="vera adapter"):
        vera_fx.set_sample_at_inference(vera, True)
    with pytest.raises(ValueError, match="no PVeRA adapter"):
        vera_fx.kl_divergence(vera)
    with pytest.raises(ValueError, match="no PVeRA adapter"):
        vera_fx.monte_carlo(vera, x)
    assert pvera_states(gm).keys() == {"default"}


@pytest.mark.parametrize("seeded", [False, True])
def test_eager_reparametrisation_equals_the_plain_ops(seeded):
    """An eager step's sampling node (mu, logvar the halves of one tensor) runs one autograd.Function: the same
    noise and output bit for bit as the plain ops, the same gradients, one gradient tensor for both halves."""
    h = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam_d = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def run(lam_d, halves):
        hd = h * lam_d
        mu, logvar = hd[..., :4], hd[..., 4:]
        if not halves:  # separate tensors: the plain ops
            mu, logvar = mu.clone(), logvar.clone()
        gen = torch.Generator().manual_seed(7).get_state() if seeded else None
        torch.manual_seed(3)
        return pvera_reparametrize(mu, logvar, True, False, gen, 1)

    fast, plain = run(lam_d, True), run(lam_d, False)
    assert type(fast.grad_fn).__name__ == "_ReparametrizeBackward" and type(plain.grad_fn).__name__ == "AddBackward0"
    assert torch.equal(fast, plain)
    loss = lambda z: (z ** 2).sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.grad(loss(fast), lam_d), torch.autograd.grad(loss(plain), lam_d))
    assert torch.autograd.gradcheck(lambda d: run(d, True), (lam_d,))
