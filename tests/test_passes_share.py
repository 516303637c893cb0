"""Share pass: x·Aᵀ computed once per input and adapter; dropout keeps sites apart."""

from __future__ import annotations

import torch

import vera_fx
from conftest import all_nodes, text_inputs, tiny_llama


def _projections(gm):
    return [n for n in all_nodes(gm) if (n.meta.get("vera_fx") or {}).get("name") == "xA"]


def test_sites_sharing_an_input_share_the_projection():
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules="all-linear"))
    # per layer: q/k/v read one tensor, o reads one, gate/up read one, down reads one
    assert len(_projections(gm)) == 4 * m.config.num_hidden_layers
    assert len(vera_fx.sites(gm)) == 7 * m.config.num_hidden_layers
    shared = [n for n in _projections(gm) if len(n.meta["vera_fx"].get("bases", [])) == 3]
    assert len(shared) == m.config.num_hidden_layers  # the q/k/v projection, once per layer


def test_dropout_keeps_projections_per_site():
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules="all-linear", vera_dropout=0.1))
    assert len(_projections(gm)) == 7 * m.config.num_hidden_layers


def test_removing_one_sharing_site_keeps_the_others():
    from vera_fx.passes.inject import remove_adapter_nodes

    m = tiny_llama()
    # A pass-level function: it takes the graph that holds the adapter state.
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"])).graph_module
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lambda" in n:
                p.normal_()
    kw = text_inputs(m)
    ref = gm(**kw).logits
    remove_adapter_nodes(gm, "default", {"model.layers.0.self_attn.q_proj"})
    with_nodes = [s.name for s in vera_fx.read_sites(gm) if s.adapters]
    assert with_nodes[:2] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert not torch.allclose(gm(**kw).logits, ref)
    remove_adapter_nodes(gm, "default")
    base = vera_fx.capture(m)
    assert [(n.op, str(n.target)) for n in all_nodes(gm)] == [(n.op, str(n.target)) for n in all_nodes(base)]
    torch.testing.assert_close(gm(**kw).logits, m(**kw).logits)
