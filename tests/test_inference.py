"""Inference as its own variant (vera_fx/variants.py, vera_fx/passes/infer.py, the ops in vera_fx/methods/lean.py): the
graph an eval / no-grad call runs, its forms against PEFT, the per-call probe, and the LRU bound on graphs."""

from __future__ import annotations

import warnings

import pytest
import torch

import vera_fx
import vera_fx.state
from conftest import peft_pair, tiny_llama
from vera_fx.methods.lean import group_products, site_add, site_apply
from vera_fx.passes.infer import INFERENCE_KEY, inference_costs, inference_plan, lower_for_inference
from vera_fx.sites import ADAPTER_KEY, graph_modules
from vera_fx.variants import check_form, inference_twin, is_sharded

peft = pytest.importorskip("peft")

ALL = dict(target_modules="all-linear")
QV = dict(target_modules=["q_proj", "v_proj"])


def _ids(batch=3, length=7, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _paths(gm):
    """The lowering path of every adapter output node of ``gm``'s tree."""
    return {(n.meta[ADAPTER_KEY] or {}).get("path") for g in graph_modules(gm) for n in g.graph.nodes
            if (n.meta.get(ADAPTER_KEY) or {}).get("name") == "add"}


def _twin(ours):
    """The inference twin the last inference call ran (the graph's twin for the current adapter structure)."""
    twins = [next(reversed(built.values())) for built in ours._twins.values() if built != "as is"]
    assert len(twins) == 1, len(twins)
    return twins[0]


def _targets(gm):
    return {getattr(n.target, "__name__", str(n.target)) for g in graph_modules(gm) for n in g.graph.nodes}


@pytest.mark.parametrize("kw,lowering", [(ALL, "auto"), (ALL, "fast"), (ALL, "lean"), (ALL, "activation"),
                                         (QV, "weight"), (QV, "fused")])
def test_every_inference_form_equals_peft(kw, lowering):
    """Whatever training plan the graph has, eval and no-grad calls run the inference twin; batched and per-site
    forms, one token and many, equal PEFT's outputs."""
    ours, pm = peft_pair(tiny_llama(), kw, r=128, lowering=lowering)  # out x r of gate / up's B: over a call
    pm.eval()
    for form in ("batched", "site"):
        ours.inference_form = form
        ours.eval()
        for ids in (_ids(), _ids(2, 1), _ids(1, 9)):
            with torch.no_grad():
                _close(ours(input_ids=ids).logits, pm(input_ids=ids).logits)
        twin = _twin(ours)
        assert twin.meta[INFERENCE_KEY] == form and _paths(twin) == {"inference"}
        # gate / up share one B slice (q and v differ in width here: 2 key-value heads)
        products = [n for g in graph_modules(twin) for n in g.graph.nodes if n.target is group_products]
        assert bool(products) == (kw is ALL)  # a lone site (q and v here) takes one site_apply
        stacked = {n.kwargs["stacked"] for n in products}  # batched: where the cost model finds it cheaper
        assert not products or stacked == ({False} if form == "site" else {True, False})
    assert _paths(ours.graph_module) != {"inference"}  # the training graph is untouched


def test_eval_variant_selection():
    """Training calls run the training plan; eval, no_grad and inference_mode run the twin; a backward through
    an eval call with gradients works and matches the training graph's gradient."""
    ours, pm = peft_pair(tiny_llama(), ALL, r=8, lowering="lean")
    ids = _ids()
    ours.train()
    ref = ours(input_ids=ids).logits
    assert not ours._twins
    with torch.no_grad():
        _close(ours(input_ids=ids).logits, ref)
    twin = _twin(ours)
    with torch.inference_mode():
        _close(ours(input_ids=ids).logits, ref)
    assert _twin(ours) is twin  # built once
    ours.eval()
    pm.eval()
    out = ours(input_ids=ids).logits  # eval with gradients: the twin, differentiable
    _close(out, pm(input_ids=ids).logits)
    lam = next(p for n, p in ours.named_parameters() if n.endswith("q_proj.vera_lambda_b"))
    (g_eval,) = torch.autograd.grad(out.sum(), lam)
    ours.train()
    (g_train,) = torch.autograd.grad(ours(input_ids=ids).logits.sum(), lam)
    _close(g_eval, g_train, 1e-4)


def test_switches_reach_the_twin():
    """set_adapter / disable / merge rebuild the twin as any graph; a .to() drops it."""
    ours, pm = peft_pair(tiny_llama(), QV, r=8)
    ours.eval()
    pm.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        with ours.disable_adapter():
            _close(ours(input_ids=ids).logits, ours.base_model(input_ids=ids).logits)
        _close(ours(input_ids=ids).logits, adapted)
        vera_fx.merge(ours)
        _close(ours(input_ids=ids).logits, adapted)
        vera_fx.unmerge(ours)
        _close(ours(input_ids=ids).logits, pm(input_ids=ids).logits)
    ours.to(torch.float32)
    assert not ours._twins


def test_pvera_mean_and_sampling_in_the_twin():
    """PVeRA in eval runs the twin: the mean equals PEFT's, and sample_at_inference still samples there."""
    kw = dict(r=8, target_modules="all-linear")
    pm = peft.get_peft_model(tiny_llama(), peft.PveraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lambda" in n:
                p.normal_(0, 0.5)
    ours = vera_fx.transform(tiny_llama(), vera_fx.PveraConfig(**kw, generator_seed=3))
    vera_fx.load_adapter_state_dict(ours, peft.get_peft_model_state_dict(pm))
    ours.eval()
    pm.eval()
    ids = _ids()
    with torch.no_grad():
        mean = ours(input_ids=ids).logits
        _close(mean, pm(input_ids=ids).logits)
        assert {"site_apply", "pvera_group_h", "pvera_latent"} <= _targets(_twin(ours))
        vera_fx.set_sample_at_inference(ours, True)
        assert not torch.allclose(ours(input_ids=ids).logits, mean)
        vera_fx.set_sample_at_inference(ours, {"model.layers.0.self_attn.q_proj": False})
        assert not torch.allclose(ours(input_ids=ids).logits, mean)  # a group where one site samples
        vera_fx.set_sample_at_inference(ours, False)
        _close(ours(input_ids=ids).logits, mean)


def test_pvera_mean_only_form_records_the_kl_term():
    """The mean-only form computes r rows of h, and records the KL term from x (computed when read): it equals
    the term of the full path (sampling at inference, and the training graph, which is differentiable). One
    layer, q / k / v: every site reads the layer's input, so sampling changes no site's input."""
    kw = dict(r=8, target_modules=["q_proj", "k_proj", "v_proj"], init_weights=False)
    ours = vera_fx.transform(tiny_llama(num_hidden_layers=1), vera_fx.PveraConfig(**kw))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lambda" in n:
                p.normal_(0, 0.5)
    ids = _ids()
    ours.eval()
    with torch.no_grad():
        ours(input_ids=ids)
        kl_mean = vera_fx.kl_divergence(ours)
        vera_fx.set_sample_at_inference(ours, True)
        ours(input_ids=ids)
        _close(vera_fx.kl_divergence(ours), kl_mean)
    ours.train()
    ours(input_ids=ids)
    kl = vera_fx.kl_divergence(ours)
    _close(kl.detach(), kl_mean)
    kl.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lambda_d" in n)


def test_inference_ops_equal_the_plain_chain():
    torch.manual_seed(0)
    h, b = torch.randn(2, 3, 4), torch.randn(5, 4)
    lds, lbs = [torch.randn(4) for _ in range(3)], [torch.randn(5) for _ in range(3)]
    u = group_products(h, b, *lds)
    assert len(u) == 3 and all(t.shape == (2, 3, 5) for t in u)
    for one, other in zip(u, group_products(h, b, *lds, stacked=False)):
        _close(one, other)
    for k in range(3):
        y = torch.randn(2, 3, 5)
        plain = y + torch.nn.functional.linear(h * lds[k], b) * lbs[k]
        _close(site_add(y.clone(), u, k, lbs[k], True), plain)
        _close(site_apply(y.clone(), h, b, lds[k], lbs[k], True), plain)
        _close(site_apply(y, h, b, lds[k], lbs[k], False), plain)
    z, y = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    _close(site_apply(y, z, b, None, lbs[0], False), y + (z @ b.T) * lbs[0])
    y16 = torch.randn(2, 3, 5, dtype=torch.bfloat16)  # dtypes differ: out of place, the plain chain's promotion
    out = site_add(y16, u, 0, lbs[0], True)
    assert out.dtype == torch.float32 and y16.dtype == torch.bfloat16


def test_cost_model_batches_groups_only():
    assert inference_plan(1, 256, 1024, 3) == "batched"
    assert inference_plan(512, 256, 1024, 2) == "batched"
    assert inference_plan(1, 8, 48, 2) == "adjacent"  # B smaller than a call: the stacked product's calls cost more
    assert inference_plan(1, 8, 48, 3) == "batched"
    assert inference_plan(1, 256, 1024, 1) == "site"
    assert inference_plan(1, 256, 1024, 3, form="site") == "adjacent"
    costs = inference_costs(1, 256, 1024, 3)
    assert costs["batched"] < costs["site"]


def test_bad_forms_are_refused():
    with pytest.raises(ValueError, match=r"inference_form='fast'.*batched"):
        check_form("fast")
    ours, _ = peft_pair(tiny_llama(), QV, r=4)
    with pytest.raises(ValueError, match="inference_form="):
        ours.inference_form = "plain"
    with pytest.raises(ValueError, match="inference form 'x'"):
        lower_for_inference(ours.graph_module, [], "x")
    twin = inference_twin(ours.graph_module, "site")
    assert twin.meta[INFERENCE_KEY] == "site"
    assert twin.get_parameter("model.layers.0.self_attn.q_proj.weight") is \
        ours.graph_module.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert twin.model.layers[0] is not ours.graph_module.model.layers[0]


def test_probe_reads_a_cached_parameter():
    ours, _ = peft_pair(tiny_llama(), QV, r=4)
    assert ours.dtype == torch.float32
    assert ours._probe_at is not None
    ours.to(torch.float64)  # re-read after a conversion
    assert ours.dtype == torch.float64 and ours._probe_at[0][ours._probe_at[1]].dtype == torch.float64


KEYWORD_SETS = [dict(), dict(output_hidden_states=True), dict(output_attentions=True), dict(return_dict=False),
                dict(labels=True), dict(labels=True, output_hidden_states=True), dict(position_ids=True),
                dict(position_ids=True, output_hidden_states=True), dict(mask_float=True),
                dict(mask_float=True, labels=True), dict(token_type=None, return_dict=True, output_attentions=False),
                dict(labels=True, return_dict=False), dict(position_ids=True, labels=True),
                dict(output_hidden_states=True, return_dict=False)]


def _call(m, ids, spec, peft_side=False):
    kw = {}
    for k, v in spec.items():
        if k == "labels":
            kw["labels"] = ids
        elif k == "position_ids":
            kw["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
        elif k == "mask_float":
            kw["attention_mask"] = torch.ones(ids.shape, dtype=torch.float32)
        elif k != "token_type":
            kw[k] = v
    if peft_side:
        kw["use_cache"] = False
    out = m(input_ids=ids, **kw)
    return out[0] if isinstance(out, tuple) else out.logits


def test_past_max_graphs_the_least_recently_used_graph_is_evicted():
    """14 keyword sets, then the same in another order: every call equals PEFT's; one warning."""
    ours, pm = peft_pair(tiny_llama(), QV, r=4, max_graphs=8)
    ours.eval()
    pm.eval()
    ids = _ids()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            for spec in KEYWORD_SETS + KEYWORD_SETS[::-3] + KEYWORD_SETS[1::2]:
                _close(_call(ours, ids, spec), _call(pm, ids, spec, peft_side=True))
                assert ours.num_graphs <= 8
    evictions = [w for w in seen if "max_graphs=8" in str(w.message)]
    assert len(evictions) == 1 and "least recently used" in str(evictions[0].message)
    assert any(g is ours.graph_module for g in ours.graphs.values())  # the source stays
    ours.max_graphs = 1  # only the source may stay: a new graph is kept beside it, calls keep working
    new = dict(labels=True, output_attentions=True)
    with torch.no_grad():
        _close(_call(ours, ids, new), _call(pm, ids, new, peft_side=True))
    assert ours.num_graphs == 2


def test_least_recently_used_order():
    ours, _ = peft_pair(tiny_llama(), QV, r=4, max_graphs=3)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours(input_ids=ids, output_hidden_states=True)  # [source, hidden]
        ours(input_ids=ids, output_attentions=True)  # [source, hidden, attentions]
        ours(input_ids=ids, output_hidden_states=True)  # hidden used last: attentions is the oldest but the source
        ours(input_ids=ids, return_dict=False)  # evicts attentions
    keys = [str(k) for k in ours.graphs]
    assert not any("output_attentions" in k for k in keys) and any("output_hidden_states" in k for k in keys)
    assert ours.num_graphs == 3 and ours.graph_module in ours.graphs.values()


def test_a_sharded_model_runs_inference_on_its_own_graph(one_process_group):
    """Under FSDP2 an eval call runs the sharded graph itself (its hooks gather the parameters; a copy would
    have none) and equals PEFT."""
    from torch.distributed.fsdp import fully_shard

    ids = _ids()
    ours, pm = peft_pair(tiny_llama(), QV, r=4, example_inputs={"input_ids": ids})  # sharded: this signature
    for layer in ours.model.layers:
        fully_shard(layer)
    fully_shard(ours)
    assert is_sharded(ours.graph_module)
    ours.eval()
    pm.eval()
    with torch.no_grad():
        _close(ours(input_ids=ids).logits, pm(input_ids=ids).logits)
    assert all(built == "as is" for built in ours._twins.values()) and not is_sharded(pm)


def test_a_model_left_in_eval_trains_its_adapters_on_the_training_graph():
    """PEFT's recipe: the model stays in eval mode (from_pretrained) and its adapters train: with gradients
    that is a training call (no twin); under no_grad the twin, with the adapters' own flag."""
    ours, _ = peft_pair(tiny_llama(), QV, r=4)
    assert not ours.training and vera_fx.state.adapters_training(ours)
    ours(input_ids=_ids()).logits.sum().backward()
    assert not ours._twins
    with torch.no_grad():
        ours(input_ids=_ids())
    assert vera_fx.state.adapters_training(_twin(ours))
