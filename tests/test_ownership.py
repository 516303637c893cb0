"""Each tensor is registered once in the module tree: a block's lambdas under the block (its adapter view), the
root-level sites' under the root state, which reaches the block ones through links (vera_fx/methods/base.py,
``SiteTree``). This is what lets ``fully_shard(layer)`` then ``fully_shard(m)`` work and what an optimizer sees."""

from __future__ import annotations

import copy

import torch

import vera_fx
from conftest import text_inputs, tiny_llama
from vera_fx.methods import SiteTree
from vera_fx.sites import graph_modules

QV = ["q_proj", "v_proj"]


def _duplicates(module: torch.nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = {}
    for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    return [v for v in names.values() if len(v) > 1]


def _model():
    """VeRA on q/v and the head (a root-level site) with a modules_to_save copy, PVeRA (seeded noise buffers)."""
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=[*QV, "lm_head"],
                                                           modules_to_save=["model.norm"], init_weights=False))
    vera_fx.add_adapter(m, "p", vera_fx.PveraConfig(r=4, target_modules=["q_proj"], generator_seed=3))
    return m


def test_every_tensor_registered_once():
    m = _model()
    gm = m.graph_module
    assert _duplicates(gm) == [] and _duplicates(m) == []
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    # the head's lambdas at the root, a layer's under its block only
    assert "vera_fx_adapters.default.sites.lm_head.vera_lambda_b" in names
    assert "model.layers.1.vera_fx_adapters.default.sites.self_attn.v_proj.vera_lambda_d" in names
    assert not any(n.startswith("vera_fx_adapters.default.sites.model.layers.") for n in names)
    assert "model.layers.0.vera_fx_adapters.p.sites.self_attn.q_proj.pvera_lambda_b" in names
    buffers = [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    assert "model.layers.0.vera_fx_adapters.p.sites.self_attn.q_proj.pvera_generator_state" in buffers
    # the root state reaches every site through its links (get_attr paths of graphs without blocks)
    for adapter, site, param in (("default", "model.layers.1.self_attn.v_proj", "vera_lambda_d"),
                                 ("p", "model.layers.0.self_attn.q_proj", "pvera_lambda_b")):
        block, rel = site[:len("model.layers.1")], site[len("model.layers.1."):]
        assert gm.get_parameter(f"vera_fx_adapters.{adapter}.sites.{site}.{param}") is \
            gm.get_parameter(f"{block}.vera_fx_adapters.{adapter}.sites.{rel}.{param}")
    state = gm.vera_fx_adapters.default
    assert isinstance(state.sites, SiteTree)
    assert len(state.lambda_parameters()) == 2 * 5  # q, v in 2 layers, the head
    assert [n for n, _ in state.named_site_parameters()][:2] == [
        "model.layers.0.self_attn.q_proj.vera_lambda_b", "model.layers.0.self_attn.q_proj.vera_lambda_d"]
    assert {id(p) for p in state.sites.all_parameters()} == {id(p) for p in state.lambda_parameters()}
    # gm.state_dict() lists each tensor once; the PEFT mapping is unchanged
    sd = gm.state_dict()
    assert set(names) <= set(sd) <= set(names) | set(buffers)  # (non-persistent buffers left out)
    assert "base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d" in vera_fx.adapter_state_dict(gm)
    # the optimizer's list: every trainable tensor once
    trainable = [p for _, p in m.named_parameters(remove_duplicate=False) if p.requires_grad]
    assert len(trainable) == len({id(p) for p in trainable}) == 10 + 1  # the lambdas and model.norm's copy


def test_other_signatures_and_copies_keep_one_registration():
    m = _model()
    kw = text_inputs(m.base_model, labels=False)
    with torch.no_grad():
        m(**kw)  # the transform signature
        m(input_ids=kw["input_ids"])  # a second graph, attached to the source's state
        m(**kw, output_attentions=True)  # a graph without blocks: it reaches the lambdas through the root state
    assert m.num_graphs == 3
    for g in m.graphs.values():
        assert _duplicates(g) == []
    assert _duplicates(m.graph_module) == []
    flat = next(g for g in m.graphs.values() if len(graph_modules(g)) == 1)
    assert flat.get_parameter("vera_fx_adapters.default.sites.model.layers.0.self_attn.q_proj.vera_lambda_b") is \
        m.graph_module.get_parameter("model.layers.0.vera_fx_adapters.default.sites.self_attn.q_proj.vera_lambda_b")
    # training through another graph updates the source's tensors
    lam = m.graph_module.get_parameter("model.layers.1.vera_fx_adapters.default.sites.self_attn.v_proj.vera_lambda_b")
    m.train()
    m(input_ids=kw["input_ids"], labels=kw["input_ids"]).loss.backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    # a deep copy links to its own modules
    twin = copy.deepcopy(m.graph_module)
    assert _duplicates(twin) == []
    p = twin.get_parameter("vera_fx_adapters.default.sites.model.layers.0.self_attn.q_proj.vera_lambda_b")
    assert p is twin.get_parameter("model.layers.0.vera_fx_adapters.default.sites.self_attn.q_proj.vera_lambda_b")
    assert p is not m.graph_module.get_parameter(
        "model.layers.0.vera_fx_adapters.default.sites.self_attn.q_proj.vera_lambda_b")


def test_delete_and_add_again_keep_one_registration():
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=QV))
    vera_fx.add_adapter(m, "b", vera_fx.VeraConfig(r=4, target_modules=QV))
    vera_fx.delete_adapter(m, "b")
    vera_fx.add_adapter(m, "b", vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    assert _duplicates(m.graph_module) == []
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".vera_fx_adapters.default.sites.self_attn." in n for n in names)  # b is inactive
