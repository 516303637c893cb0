"""Block-structured capture: layers as GraphModule submodules, one export per distinct block; activation
checkpointing and regional compile per block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.fx import GraphModule

import vera_fx
from conftest import text_inputs, tiny_gpt2, tiny_llama
from vera_fx.blockwise import (compile_blocks, gradient_checkpointing_disable, gradient_checkpointing_enable,
                               is_gradient_checkpointing)
from vera_fx.passes.pipeline import add_adapter_passes, run_passes
from vera_fx.sites import BLOCK_KEY, block_groups, graph_modules


def _randomise(gm):
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lambda" in n:
                p.normal_(0, 0.5)


def test_layers_are_blocks_bound_to_their_own_weights():
    m = tiny_llama(num_hidden_layers=3)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])).graph_module
    blocks = graph_modules(gm)[1:]
    assert [b.meta[BLOCK_KEY]["path"] for b in blocks] == [f"model.layers.{i}" for i in range(3)]
    assert len(block_groups(gm)) == 1  # one distinct block: exported once, copied per layer
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("model.layers.")]
    assert [str(n.target) for n in calls] == [f"model.layers.{i}" for i in range(3)]
    for i, b in enumerate(blocks):
        assert isinstance(b, GraphModule) and gm.get_submodule(f"model.layers.{i}") is b
        w = b.get_parameter("self_attn.q_proj.weight")  # the layer's own storage, a graph-owned frozen Parameter
        assert w.data_ptr() == m.model.layers[i].self_attn.q_proj.weight.data_ptr() and not w.requires_grad
        assert w is not m.model.layers[i].self_attn.q_proj.weight
        # the layer's lambdas are reachable inside the block (FSDP2 shards them with the block)
        own = {n for n, p in b.named_parameters() if p.requires_grad}
        assert own == {f"vera_fx_adapters.default.sites.self_attn.{p}.vera_lambda_{x}" for p in ("q_proj", "v_proj")
                       for x in ("b", "d")}
    names = [s.name for s in vera_fx.sites(gm)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    # each lambda is registered once, under its block; the root state reaches it through the block
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable[0] == "model.layers.0.vera_fx_adapters.default.sites.self_attn.q_proj.vera_lambda_b"
    assert len(trainable) == 12 and all(".vera_fx_adapters.default.sites.self_attn." in n for n in trainable)
    state = gm.vera_fx_adapters.default
    assert gm.get_parameter("vera_fx_adapters.default.sites.model.layers.2.self_attn.v_proj.vera_lambda_d") is \
        gm.get_parameter("model.layers.2.vera_fx_adapters.default.sites.self_attn.v_proj.vera_lambda_d")
    assert list(state.parameters()) == [] and len(state.lambda_parameters()) == 12
    # PEFT naming (adapter_state_dict) is unchanged
    assert sorted(vera_fx.adapter_state_dict(gm)) == sorted(["base_model.vera_A", "base_model.vera_B"] + [
        f"base_model.model.model.layers.{i}.self_attn.{p}.vera_lambda_{x}" for i in range(3)
        for p in ("q_proj", "v_proj") for x in ("b", "d")])
    _randomise(gm)
    kw = text_inputs(m)
    gm.eval()
    flat = run_passes(vera_fx.capture(m, blocks=False),
                      add_adapter_passes(vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), "default"))
    assert len(graph_modules(flat)) == 1
    vera_fx.load_adapter_state_dict(flat, vera_fx.adapter_state_dict(gm))
    flat.eval()
    torch.testing.assert_close(gm(**kw).logits, flat(**kw).logits, atol=1e-5, rtol=1e-5)


def test_each_block_follows_its_own_mode():
    m = tiny_gpt2(embd_pdrop=0.0, resid_pdrop=0.2, attn_pdrop=0.2)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)).graph_module
    kw = text_inputs(m)
    gm.eval()
    assert not any(b.training for b in graph_modules(gm))  # .eval() on the root reaches every block
    ref = gm(**kw).logits
    gm.train()
    assert all(b.training for b in graph_modules(gm))
    assert not torch.allclose(gm(**kw).logits, ref)  # dropout in the blocks is live
    for b in graph_modules(gm)[1:]:
        b.eval()  # the top graph stays in training mode; each block reads its own flag
    torch.testing.assert_close(gm(**kw).logits, ref)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](self.layers[0](x)))  # layer 0 called twice: not a block


def test_layers_that_cannot_be_blocks():
    net = _Shared()
    x = torch.randn(2, 3, 8)
    gm = vera_fx.capture(net, (x,))  # a plain nn.Module: one graph, as before
    assert len(graph_modules(gm)) == 1
    with pytest.raises(vera_fx.CaptureError, match="called 2 times"):
        vera_fx.capture(net, (x,), blocks=True)
    with pytest.raises(TypeError, match="blocks must be"):
        vera_fx.capture(net, (x,), blocks="yes")


def test_gradient_checkpointing_per_block():
    m = tiny_llama(num_hidden_layers=4)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules="all-linear", init_weights=False)).graph_module
    kw = text_inputs(m, batch=2, length=16)

    def step():
        gm.zero_grad()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = gm(**kw).loss
        loss.backward()
        saved = sum(sizes)
        return saved, {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}

    def calls():
        return [(n.op, str(n.target)) for n in gm.graph.nodes]

    before = calls()
    plain, grads = step()
    assert gradient_checkpointing_enable(gm) is gm and is_gradient_checkpointing(gm)
    ckpt, ckpt_grads = step()
    assert ckpt < 0.4 * plain  # block inputs plus the top graph's activations, not every block's
    for k, g in grads.items():
        torch.testing.assert_close(ckpt_grads[k], g, atol=1e-6, rtol=1e-5)
    gradient_checkpointing_disable(gm)
    assert not is_gradient_checkpointing(gm) and calls() == before
    flat = vera_fx.capture(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match="no blocks"):
        gradient_checkpointing_enable(flat)


def test_regional_compile_once_per_block_signature():
    m = tiny_llama(num_hidden_layers=3)
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules="all-linear", init_weights=False)).graph_module
    kw = text_inputs(m)
    gm.eval()
    with torch.no_grad():
        ref = gm(**kw).logits
    cnt = CompileCounter()
    torch._dynamo.reset()
    compile_blocks(gm, backend=cnt)
    with torch.no_grad():
        out = gm(**kw).logits
    assert cnt.frame_count == 1  # three layers, one compilation
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="no blocks"):
        compile_blocks(vera_fx.capture(nn.Linear(4, 4), (torch.randn(2, 4),)))


def test_regional_compile_then_merge_unmerge_and_merge_and_unload():
    """Merging rewrites (or copies) the blocks whose class compile_blocks shared: each gets a class of its own and
    no class keeps GraphModule's generated __call__ (a subclass inheriting it recursed without end). Training
    mode with autograd on: the graph itself runs (eval / no_grad calls run an inference copy)."""
    import copy

    m = tiny_llama(num_hidden_layers=3)
    ours = vera_fx.transform(m, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False))
    kw = text_inputs(m)
    plain = copy.deepcopy(ours)
    logits = lambda model: model(**kw).logits.detach()  # noqa: E731
    ref = logits(ours)
    cnt = CompileCounter()
    torch._dynamo.reset()
    compile_blocks(ours, backend=cnt)
    torch.testing.assert_close(logits(ours), ref, atol=0, rtol=0)
    before = cnt.frame_count  # layer 0 (its input needs no grad) and the others
    assert before > 0
    vera_fx.merge(ours)
    vera_fx.merge(plain)
    merged = logits(plain)
    assert (merged - ref).abs().max() < 1e-5
    torch.testing.assert_close(logits(ours), merged, atol=0, rtol=0)
    compile_blocks(ours, backend=cnt)  # the merged blocks are rewritten: compile them again
    torch.testing.assert_close(logits(ours), merged, atol=0, rtol=0)
    assert cnt.frame_count > before
    vera_fx.unmerge(ours)
    torch.testing.assert_close(logits(ours), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(copy.deepcopy(ours)), ref, atol=1e-6, rtol=0)  # copies subclass the blocks
    torch.testing.assert_close(logits(ours.merge_and_unload()), merged, atol=1e-6, rtol=0)
    gm = plain.graph_module  # the bare graph: merge rewrites its blocks in place (each unshared on recompile)
    vera_fx.unmerge(gm)
    compile_blocks(gm, backend=cnt)
    vera_fx.merge(gm)
    torch.testing.assert_close(logits(gm), merged, atol=1e-6, rtol=0)


def test_modules_to_save_inside_blocks_match_peft(tmp_path):
    """A modules_to_save entry naming a module inside the layers (each layer's input norm) trains a copy per
    layer, read by that layer's block; outputs, gradients and the PEFT checkpoint match peft."""
    import peft

    m = tiny_llama(num_hidden_layers=2)
    kw = text_inputs(m)
    cfg = dict(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"])
    gm = vera_fx.transform(m, vera_fx.VeraConfig(**cfg))
    assert len(graph_modules(gm.graph_module)) == 3
    state = gm.graph_module.vera_fx_adapters.default
    assert state.modules_to_save_paths == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path / "a"
    vera_fx.save_adapter(gm, folder)
    ref = peft.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=2), folder, is_trainable=True)
    gm.train(), ref.train()
    ours, theirs = gm(**kw), ref(**kw)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad and "input_layernorm" in n}
    assert len(want) == 2
    got = state.modules_to_save
    for i in range(2):
        w = want[f"base_model.model.model.layers.{i}.input_layernorm.modules_to_save.default.weight"]
        torch.testing.assert_close(got[f"model__layers__{i}__input_layernorm"].weight.grad, w, atol=1e-5, rtol=0)
    # the base norms stay frozen and unchanged; disabling reads them again
    with vera_fx.disable_adapters(gm), torch.no_grad():
        torch.testing.assert_close(gm(**kw).logits, m(**kw).logits, atol=1e-5, rtol=0)
    vera_fx.merge(gm)  # a merged graph keeps reading the copies
    with torch.no_grad():
        torch.testing.assert_close(gm(**kw).logits, theirs.logits.detach(), atol=1e-4, rtol=0)


def test_pvera_blocks_share_code_and_record_their_kl():
    """PVeRA blocks run the same code (the KL record key is block-relative, each block writes its own record),
    so regional compile compiles a signature once; kl_divergence equals the one-graph capture's."""
    m = tiny_llama(num_hidden_layers=3)
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    gm = vera_fx.transform(m, vera_fx.PveraConfig(**cfg)).graph_module
    flat = run_passes(vera_fx.capture(m, blocks=False), add_adapter_passes(vera_fx.PveraConfig(**cfg), "default"))
    vera_fx.load_adapter_state_dict(flat, vera_fx.adapter_state_dict(gm))
    blocks = graph_modules(gm)[1:]
    assert len({b.code for b in blocks}) == 1
    kw = text_inputs(m)
    gm.eval(), flat.eval()  # the mean path: the KL term is deterministic (training samples every layer's input)
    gm(**kw)
    flat(**kw)
    want = vera_fx.kl_divergence(flat)
    torch.testing.assert_close(vera_fx.kl_divergence(gm), want, atol=1e-6, rtol=1e-6)
    cnt = CompileCounter()
    torch._dynamo.reset()
    compile_blocks(gm, backend=cnt)
    gm(**kw)  # the compiled blocks record the terms too
    torch.testing.assert_close(vera_fx.kl_divergence(gm), want, atol=1e-6, rtol=1e-6)
    assert cnt.frame_count == 2  # three layers: layer 0 (its input needs no grad) and the two others
    gm.train()
    gm(**kw)
    kl = vera_fx.kl_divergence(gm)
    assert cnt.frame_count == 4  # the same two in training mode (one per block would be 6)
    kl.backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if "lambda_d" in n)


def test_output_hidden_states_keep_the_blocks():
    """transformers records hidden states with hooks on the layers: the stand-ins carry those hooks, so the
    graph of an output_hidden_states call keeps its blocks and returns every layer's output; attention weights
    (hooks inside the layers) fall back to one graph."""
    m = tiny_llama(num_hidden_layers=2).eval()
    ours = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    ours.eval()
    ids = text_inputs(m, labels=False)["input_ids"]
    with torch.no_grad():
        out = ours(input_ids=ids, output_hidden_states=True)
        with vera_fx.disable_adapters(ours):
            base = ours(input_ids=ids, output_hidden_states=True)
        ref = m(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(base.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out.hidden_states[2], ref.hidden_states[2])  # the adapters act inside the blocks
    graphs = [g for gs in ours.graphs.values() for g in (gs if isinstance(gs, list) else [gs])]
    assert all(len(graph_modules(g)) == 3 for g in graphs)
    with torch.no_grad():
        att = ours(input_ids=ids, output_attentions=True)
        ref_att = m(input_ids=ids, output_attentions=True)
    assert len(att.attentions) == len(ref_att.attentions)  # () under sdpa, as the eager model gives
    torch.testing.assert_close(att.logits, out.logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------ layers returning several tensors (block_call_n)

def _peft_pair(model, targets, **transform_kw):
    from conftest import peft_pair

    gm, pm = peft_pair(model, dict(target_modules=targets), r=4, **transform_kw)
    return gm.eval(), pm.eval()


def test_t5_layers_returning_tuples_are_blocks_and_match_peft():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                                num_heads=4, decoder_start_token_id=0, pad_token_id=0)).eval()
    gm, pm = _peft_pair(model, ["q", "v", "wo"])
    blocks = graph_modules(gm)[1:]
    assert [b.meta[BLOCK_KEY]["path"] for b in blocks] == [f"{s}.block.{i}" for s in ("encoder", "decoder")
                                                           for i in range(3)]
    assert len(block_groups(gm)) == 4  # per stack: the layer with the relative bias, and the others (once)
    for batch, length, dec in ((3, 7, 5), (2, 4, 9)):  # other shapes than the capture example
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(2, 96, (batch, length), generator=g)
        labels = torch.randint(2, 96, (batch, dec), generator=g)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=labels, labels=labels)
        ours, theirs = gm(**kw), pm(**kw)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    # a block's lambdas live in its own view: <block path>.vera_fx_adapters.default.sites.<path in the block>
    grads = {n.replace(".vera_fx_adapters.default.sites", ""): p.grad for n, p in gm.named_parameters()
             if "lambda_b" in n}
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in pm.named_parameters()
              if "vera_lambda_b" in n}
    assert grads.keys() == theirs.keys() and len(grads) == 24  # q, v, wo (and cross q, v in the decoder)
    for n, g in grads.items():
        torch.testing.assert_close(g, theirs[n], atol=1e-5, rtol=0)


def test_multi_output_records_and_placeholder():
    from vera_fx.blocks import LayerCall, block_call_n, check_records, single_output

    x = torch.randn(2, 3)
    pair = LayerCall((x,), {}, out_leaves=[x.clone(), torch.zeros(4)], calls=1)
    assert single_output(pair) is None  # two tensors: a block_call_n node stands for the call
    assert single_output(LayerCall((x,), {}, out_leaves=[x.clone(), None], calls=1)) is not None
    check_records(["a"], {"a": pair})
    with pytest.raises(vera_fx.blocks.BlockCaptureError, match="layer 'a' returns no tensor"):
        check_records(["a"], {"a": LayerCall((x,), {}, out_leaves=[None, 3], calls=1)})
    with pytest.raises(RuntimeError, match="capture-time placeholder"):
        block_call_n([x], 0, [2, 3], [2], [0])
