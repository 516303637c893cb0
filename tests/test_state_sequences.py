"""Random sequences of adapter-state changes against PEFT: the call-order dimension of "one adapter state".

Each sequence applies the same PEFT-named operations (load, add, set, delete, disable / enable, merge /
unmerge) to a vera_fx object and to PEFT's model, and after every step compares the logits of three call
signatures (input_ids only, with attention_mask, a third batch shape), so a graph that keeps stale adapter
nodes after some order of switches, or a sibling graph that missed a change, shows up as a mismatch. vera_fx
also changes its lowering setting at random steps (outputs must not move). ``VERA_FX_LONG=1`` runs more.
"""

from __future__ import annotations

import os
import random
import warnings

import peft
import pytest
import torch

import vera_fx

from conftest import text_inputs, tiny_llama

TARGETS = [["q_proj", "v_proj"], ["q_proj"], ["v_proj", "k_proj"]]
SEEDS = range(12) if os.environ.get("VERA_FX_LONG") else range(3)
STEPS = 30 if os.environ.get("VERA_FX_LONG") else 12


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if "vera_lambda" in _ and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three PEFT adapters with trained (random) lambdas, over different target sets."""
    root = tmp_path_factory.mktemp("seq")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, targets in enumerate(TARGETS):
            pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=targets))
            _randomise(pm, 20 + i)
            pm.save_pretrained(str(root / f"t{i}"))
            out[f"t{i}"] = str(root / f"t{i}")
    return out


def _inputs() -> list[dict]:
    model = tiny_llama()
    a = text_inputs(model, batch=2, length=6, labels=False, seed=3)
    b = text_inputs(model, batch=3, length=5, labels=False, seed=4)
    return [{"input_ids": a["input_ids"]}, a, b]


def _logits(model, inputs: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**x).logits for x in inputs]


class _Both:
    """The same operation on both models; ``valid`` says which operations PEFT's semantics allow now."""

    def __init__(self, folders: dict) -> None:
        self.folders = folders
        self.ours = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS[0]),
                                      example_inputs=_inputs()[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS[0]))
        self.ours.eval()
        self.peft.eval()
        self.names = ["default"]
        self.merged = False
        self.disabled = False
        self.fresh = 0

    def options(self) -> list[str]:
        if self.merged:
            return ["unmerge"]
        ops = ["load", "add", "lowering"]
        if len(self.names) > 1:
            ops += ["set", "set", "delete"]
        ops.append("enable" if self.disabled else "disable")
        if not self.disabled:
            ops.append("merge")
        return ops

    def apply(self, op: str, rng: random.Random) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(self, "_" + op)(rng)

    def _load(self, rng: random.Random) -> str:
        key = rng.choice(["t0", "t1"])  # PEFT cannot load t2 into this model (test below)
        name = f"{key}_{self.fresh}"
        self.fresh += 1
        self.ours.load_adapter(self.folders[key], adapter_name=name)
        self.peft.load_adapter(self.folders[key], adapter_name=name)
        self.names.append(name)
        return f"load {name}"

    def _add(self, rng: random.Random) -> str:
        name = f"new_{self.fresh}"
        self.fresh += 1
        targets = rng.choice(TARGETS)
        self.ours.add_adapter(name, vera_fx.VeraConfig(r=8, target_modules=targets))
        self.peft.add_adapter(name, peft.VeraConfig(r=8, target_modules=targets))
        self.names.append(name)
        return f"add {name} {targets}"

    def _set(self, rng: random.Random) -> str:
        name = rng.choice(self.names)
        self.ours.set_adapter(name)
        self.peft.set_adapter(name)
        return f"set {name}"

    def _delete(self, rng: random.Random) -> str:
        active = self.peft.active_adapter
        name = rng.choice([n for n in self.names if n != active])
        self.ours.delete_adapter(name)
        self.peft.delete_adapter(name)
        self.names.remove(name)
        return f"delete {name}"

    def _disable(self, rng: random.Random) -> str:
        self.ours.disable_adapter_layers()
        self.peft.disable_adapter_layers()
        self.disabled = True
        return "disable"

    def _enable(self, rng: random.Random) -> str:
        self.ours.enable_adapter_layers()
        self.peft.enable_adapter_layers()
        self.disabled = False
        return "enable"

    def _merge(self, rng: random.Random) -> str:
        self.ours.merge_adapter()
        self.peft.merge_adapter()
        self.merged = True
        return "merge"

    def _unmerge(self, rng: random.Random) -> str:
        self.ours.unmerge_adapter()
        self.peft.unmerge_adapter()
        self.merged = False
        return "unmerge"

    def _lowering(self, rng: random.Random) -> str:
        mode = rng.choice(["auto", "activation", "lean", "weight"])
        vera_fx.set_lowering(self.ours, mode)
        return f"lowering {mode} (ours only)"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_switch_sequences_match_peft_on_every_signature(folders, seed):
    rng = random.Random(seed)
    both = _Both(folders)
    inputs = _inputs()
    done: list[str] = []
    _logits(both.ours, inputs)
    captured = both.ours.num_graphs
    for _ in range(STEPS):
        done.append(both.apply(rng.choice(both.options()), rng))
        assert both.ours.active_adapters == both.peft.active_adapters, done
        for i, (a, b) in enumerate(zip(_logits(both.ours, inputs), _logits(both.peft, inputs))):
            err = (a - b).abs().max().item()
            assert err < 1e-5, f"signature {i} off by {err:.2e} after {done}"
    assert both.ours.num_graphs == captured  # no switch captured a graph again


def test_an_adapter_over_smaller_layers_loads_beside_others(folders):
    """t2 targets k / v (16 outputs), so PEFT saved its own 16-row vera_B: the leading rows of the shared
    32-row B the model's other adapter uses (same seed). vera_fx loads it beside that adapter and computes what
    PEFT computes with t2 alone; PEFT itself refuses this load (size mismatch) and needs a model of its own."""
    inputs = _inputs()
    ours = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS[0]),
                             example_inputs=inputs[1])
    ours.load_adapter(folders["t2"], adapter_name="kv")
    ours.set_adapter("kv")
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = peft.PeftModel.from_pretrained(tiny_llama(), folders["t2"]).eval()
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS[0])).load_adapter(
                folders["t2"], adapter_name="kv")
    for a, b in zip(_logits(ours, inputs), _logits(alone, inputs)):
        assert (a - b).abs().max().item() < 1e-5


def test_a_projection_that_is_not_the_shared_corner_is_refused(folders, tmp_path):
    """The shape check lets a smaller projection through only when its values are the shared ones."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folders["t2"], tmp_path / "t2")
    path = tmp_path / "t2" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.vera_B"] = tensors["base_model.vera_B"] + 1.0
    save_file(tensors, str(path))
    ours = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS[0]),
                             example_inputs=_inputs()[1])
    with pytest.raises(ValueError, match="vera_B differs from the projections"):
        ours.load_adapter(str(tmp_path / "t2"), adapter_name="kv")
    assert ours.peft_config.keys() == {"default"}


def test_an_adapter_deleted_and_added_again_gets_its_own_graphs():
    """Versions are keyed by the adapter states' identities: one deleted and added again under its name, with
    another structure each time (r, sites), must never get a graph built for the one before (whose id the new
    state may reuse). Each cycle equals a fresh object with the same adapters, in train and eval mode."""
    import gc

    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 8))
    first = vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    m = vera_fx.transform(model, first)
    for i in range(6):
        cfg = vera_fx.VeraConfig(r=4 if i % 2 else 2, target_modules=["q_proj", "v_proj"][: 1 + i % 2],
                                 init_weights=False)
        m.add_adapter("x", cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".x." in n and "lambda" in n:
                    p.normal_()
        m.set_adapter("x")
        ref = vera_fx.transform(model, first)
        ref.add_adapter("x", cfg)
        ref.set_adapter("x")
        ours = dict(m.named_parameters())
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if ".x." in n and "lambda" in n:
                    p.copy_(ours[n])
            want = ref.eval()(input_ids=ids).logits
            for mode in (True, False):
                m.train(mode)
                torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        m.set_adapter("default")
        m.delete_adapter("x")
        gc.collect()
