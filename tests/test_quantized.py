"""Quantized bases: VeRA / PVeRA on bitsandbytes 8-bit and 4-bit linears (vera_fx/quantized.py).

A tiny Llama (hidden 64, MLP 128: multiples of bnb's 4-bit blocksize) is saved once and loaded through
transformers' BitsAndBytesConfig on the CPU; a second model has its linears replaced by hand. PEFT, on the
same quantized layers, is the reference.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import vera_fx
from vera_fx import quantized
from vera_fx.adapters import add_adapter, set_adapter
from vera_fx.methods import CONTAINER
from vera_fx.passes import merge as merge_module
from vera_fx.versions import adapter_flags

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'vera_fx[quant]')")
peft = pytest.importorskip("peft")

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
KINDS = ["int8", "nf4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapted(checkpoint):
    """(quantized model, graph) per (kind, method), built once: capture dominates the file's run time.
    Tests may wrap the model with PEFT or train the graph's lambdas, but never change quantized weights."""
    cache: dict = {}

    def get(kind: str, method: str):
        if (kind, method) not in cache:
            cfg, _ = configs(method, "all-linear")
            model = load_quantized(checkpoint, kind)
            cache[kind, method] = model, vera_fx.transform(model, cfg)
        return cache[kind, method]

    return get


def load_quantized(path, kind: str) -> nn.Module:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    qc = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32))
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu").eval()
    _no_cpu_packing(model)
    return model


def _no_cpu_packing(model: nn.Module) -> None:
    """bnb packs 4-bit weights for its CPU inference kernel on an eval forward (scales rounded to bfloat16);
    vera_fx's graph never does, so the eager reference must not either for outputs to be comparable."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def inputs(batch: int = 3, length: int = 5, seed: int = 1) -> dict:
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def quantized_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every quantized weight and of its 4-bit scales, to check they stay bitwise unchanged."""
    out = {}
    for name, p in model.named_parameters():
        if quantized.is_quantized_parameter(p):
            out[name] = p.data.clone()
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                out[name + ".absmax"] = qs.absmax.clone()
    return out


def configs(method: str, targets):
    """(vera_fx config, peft config) with the same fields."""
    if method == "pvera":
        return (vera_fx.PveraConfig(r=8, target_modules=targets),
                peft.PveraConfig(r=8, target_modules=targets))
    return vera_fx.VeraConfig(r=8, target_modules=targets), peft.VeraConfig(r=8, target_modules=targets)


@pytest.mark.parametrize("method", ["vera", "pvera"])
@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_peft_on_quantized_model(adapted, kind, method):
    _, peft_cfg = configs(method, "all-linear")
    model, gm = adapted(kind, method)
    gm.zero_grad()
    sites = vera_fx.sites(gm)
    assert len(sites) == 14 and {s.kind for s in sites} == {kind}  # 7 linears x 2 layers, not lm_head
    assert "lm_head" not in {s.name for s in sites}

    pm = peft.get_peft_model(model, peft_cfg)  # wraps the same bnb layers
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lambda" in name:
                p.normal_()
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    # the adapter computes in float32 (the lambdas' dtype), not in the int8 / uint8 storage dtype
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}

    # PVeRA samples in training mode: compare it in eval mode only (its mean path)
    modes = ("eval", "train") if method == "vera" else ("eval",)
    for mode in modes:
        gm.train(mode == "train")
        pm.train(mode == "train")
        for batch, length in ((1, 1), (3, 5), (2, 11)):
            kw = inputs(batch, length)
            with torch.no_grad():
                ref = pm(**kw).logits
                out = gm(**kw).logits
            assert out.dtype == ref.dtype
            # int8 casts its inputs to float16: a 1e-7 difference in x can flip a rounding there
            tol = 5e-4 if kind == "int8" else 1e-4
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"{kind} {method} {mode} {batch}x{length} {m}")

    # gradients reach every lambda through the quantized bases, as PEFT's do (in the last mode compared:
    # training for VeRA, eval for PVeRA, both deterministic)
    kw = inputs(2, 7, seed=5)
    gm(**kw).loss.backward()
    pm(**kw).loss.backward()
    ours = {n.replace("vera_fx_adapters.default.sites.", ""): p.grad  # a block's: <block>.vera_fx_adapters...
            for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n.split("base_model.model.", 1)[1].replace(".default", ""): p.grad for n, p in pm.named_parameters()
              if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name, g in ours.items():
        torch.testing.assert_close(g, theirs[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_moves_lambdas_and_keeps_quantized_weights(adapted, kind):
    model, gm = adapted(kind, "vera")
    gm.zero_grad()
    before = quantized_params(gm)
    assert before and all(not p.requires_grad for n, p in gm.named_parameters() if n in before)
    trainable = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all("lambda" in n for n in trainable)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    gm.train()
    gm(**inputs()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lambda_b" in n)
    opt.step()
    assert all(not torch.equal(start[n], p) for n, p in trainable.items() if "lambda_b" in n)
    gm.eval()
    with torch.no_grad():
        gm(**inputs(2, 4))
    after = quantized_params(gm)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a quantized weight changed"
    # the graph shares the quantized weights with the model, which keeps its own requires_grad
    assert all(p.dtype in (torch.int8, torch.uint8) for n, p in model.named_parameters()
               if quantized.is_quantized_parameter(p))


def _replace_linears(model: nn.Module, kind: str) -> nn.Module:
    """Swap every nn.Linear but the LM head for a bnb layer by hand, quantizing on .to('cpu')."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            args = (child.in_features, child.out_features, child.bias is not None)
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(*args, quant_type=kind, compute_dtype=torch.float32)
            new.load_state_dict(child.state_dict())
            new = new.to("cpu")
            new.support_avx512bf16_for_cpu = False
            setattr(parent, name, new)
    return model.eval()


@pytest.mark.parametrize("kind", ["int8", "fp4"])
def test_hand_replaced_layers_with_bias(kind):
    """A non-transformers module with bnb layers (with biases) put in by hand: outputs equal the eager
    quantized model at several shapes, and Site records the kind and the bias."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(64, 128)
            self.down = nn.Linear(128, 64)
            self.head = nn.Linear(64, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.down(torch.relu(self.up(x))) + self.down(torch.relu(self.up(2 * x))))

    torch.manual_seed(0)
    net = Net()
    for name in ("up", "down"):
        layer = getattr(net, name)
        args = (layer.in_features, layer.out_features, True)
        new = (bnb.nn.Linear8bitLt(*args, has_fp16_weights=False) if kind == "int8" else
               bnb.nn.Linear4bit(*args, quant_type=kind, compute_dtype=torch.float32))
        new.load_state_dict(layer.state_dict())
        setattr(net, name, new.to("cpu"))
    _no_cpu_packing(net)
    net.eval()
    gm = vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["up", "down", "head"]),
                           example_inputs=(torch.randn(2, 6, 64),))
    by_name = {s.name: s for s in vera_fx.sites(gm)}
    assert {n: s.kind for n, s in by_name.items()} == {"up": kind, "down": kind, "head": "linear"}
    assert by_name["up"].in_features == 64 and by_name["up"].out_features == 128 and by_name["up"].bias == "up.bias"
    gm.eval()
    for shape in ((2, 6, 64), (1, 1, 64), (5, 3, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), net(x), atol=1e-5, rtol=1e-5)  # lambda_b starts at zero
    # the graph owns a frozen bias over the layer's storage; the user's layer keeps its trainable bias
    assert net.up.bias.requires_grad and not gm.get_submodule("up").bias.requires_grad
    assert gm.get_submodule("up").weight is net.up.weight and gm.get_submodule("up") is not net.up
    # the shared layer "up" is called twice: two call_module nodes, one site name
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == "up") == 2


def test_4bit_size_not_multiple_of_blocksize_trains_and_evaluates():
    """bnb's CPU inference packing fails with a bare reshape error when in_features is not a multiple of the
    4-bit blocksize (64) and its packed kernel has no backward; the graph's 4-bit layers never pack, so such
    a layer runs in both modes and gradients flow through it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 40))
    for i in (0, 2):
        new = bnb.nn.Linear4bit(net[i].in_features, net[i].out_features, quant_type="nf4",
                                compute_dtype=torch.float32)
        new.load_state_dict(net[i].state_dict())
        net[i] = new.to("cpu")
    net.eval()
    gm = vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["0", "2"], init_weights=False),
                           example_inputs=(torch.randn(2, 48),))
    x = torch.randn(3, 48)
    gm.eval()
    with torch.no_grad():
        y_eval = gm(x)
    gm.train()
    y_train = gm(x)
    torch.testing.assert_close(y_train, y_eval)  # same kernel in both modes
    y_train.square().sum().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


def test_weight_packed_by_original_model_is_refused_in_training():
    """bnb packs a 4-bit weight for its CPU kernel on an eval forward; that kernel has no backward, so a
    weight the original model packed after capture must not silently stop the graph's gradients."""
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(nn.Linear(64, 64, bias=False).state_dict())
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), layer.to("cpu")).eval()
    gm = vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["0"]), example_inputs=(torch.randn(2, 64),))
    net[2].support_avx512bf16_for_cpu = True  # bnb's default on a CPU with AVX512-BF16
    with torch.no_grad():
        net(torch.randn(2, 64))
    if not quantized._is_cpu_packed(net[2].weight):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not pack 4-bit weights here")
    gm.train()
    with pytest.raises(RuntimeError, match="packed for CPU inference"):
        gm(torch.randn(3, 64))
    gm.eval()
    with torch.no_grad():  # inference needs no backward: the packed kernel is fine
        torch.testing.assert_close(gm(torch.randn(3, 64)).shape, torch.Size([3, 64]))


def _random_lambdas(pm: nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lambda" in name:
                p.normal_()


def _nearer(merged: torch.Tensor, adapted: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether merged outputs are nearer the adapted model's than the base model's (a dropped adapter gives
    exactly the base's): requantizing nf4 rounds by up to a third of a random adapter's effect."""
    return bool((merged - adapted).abs().max() < (merged - base).abs().max())


def _quantized_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.data for n, p in model.named_parameters() if quantized.is_quantized_parameter(p)}


@pytest.mark.parametrize("kind, method", [("int8", "vera"), ("nf4", "vera"), ("int8", "pvera")])
def test_merge_and_unload_matches_peft_merged_model(checkpoint, kind, method, caplog):
    """PEFT's recipe (get_peft_model, merge_and_unload) and vera_fx's on the same quantized model and lambdas:
    the merged models hold the same quantized bytes, so their outputs agree far within PEFT's own merge error,
    the adapter is kept (the outputs are the adapted model's up to rounding, far from the base model's), and
    the rounding error is in the log."""
    cfg, peft_cfg = configs(method, "all-linear")
    pm = peft.get_peft_model(load_quantized(checkpoint, kind), peft_cfg)
    _random_lambdas(pm)
    base = load_quantized(checkpoint, kind)
    m = vera_fx.transform(base, cfg)
    vera_fx.load_adapter_state_dict(m, peft.get_peft_model_state_dict(pm))
    pm.eval()
    m.eval()
    kw = inputs(3, 5)
    with torch.no_grad():
        base_out, peft_adapted = base(**kw).logits, pm(**kw).logits
    peft_merged = pm.merge_and_unload()
    with caplog.at_level("INFO", logger="vera_fx.passes.merge"):
        merged = m.merge_and_unload()
    assert merged is base and isinstance(merged, type(peft_merged))
    assert re.search(r"requantized 14 bitsandbytes site\(s\); rounding error .* [0-9.e-]+ at 'model\.layers",
                     caplog.text)
    ours, theirs = _quantized_bytes(merged), _quantized_bytes(peft_merged)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        out, ref = merged(**kw).logits, peft_merged(**kw).logits
    peft_error = (ref - peft_adapted).abs().max()
    assert (out - ref).abs().max() <= peft_error and peft_error > 0
    assert _nearer(out, peft_adapted, base_out)  # the adapter is there


def test_merge_4bit_pvera_adds_peft_s_delta():
    """PVeRA on nf4: PEFT's own 4-bit PVeRA merge builds a layer it cannot run (peft 0.21.2), so the oracle is
    its delta: each merged layer holds exactly bitsandbytes' quantization of dequantize(W) + PEFT's
    get_delta_weight (the mean half)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    for i in (0, 2):
        layer = bnb.nn.Linear4bit(net[i].in_features, net[i].out_features, quant_type="nf4",
                                  compute_dtype=torch.float32)
        layer.load_state_dict(net[i].state_dict())
        net[i] = layer.to("cpu")
    _no_cpu_packing(net)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.PveraConfig(r=8, target_modules=["0", "2"]))
    _random_lambdas(pm)
    gm = vera_fx.transform(net, vera_fx.PveraConfig(r=8, target_modules=["0", "2"]),
                           example_inputs=(torch.randn(2, 64),))
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    gm.eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        adapted, base = gm(x), net(x)
    vera_fx.merge_into(net, gm)
    for i in ("0", "2"):
        layer = pm.base_model.model.get_submodule(i)
        w = layer.get_base_layer().weight
        expected, _ = bnb.functional.quantize_4bit(
            bnb.functional.dequantize_4bit(w.data, w.quant_state) + layer.get_delta_weight("default"),
            blocksize=w.blocksize, compress_statistics=w.compress_statistics, quant_type="nf4")
        assert torch.equal(net.get_submodule(i).weight.data, expected), i
    with torch.no_grad():
        assert _nearer(net(x), adapted, base)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_in_the_graph_leave_the_user_s_layers(checkpoint, kind, caplog):
    """merge puts a new quantized layer in the graph (copy-on-merge: the user's layers, their weights and their
    int8 state are untouched), every graph of the object uses it (a call with another signature), and unmerge
    puts the graph's own layer back: the outputs are bitwise the unmerged ones. (A model of its own: the
    shared fixture's model is wrapped by PEFT in the parity test.)"""
    model = load_quantized(checkpoint, kind)
    m = vera_fx.transform(model, configs("vera", "all-linear")[0])
    _random_lambdas(m)
    site = vera_fx.sites(m)[0].name
    layers = {n: mod for n, mod in model.named_modules() if quantized.is_quantized_layer(mod)}
    before = quantized_params(model)
    graph_layer = m.graph_module.get_submodule(site)
    m.eval()
    kw = inputs(2, 4)
    short = {k: v for k, v in kw.items() if k != "labels"}
    with torch.no_grad():
        ref, base = m(**kw).logits, model(**kw).logits
    with caplog.at_level("INFO", logger="vera_fx.passes.merge"):
        vera_fx.merge(m)
    assert "rounding error" in caplog.text
    new_layer = m.graph_module.get_submodule(site)
    assert new_layer is not graph_layer and type(new_layer) is type(graph_layer)
    merged_bytes = new_layer.weight.data.clone()
    assert all(s.merged == ("default",) and not s.adapters for s in vera_fx.sites(m))
    with torch.no_grad():
        merged, merged_short = m(**kw).logits, m(**short).logits  # the second: a graph of its own
        assert torch.equal(model(**kw).logits, base)
    assert torch.equal(merged_short, merged)
    # capturing the second graph (its stand-ins, its copies of the user's layers) left the merged layer alone
    assert torch.equal(new_layer.weight.data, merged_bytes)
    assert _nearer(merged, ref, base)
    assert {n: mod for n, mod in model.named_modules() if quantized.is_quantized_layer(mod)} == layers
    after = quantized_params(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a user's quantized weight changed"
    vera_fx.unmerge(m)
    assert m.graph_module.get_submodule(site) is graph_layer
    with torch.no_grad():
        assert torch.equal(m(**kw).logits, ref) and torch.equal(m(**short).logits, m(**kw).logits)


def _hand_net(kind: str) -> tuple[nn.Module, nn.Module]:
    """A two-layer net of bnb layers (with biases), and its graph with nonzero lambdas."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    for i in (0, 2):
        args = (net[i].in_features, net[i].out_features, True)
        layer = (bnb.nn.Linear8bitLt(*args, has_fp16_weights=False) if kind == "int8" else
                 bnb.nn.Linear4bit(*args, quant_type=kind, compute_dtype=torch.float32))
        layer.load_state_dict(net[i].state_dict())
        net[i] = layer.to("cpu")
    _no_cpu_packing(net)
    gm = vera_fx.transform(net.eval(), vera_fx.VeraConfig(r=8, target_modules=["0", "2"]),
                           example_inputs=(torch.randn(2, 64),))
    _random_lambdas(gm)
    return net, gm.eval()


def test_quantized_merge_errors_change_nothing(monkeypatch):
    """Every error path of a quantized merge leaves the graph and the model as they were: a failure half-way
    through the graph rewrite, a non-finite merged weight (safe_merge), a model whose layer is not the graph's
    kind, and a layer that was never quantized."""
    net, gm = _hand_net("int8")
    x = torch.randn(3, 64)
    ref, layers, code = gm(x), dict(gm.named_children()), gm.code

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(merge_module, "remove_adapter_nodes", fail)  # after the new layers were installed
    with pytest.raises(RuntimeError, match="boom"):
        vera_fx.merge(gm)
    monkeypatch.undo()
    assert dict(gm.named_children()) == layers and gm.code == code and not adapter_flags(gm).folded
    assert torch.equal(gm(x), ref)

    with torch.no_grad():
        gm.get_parameter(f"{CONTAINER}.default.sites.2.vera_lambda_b")[0] = float("inf")
    with pytest.raises(ValueError, match="safe_merge=True: .* site '2' .* int8 weight; nothing was changed"):
        vera_fx.merge(gm, safe_merge=True)
    assert dict(gm.named_children()) == layers and gm.code == code
    user_layers = list(net)
    with pytest.raises(ValueError, match="site '2'"):
        vera_fx.merge_into(net, gm, safe_merge=True)
    assert list(net) == user_layers

    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    snapshot = {k: v.clone() for k, v in dense.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was written: '0': a Linear on the model, a Linear8bitLt 128x64"):
        vera_fx.merge_into(dense, gm)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in snapshot.items())
    with pytest.raises(ValueError, match=r"'0': no such layer on Sequential"):
        vera_fx.merge_into(nn.Sequential(), gm)

    with pytest.raises(ValueError, match="no row scales .*never quantized.*call .to\\(device\\)"):
        quantized.dequantized_weight(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))


@pytest.mark.parametrize("kind", ["int8", "fp4"])
def test_merge_into_a_hand_built_model_and_merge_twice(kind):
    """merge_into gives the user's model new layers of its own class (not the user's, not the graph's) that
    compute the adapted graph up to rounding; a graph merged in two steps (two adapters) computes it too, and
    unmerges to its own layer exactly."""
    net, gm = _hand_net(kind)
    add_adapter(gm, "other", vera_fx.VeraConfig(r=8, target_modules=["2"]))
    _random_lambdas(gm, seed=4)
    set_adapter(gm, ["default", "other"])
    gm.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref, base = gm(x), net(x)
    own = gm.get_submodule("2")
    vera_fx.merge(gm, ["default"])
    vera_fx.merge(gm, ["other"])
    assert vera_fx.sites(gm)[1].merged == ("default", "other")
    with torch.no_grad():
        twice = gm(x)
    user_layer = net[2]
    vera_fx.merge_into(net, gm)
    assert type(net[2]) is type(user_layer) and net[2] is not user_layer and net[2] is not gm.get_submodule("2")
    with torch.no_grad():
        baked = net(x)
    assert _nearer(baked, ref, base) and _nearer(twice, ref, base)
    vera_fx.unmerge(gm)
    assert gm.get_submodule("2") is own
    with torch.no_grad():
        assert torch.equal(gm(x), ref)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    """A model whose layer classes say bitsandbytes, with bitsandbytes not importable."""
    fake = type("Linear8bitLt", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    net = nn.Sequential(fake(64, 64), nn.ReLU())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"'0'.*Linear8bitLt.*pip install"):
        vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["0"]), example_inputs=(torch.randn(2, 64),))
    assert type(net[0]) is fake  # the model is left as it was


@pytest.mark.parametrize("layer, message", [
    (lambda: bnb.nn.Linear4bit(64, 64, quant_type="nf4"), r"'1'.*not quantized yet.*\.to\(device\)"),
    (lambda: bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True).to("cpu"),
     r"'1'.*has_fp16_weights=True.*llm_int8_has_fp16_weights=False"),
])
def test_unsupported_bnb_layers_are_named(layer, message):
    net = nn.Sequential(nn.Linear(64, 64), layer())
    with pytest.raises(ValueError, match=message):
        vera_fx.transform(net, vera_fx.VeraConfig(r=4, target_modules=["0"]), example_inputs=(torch.randn(2, 64),))


# importing vera_fx (and vera_fx.quantized) imports no bitsandbytes: tests/test_layering.py


def test_failed_capture_restores_the_quantized_layers(checkpoint):
    model = load_quantized(checkpoint, "nf4")
    layers = {n: m for n, m in model.named_modules() if quantized.is_quantized_layer(m)}
    with pytest.raises(vera_fx.CaptureError):
        vera_fx.capture(model, {"input_ids": torch.zeros(2, 4, 3)})  # a 3-d input_ids: export fails
    assert {n: m for n, m in model.named_modules() if quantized.is_quantized_layer(m)} == layers


def test_torch_compile_with_quantized_sites(adapted):
    _, gm = adapted("nf4", "vera")
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lambda_b" in name:
                p.normal_()
    gm.zero_grad()
    gm.train()
    compiled = torch.compile(gm, backend="aot_eager")
    kw = inputs()
    out = compiled(**kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.zero_grad()
    ref = gm(**kw)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    for n, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_match_lists_the_quantized_recogniser():
    """The quantized recogniser sits in the match pass's seam."""
    match = importlib.import_module("vera_fx.passes.match")
    assert quantized.recognise in match.RECOGNISERS
