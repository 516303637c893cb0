"""torch.compile of the model object itself: many objects, many signatures, signatures first seen inside a
compiled call, adapter switches between compiled calls. Each graph's own generated ``forward`` is the frame
dynamo compiles (one compile cache per graph), so none of this reaches dynamo's recompile limit (8 per code
object). The cheap ``eager`` backend checks dynamo's side; one small inductor test checks the compiled code."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import vera_fx
from conftest import text_inputs, tiny_llama


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: dynamo's caches and counters reset per test


def _mlp_object(seed: int, **kw) -> tuple[vera_fx.VeraFxModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 16)
    m = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["0", "2"]), (x,), **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lambda" in name:
                p.normal_()
    return m, x


def test_twelve_objects_compile_with_fullgraph():
    cnt = CompileCounterWithBackend("eager")
    for i in range(12):
        m, x = _mlp_object(i)
        out = torch.compile(m, fullgraph=True, backend=cnt)(x)
        torch.testing.assert_close(out, m(x), atol=0, rtol=0)
    assert cnt.frame_count == 12  # one compiled frame per object's graph, no recompile of a shared frame
    assert not counters["graph_break"]


def test_twelve_signatures_of_one_object_compile_each_first_seen_inside_the_compiled_call():
    m, _ = _mlp_object(0, max_graphs=16)
    cnt = CompileCounterWithBackend("eager")
    compiled = torch.compile(m, fullgraph=True, backend=cnt)
    for i in range(12):  # ranks 2..7, each with autocast off and on: 12 signatures never called eagerly before
        x = torch.randn(*([3] * (i % 6)), 5, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i >= 6):
            out = compiled(x)
            ref = m(x)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert m.num_graphs == 12 and cnt.frame_count == 12
    assert not counters["graph_break"]


def test_compiled_llama_trains_evaluates_and_follows_adapter_switches():
    model = tiny_llama()
    m = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = text_inputs(model)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    m.train()
    loss = compiled(**x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    ref = m(**x).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert len(grads) == 8
    for name, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    m.eval()
    no_labels = {k: v for k, v in x.items() if k != "labels"}  # a signature first seen under compile
    with torch.no_grad():
        before = compiled(**no_labels).logits
        torch.testing.assert_close(before, m(**no_labels).logits, atol=1e-6, rtol=1e-6)
        m.set_adapter("other")  # switched between compiled calls: the compiled call follows
        after = compiled(**no_labels).logits
        torch.testing.assert_close(after, m(**no_labels).logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(before, after)
    assert not counters["graph_break"]


@pytest.mark.slow  # tests/test_compile.py compiles the object with inductor in CI; this MLP case in long mode
def test_inductor_compiles_the_object_in_training():
    m, x = _mlp_object(1)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    ref = m(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_code_that_calls_the_object_compiles_around_it_and_fullgraph_says_what_to_compile():
    m, x = _mlp_object(2)
    f = torch.compile(lambda t: m(t).square().sum(), backend="eager")
    torch.testing.assert_close(f(x), m(x).square().sum())  # a graph break at the call; the graph compiles on
    g = torch.compile(lambda t: m(t).square().sum(), backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"compile the object itself \(torch.compile\(m\)\)"):
        g(x)
