"""torch.compile(fullgraph=True) on adapted and merged graphs: eager parity, no graph breaks.

Each inductor compile costs seconds to tens of seconds on a CPU, so the file compiles four times with inductor:
the adapted graph in training and in eval mode, and the merged graph at a first and at a second (dynamic)
shape; adapter switches are checked with the cheap aot_eager backend.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import vera_fx
from conftest import all_nodes, text_inputs, tiny_llama


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: dynamo's caches and counters reset per test


def _adapted():
    model = tiny_llama()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, gm


def _lambda_grads(gm):
    return {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


def test_adapted_graph_trains_and_evaluates_compiled():
    model, gm = _adapted()
    x = text_inputs(model)
    gm.train()
    eager_loss = gm(**x).loss
    eager_loss.backward()
    eager_grads = _lambda_grads(gm)
    gm.zero_grad(set_to_none=True)

    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    loss = compiled(**x).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    grads = _lambda_grads(gm)
    assert set(grads) == set(eager_grads) and len(grads) == 12
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    gm.eval()  # a mode switch recompiles once and never graph-breaks
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, gm(**x).logits, atol=1e-5, rtol=1e-5)
    gm.train()
    compiled(**x).loss.backward()  # both modes are cached now
    assert cnt.frame_count == 2
    assert not counters["graph_break"]


def test_merged_graph_compiles_across_shapes():
    model, gm = _adapted()
    # capture inlined the rotary embedding's set_grad_enabled region (run_decompositions): nothing left to break on
    assert not [n for n in all_nodes(gm) if "wrap_with_set_grad_enabled" in str(n.target)]
    gm.eval()
    shapes = [(3, 7), (4, 5), (2, 11)]
    inputs = [text_inputs(model, batch=b, length=t, seed=i) for i, (b, t) in enumerate(shapes)]
    with torch.no_grad():
        adapted = [gm(**x).logits for x in inputs]
    vera_fx.merge(gm)
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    with torch.no_grad():
        for x, ref in zip(inputs, adapted):
            torch.testing.assert_close(compiled(**x).logits, ref, atol=1e-5, rtol=1e-5)
    assert cnt.frame_count == 2  # the first shape, then one dynamic graph for every other shape
    assert not counters["graph_break"]


def test_switching_adapters_and_merging_recompiles_without_breaks():
    """Cheap (aot_eager, a small MLP): every graph rewrite is a new plain graph for dynamo, never a break."""
    from torch import nn

    from vera_fx.adapters import add_adapter, set_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 16)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["0", "2"]), (x,))
    add_adapter(gm, "other", vera_fx.VeraConfig(r=4, target_modules=["2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    gm.eval()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    outs = []
    for switch in (lambda: None, lambda: set_adapter(gm, "other"), lambda: set_adapter(gm, ["default", "other"]),
                   lambda: vera_fx.merge(gm)):
        switch()
        with torch.no_grad():
            out = compiled(x)
            torch.testing.assert_close(out, gm(x), atol=1e-6, rtol=1e-6)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(outs[3], outs[2], atol=1e-5, rtol=1e-5)
    assert cnt.frame_count == 4 and not counters["graph_break"]
