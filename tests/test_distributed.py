"""torchrun with 2 CPU processes (gloo): DDP, FSDP2 per block and FSDP1 against a single-process run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vera_fx
from conftest import needs_torchrun, torchrun
from vera_fx.distributed import full_tensor, shard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "torchrun_fsdp.py"
STEPS = 2


def _example():
    spec = importlib.util.spec_from_file_location("torchrun_fsdp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference(ex, name: str):
    """One process, the whole batch: the mean of the per-rank losses, the same SGD steps."""
    gm = ex.transformed(name)
    ids = ex.batch(2)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    grads, losses = None, []
    for step in range(STEPS):
        halves = [gm(input_ids=ids[i:i + 2], attention_mask=torch.ones_like(ids[i:i + 2]), labels=ids[i:i + 2]).loss
                  for i in (0, 2)]
        loss = sum(halves) / 2
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(float(halves[0].detach()))  # rank 0 loss
    return grads, losses, vera_fx.adapter_state_dict(gm)


@needs_torchrun
@pytest.mark.parametrize("name,modes", [("llama", "ddp,fsdp2,plain,fsdp1"), ("gpt2", "ddp,plain")])
def test_torchrun_matches_single_process(name, modes, tmp_path):
    torchrun(SCRIPT, "--model", name, "--modes", modes, "--steps", str(STEPS), "--out", str(tmp_path))
    ex = _example()
    grads, losses, final = _reference(ex, name)
    for mode in modes.split(","):
        rec = torch.load(tmp_path / f"{mode}.pt")
        assert rec["world"] == 2
        torch.testing.assert_close(torch.tensor(rec["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        if rec["grads"] is not None:  # DDP and FSDP2: the mean over ranks, as one process on the whole batch
            assert set(rec["grads"]) == set(grads)
            for k, g in grads.items():
                torch.testing.assert_close(rec["grads"][k], g, atol=1e-5, rtol=1e-5, msg=f"{mode}: {k}")
        if mode in ("fsdp2", "plain"):
            assert abs(rec["fraction"] - 0.5) < 0.01  # each rank holds half of the frozen block weights
        folder = tmp_path / f"adapter_{mode}"
        saved = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
        assert set(saved) == set(final) and (folder / "adapter_config.json").exists()
        for k, v in final.items():  # full tensors (not one rank's shard) after the same steps
            torch.testing.assert_close(saved[k], v, atol=1e-5, rtol=1e-5, msg=f"{mode}: {k}")


@needs_torchrun
@pytest.mark.parametrize("variant", ["graph", "object"])
def test_plain_fsdp2_recipe_and_state_dict(variant, tmp_path):
    """fully_shard(layer) for each layer, then fully_shard(m): each tensor is registered once, so FSDP2 wraps
    it. The gradients are DDP's (torch 2.13's gloo averages; where it sums, pytorch issue 162338, they are
    world x DDP's until mean_gradients). state_dict() gives full tensors on every rank, and load_state_dict
    writes each rank's shard, from full tensors or from DTensors."""
    torchrun(ROOT / "tests" / "torchrun_fsdp_plain.py", "--variant", variant, "--steps", str(STEPS),
              "--out", str(tmp_path))
    rec = torch.load(tmp_path / f"{variant}.pt")
    ex = _example()
    grads, losses, final = _reference(ex, "llama")
    assert rec["world"] == 2 and rec["duplicates"] == []
    # torch 2.13 (the pinned range): gloo averages, so the plain recipe needs nothing else and mean_gradients
    # changes nothing (on a torch that sums, this fails first: see mean_gradients)
    assert rec["sums"] is False and rec["averaged"] is (False if variant == "object" else None)
    assert set(rec["grads"]) == set(grads)
    for k, g in grads.items():
        torch.testing.assert_close(rec["grads"][k], g, atol=1e-5, rtol=1e-5, msg=k)
    state = rec["state"]
    assert rec["sharded"] == [] and rec["same_on_ranks"]  # plain tensors, the same on both ranks
    assert {k[len("vera_fx.default."):] for k in state if k.startswith("vera_fx.default.")} == set(final)
    # the same steps as one process: the trained adapter, as full tensors on every rank
    torch.testing.assert_close(torch.tensor(rec["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    for k, v in final.items():
        torch.testing.assert_close(state[f"vera_fx.default.{k}"], v, atol=1e-5, rtol=1e-5, msg=k)
    assert set(rec["local"]) == set(grads)  # every lambda sharded: each rank holds half
    assert all(2 * here == full for here, full in rec["local"].values())
    assert rec["reloaded"] and rec["reloaded_shards"]


def test_shard_needs_a_process_group():
    gm = _example().transformed("llama")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard(gm)


def test_save_adapter_refuses_other_modules(tmp_path):
    with pytest.raises(TypeError, match="GraphModule"):
        vera_fx.save_adapter(torch.nn.Linear(2, 2), tmp_path)


def test_load_adapter_into_an_fsdp2_sharded_graph(one_process_group, tmp_path):
    """Loading into a sharded graph writes each rank's shard of the saved lambdas; a checkpoint that would
    replace sharded base weights is refused with the graph unchanged."""
    gm = _example().transformed("llama")
    vera_fx.save_adapter(gm, tmp_path / "a")
    want = {k: v.clone() for k, v in vera_fx.adapter_state_dict(gm).items()}
    shard(gm)
    lambdas = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert lambdas and all(hasattr(p, "device_mesh") for p in lambdas.values())  # DTensors
    with torch.no_grad():
        for p in lambdas.values():
            p.zero_()
    vera_fx.load_adapter(gm, tmp_path / "a")
    got = vera_fx.adapter_state_dict(gm)  # full tensors, gathered
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0)
    # a PEFT folder carrying a base weight of a sharded layer
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(32, 32)
    safetensors.torch.save_file(tensors, str(bad / "adapter_model.safetensors"))
    before = {n: full_tensor(p).clone() for n, p in gm.named_parameters()}
    with pytest.raises(ValueError, match="sharded with FSDP2.*before vera_fx.distributed.shard"):
        vera_fx.load_adapter(gm, bad)
    assert all(torch.equal(full_tensor(p), before[n]) for n, p in gm.named_parameters())
    for add in (lambda: vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=4, target_modules=["q_proj"])),
                lambda: vera_fx.load_adapter(gm, tmp_path / "a", adapter_name="b")):
        with pytest.raises(ValueError, match="sharded with FSDP2.*add every adapter before"):
            add()
        assert list(gm.vera_fx_adapters) == ["default"]


def test_mean_gradients_needs_a_sharded_module(one_process_group):
    """mean_gradients looks for FSDP2 modules in the tree it is given; the probe averages on torch 2.13."""
    from torch.distributed.fsdp import fully_shard

    from vera_fx.distributed import fsdp2_sums_gradients, mean_gradients

    m = _example().adapted("llama")
    with pytest.raises(ValueError, match="no module of this .* is sharded with FSDP2; call fully_shard"):
        mean_gradients(m)
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    assert mean_gradients(m) is False and fsdp2_sums_gradients() is False


def test_mean_gradients_needs_a_process_group():
    from vera_fx.distributed import mean_gradients

    with pytest.raises(RuntimeError, match="mean_gradients needs an initialised process group"):
        mean_gradients(torch.nn.Linear(2, 2))
