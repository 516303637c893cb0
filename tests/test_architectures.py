"""Issue 30: every architecture PEFT adapts, against PEFT (tests/arch_zoo.py builds 30 tiny models).

One parametrised test over architecture x method (VeRA, PVeRA in eval: the mean) x targets (attention,
"all-linear"): the same sites, the same initial lambdas from the same seed (init_weights=False), forward at
the example's and another shape, trainable counts, one AdamW step, our folder loaded by PEFT. A few rows run in
CI; the rest are marked slow and run with VERA_FX_LONG=1; those also compare greedy generation (6 tokens) with
PEFT's on every text decoder and text encoder-decoder (Whisper's is in tests/test_generate.py).

The eager top level (vera_fx/block_export.py): DeBERTa-v2 / BERT / RoBERTa sequence classification with labels
(every problem_type) equal PEFT's loss and gradients, DeBERTa-v2's data-dependent loss through the eager top.
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings

import pytest
import torch
from torch import nn

import vera_fx
from arch_zoo import ARCHS, BY_NAME, METHODS, TARGETS, generates, run_row
from vera_fx.capture import CaptureError
from vera_fx.block_export import EAGER_TOP, FlatCall
from vera_fx.blocks import ExportCall

peft = pytest.importorskip("peft")

# Rows CI runs (about 30 s on 2 cores): Falcon's FalconLinear, Mixtral's router under "all-linear", OPT's
# registration order (k_proj before q_proj) with PVeRA, Swin's stages (sizes as Python numbers, stochastic depth).
CI_ROWS = {("falcon", "vera", "attention"), ("falcon", "pvera", "all-linear"), ("mixtral", "vera", "all-linear"),
           ("opt", "pvera", "attention"), ("swin", "pvera", "all-linear")}


def _rows() -> list:
    rows = []
    for arch in ARCHS:
        for method in METHODS:
            for targets in TARGETS:
                marks = [] if (arch.name, method, targets) in CI_ROWS else [pytest.mark.slow]
                rows.append(pytest.param(arch.name, method, targets, marks=marks,
                                         id=f"{arch.name}-{method}-{targets}"))
    return rows


@pytest.mark.parametrize("name, method, targets", _rows())
def test_architecture_against_peft(name, method, targets, tmp_path, record_property):
    arch = BY_NAME[name]
    compare_generation = (name, method, targets) not in CI_ROWS  # a decode graph per row: long mode only
    row = run_row(arch, method, targets, str(tmp_path), generate=compare_generation)
    record_property("row", row)  # the sweep table: pytest --junitxml=FILE keeps every row's measures
    assert row["generate"] is (True if compare_generation and generates(arch) else None), "greedy tokens differ"
    assert row["sites"], "the adapted modules differ from PEFT's"
    assert row["counts"], "trainable parameter counts differ from PEFT's"
    assert row["init"] == 0.0, f"initial lambdas differ from PEFT's by {row['init']}"
    for measure in ("forward", "shape", "step", "folder"):
        assert row[measure] <= arch.tol, f"{measure}: {row[measure]:.3g} > {arch.tol}"
    # the adapter and the step change the output far beyond the differences measured: the comparison discriminates
    assert row["effect"] > 100 * max(row["forward"], 1e-7), f"adapter effect {row['effect']:.3g} is too small"
    assert row["moved"] > 100 * max(row["step"], 1e-7), f"one step moved the outputs by {row['moved']:.3g} only"


# ------------------------------------------------------------------------------------ the eager top level

def _classifier(name: str, problem_type, num_labels: int = 3) -> nn.Module:
    arch = BY_NAME[name]
    torch.manual_seed(0)
    import transformers as tf

    cfg = getattr(tf, arch.config)(**{**arch.kwargs, "num_labels": num_labels, "problem_type": problem_type})
    return getattr(tf, arch.model)(cfg).eval()


def _labels(problem_type, num_labels: int = 3) -> torch.Tensor:
    if problem_type in (None, "single_label_classification"):
        return torch.tensor([0, 2])
    if problem_type == "multi_label_classification":
        return torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 3.0]])


_FALLBACK_CI = {("deberta_v2", None), ("deberta_v2", "regression")}


def _fallback_rows() -> list:
    rows = []
    for name in ("deberta_v2", "bert", "roberta"):
        for pt in (None, "single_label_classification", "multi_label_classification", "regression"):
            marks = [] if (name, pt) in _FALLBACK_CI else [pytest.mark.slow]
            rows.append(pytest.param(name, pt, marks=marks, id=f"{name}-{pt}"))
    return rows


@pytest.mark.parametrize("name, problem_type", _fallback_rows())
def test_sequence_classification_loss_and_gradients_equal_peft(name, problem_type, caplog):
    model = _classifier(name, problem_type)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels(problem_type)}
    targets = list(BY_NAME[name].targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=targets,
                                                                       init_weights=False)).eval()
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="vera_fx.block_export"):
        ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=targets, init_weights=False),
                                 example_inputs=kw).eval()
    eager = EAGER_TOP in ours.graph_module.meta
    # DeBERTa-v2's loss branches on the label values when problem_type is inferred: only that one is eager
    assert eager == (name == "deberta_v2" and problem_type is None)
    assert len([r for r in caplog.records if "runs eagerly" in r.getMessage()]) == int(eager)
    lo, lp = ours(**kw).loss, pm(**kw).loss
    lo.backward()
    lp.backward()
    assert abs(float(lo.detach()) - float(lp.detach())) <= 1e-5
    ours_grads = {k: v.grad for k, v in _named_lambdas(ours)}
    peft_grads = {k: v.grad for k, v in _named_lambdas(pm)}
    assert ours_grads.keys() == peft_grads.keys() and ours_grads
    for k, g in ours_grads.items():
        assert torch.allclose(g, peft_grads[k], atol=1e-5, rtol=1e-4), k


def _named_lambdas(model: nn.Module) -> list:
    """(site path.lambda_x, parameter) for ours and PEFT's alike."""
    out = []
    for name, p in model.named_parameters():
        if "lambda" not in name:
            continue
        key = name.replace("vera_fx_adapters.default.sites.", "").replace("base_model.model.", "")
        key = key.replace(".default", "")
        out.append((key, p))
    return sorted(out, key=lambda kv: kv[0])


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * torch.tanh(self.lin(x))


class _DataDependentHead(nn.Module):
    """Layers export captures, and a head whose branch depends on values (torch.export refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, scale=0.5)
        y = self.head(self.norm(x))
        if (y > 0).sum() > 3:
            return y * 2
        return y


def test_eager_top_runs_the_models_code_around_exported_blocks():
    torch.manual_seed(0)
    model = _DataDependentHead().eval()
    x = torch.randn(2, 3, 6)
    gm = vera_fx.capture(model, (x,), blocks=True)
    # the root, a block per layer, and the head (a linear module of the top level stays a site)
    assert EAGER_TOP in gm.meta and len([g for g in gm.modules() if hasattr(g, "graph")]) == 4
    x2 = torch.randn(4, 5, 6)
    assert torch.equal(gm(x2), model(x2)) and torch.equal(gm(-x2), model(-x2))  # both branches, eagerly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=2, target_modules=["lin"],
                                                                       init_weights=False))
    torch.manual_seed(7)
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=2, target_modules=["lin"], init_weights=False),
                             example_inputs=(x,))
    assert torch.allclose(ours(x2), pm(x2), atol=1e-6)
    all_linear = vera_fx.transform(model, vera_fx.VeraConfig(r=2, target_modules="all-linear"), example_inputs=(x,))
    assert sorted(s.name for s in vera_fx.sites(all_linear)) == ["head", "layers.0.lin", "layers.1.lin"]
    copied = copy.deepcopy(ours)  # GraphModule copies drop hooks: each block's call hook comes back
    assert torch.equal(copied(x2), ours(x2))
    vera_fx.merge(ours)  # sites are in the blocks: merging works as with an exported top level
    assert torch.allclose(ours(x2), pm(x2), atol=1e-6)
    vera_fx.unmerge(ours)
    with ours.disable_adapter():
        assert torch.equal(ours(x2), model(x2))


def test_eager_top_refused_for_tensors_outside_modules_keeps_exports_error():
    torch.manual_seed(0)
    model = _DataDependentHead().eval()
    model.scale = nn.Parameter(torch.ones(()))
    with pytest.raises(CaptureError, match="could not capture _DataDependentHead: .*data-dependent"):
        vera_fx.capture(model, (torch.randn(2, 3, 6),), blocks=True)


def test_block_called_otherwise_than_captured_names_the_layer():
    layer = _Layer()
    x = torch.randn(2, 3, 6)
    hook = FlatCall("layers.0", ExportCall.of((x,), {"scale": 0.5}))
    assert hook(layer, (x,), {"scale": 0.5})[0][0] is x
    with pytest.raises(ValueError, match=r"layer 'layers.0' was captured with the constant 0.5 .* now called with 2.0"):
        hook(layer, (x,), {"scale": 2.0})
    with pytest.raises(ValueError, match=r"layer 'layers.0' was captured for calls structured as"):
        hook(layer, (x, x), {"scale": 0.5})


def test_modules_to_save_in_the_eager_top_level_is_refused():
    torch.manual_seed(0)
    model = _DataDependentHead().eval()
    x = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match=r"modules_to_save=\['norm'\] .* names 'norm', which runs in the model's "
                                         r"eager top level: .*GuardOnDataDependentSymNode"):
        vera_fx.transform(model, vera_fx.VeraConfig(r=2, target_modules=["lin"], modules_to_save=["norm"]),
                          example_inputs=(x,))
    # a module that is a block (the linear head) or inside one is read through its block: allowed, and trained
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]),
                             example_inputs=(x,))
    before = ours(x).detach()
    copy_params = [p for n, p in ours.named_parameters() if p.requires_grad and "modules_to_save" in n]
    with torch.no_grad():
        copy_params[0].add_(1.0)
    assert copy_params and not torch.equal(ours(x), before)


@pytest.mark.slow
def test_falcon_generates_as_peft():
    """FalconLinear sites are in the decode graph too (capture_decode_graph exports under linear_forwards)."""
    arch = BY_NAME["falcon"]
    model = arch.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=arch.targets,
                                                                       init_weights=False)).eval()
    torch.manual_seed(7)
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=arch.targets, init_weights=False)).eval()
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    theirs = pm.generate(**kw)
    assert torch.equal(ours.generate(**kw), theirs) and not torch.equal(model.generate(**kw), theirs)


# ------------------------------------------------------------------- targets PEFT refuses: MoE routers

_ROUTER_TARGETS = [["gate"], r".*\.mlp\.gate", ["gate", "q_proj"]]


@pytest.mark.parametrize("name", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_router_targets_are_refused_as_peft_refuses_them(name):
    """A MoE router (``MixtralTopKRouter``: an ``F.linear`` call, no ``nn.Linear``) selected by an explicit
    target: PEFT refuses it, alone or next to linear layers, so we do (a folder adapting it would not load)."""
    from vera_fx.passes import MatchPass
    from vera_fx.passes.match import select_sites

    model = BY_NAME[name].build()
    router = type(model.model.layers[0].mlp.gate).__name__
    gm = vera_fx.capture(model)
    MatchPass()(gm)
    assert "model.layers.0.mlp.gate" in {s.name for s in vera_fx.read_sites(gm)}  # the call is there
    for targets in _ROUTER_TARGETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises((TypeError, ValueError)):
                peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=targets))
        with pytest.raises(ValueError, match=rf"selects 'model.layers.0.mlp.gate' \(and 1 more\), a {router}, not an "
                                             rf"nn.Linear or Conv1D: PEFT refuses it .*Target the linear"):
            select_sites(gm, vera_fx.VeraConfig(r=4, target_modules=targets))
    assert len(select_sites(gm, vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))) == 2  # linear targets work
    params = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=router):  # the public path, and nothing half-applied on the model
        vera_fx.transform(model, vera_fx.PveraConfig(r=4, target_modules=["gate", "q_proj"]))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert not any("vera" in n for n, _ in model.named_modules())


# ------------------------------------------------------------ Swin: sizes as Python numbers, a time budget

def test_swin_stages_are_blocks_and_another_image_size_matches_peft(caplog):
    """Swin's stages take the patch grid's height and width as numbers: captured with static sizes but the
    batch (logged), as blocks; another image size captures another graph; stochastic depth (drop_path_rate 0.1)
    follows eval mode."""
    arch = BY_NAME["swin"]
    model = arch.build()
    assert model.config.drop_path_rate > 0
    cfg = dict(r=4, target_modules=arch.targets, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**cfg)).eval()
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="vera_fx.capture"):
        ours = vera_fx.transform(model, vera_fx.VeraConfig(**cfg)).eval()
    assert "takes a size as a Python number" in caplog.text
    assert len([g for g in ours.graph_module.modules() if hasattr(g, "graph")]) == 3  # the top and 2 stages
    g = torch.Generator().manual_seed(5)
    for size in (16, 24):
        x = torch.randn(3, 3, size, size, generator=g)
        assert torch.allclose(ours(pixel_values=x).logits, pm(pixel_values=x).logits, atol=1e-5)
    ours.train()  # stochastic depth is Swin's only random op here (dropout probabilities are 0): on in training
    assert not torch.allclose(ours(pixel_values=x).logits, ours(pixel_values=x).logits)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def test_whole_model_capture_past_its_time_budget_is_stopped_with_the_reason(monkeypatch):
    capture_module = importlib.import_module("vera_fx.capture")  # vera_fx.capture is the function
    x = torch.randn(2, 3, 6)
    monkeypatch.setattr(capture_module, "WHOLE_MODEL_BUDGET_S", 1e-3)  # no export finishes in a millisecond
    with pytest.raises(CaptureError, match=r"did not capture _Tiny as one graph within 0 s \(stopped after \d+ s\): "
                                           r"the layers were not captured as blocks \(not a transformers model.*"
                                           r"VERA_FX_CAPTURE_BUDGET_S"):
        vera_fx.capture(_Tiny(), (x,))
    monkeypatch.setenv("VERA_FX_CAPTURE_BUDGET_S", "0")  # no budget: the same capture works (no timer left)
    model = _Tiny().eval()
    assert torch.allclose(vera_fx.capture(model, (x,), blocks=False)(x), model(x))
    monkeypatch.setenv("VERA_FX_CAPTURE_BUDGET_S", "soon")
    with pytest.raises(ValueError, match=r"VERA_FX_CAPTURE_BUDGET_S='soon' is not a number of seconds"):
        vera_fx.capture(model, (x,))
