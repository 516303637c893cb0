"""transformers' plain Trainer (and accelerate) on the object transform returns, with PEFT's VeraModel under the
same Trainer as the oracle: losses, adapter-only checkpoints on tied-weight models, resume, bf16, torchrun."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vera_fx
from conftest import tiny_gpt2, tiny_llama, tiny_opt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "opt": (tiny_opt, dict(target_modules=["q_proj", "v_proj"])),
}


class Rows(torch.utils.data.Dataset):
    """Causal-LM rows of fixed length (the default collator stacks them)."""

    def __init__(self, n: int = 16, length: int = 8, seed: int = 0) -> None:
        self.ids = torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
                learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _peft(model, kw, r=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, **kw))


def _train(model, out, rows=None, resume=None, **kw):
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=rows or Rows(),
                                   eval_dataset=Rows(8, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_matches_peft_and_checkpoints_hold_the_adapter(arch, tmp_path):
    build, kw = CASES[arch]
    model = build()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw))
    _, losses = _train(ours, tmp_path / "ours", save_strategy="steps", save_steps=2)
    _, ref = _train(_peft(model, kw), tmp_path / "peft", save_strategy="steps", save_steps=2)
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-5, rtol=1e-5)
    ckpt = tmp_path / "ours" / "checkpoint-2"
    ours_size = (ckpt / "model.safetensors").stat().st_size
    peft_size = (tmp_path / "peft" / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    assert ours_size < 2 * peft_size  # the adapter (and its config), not the frozen base
    back = vera_fx.from_pretrained(model, ckpt)
    sd = peft.get_peft_model_state_dict(peft.PeftModel.from_pretrained(copy.deepcopy(model),
                                                                       tmp_path / "peft" / "checkpoint-2"))
    for k, v in vera_fx.adapter_state_dict(back).items():
        torch.testing.assert_close(v, sd[k], atol=1e-5, rtol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lambda_b" in k)  # trained (lambda_b starts at 0)


def test_resume_continues_with_the_uninterrupted_losses(tmp_path):
    build, kw = CASES["llama"]
    model = build()
    _, full = _train(vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw)), tmp_path / "a",
                     save_strategy="steps", save_steps=2)
    _, resumed = _train(vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw)), tmp_path / "b",
                        resume=str(tmp_path / "a" / "checkpoint-2"))
    # The resumed log starts with the checkpoint's history; the last two steps are computed again.
    assert len(resumed) == 4
    torch.testing.assert_close(torch.tensor(resumed[2:]), torch.tensor(full[2:]), atol=1e-6, rtol=1e-6)


def test_epoch_saves_on_tied_weights_save_model_evaluate_predict(tmp_path):
    build, kw = CASES["opt"]
    model = build()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw))
    pm = _peft(model, kw)
    runs = {}
    for name, m in (("ours", ours), ("peft", pm)):
        trainer, _ = _train(m, tmp_path / name, rows=Rows(8), max_steps=-1, num_train_epochs=2,
                            save_strategy="epoch")
        runs[name] = trainer
    assert sorted(p.name for p in (tmp_path / "ours").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ev, ev_ref = runs["ours"].evaluate(), runs["peft"].evaluate()
    assert abs(ev["eval_loss"] - ev_ref["eval_loss"]) < 1e-5
    pred, pred_ref = runs["ours"].predict(Rows(8, seed=2)), runs["peft"].predict(Rows(8, seed=2))
    torch.testing.assert_close(torch.as_tensor(pred.predictions[0] if isinstance(pred.predictions, tuple)
                                               else pred.predictions),
                               torch.as_tensor(pred_ref.predictions[0] if isinstance(pred_ref.predictions, tuple)
                                               else pred_ref.predictions), atol=1e-5, rtol=1e-5)
    runs["ours"].save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").stat().st_size < 50_000
    ours.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    ids = Rows(2, seed=3).ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_bf16_trainer_matches_peft(tmp_path):
    build, kw = CASES["llama"]
    model = build()
    _, losses = _train(vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw)), tmp_path / "ours", bf16=True)
    _, ref = _train(_peft(model, kw), tmp_path / "peft", bf16=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=2e-2, rtol=1e-2)


def test_trainer_gradient_checkpointing_checkpoints_the_blocks(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) reaches m.gradient_checkpointing_enable: the blocks are
    checkpointed and the losses are those of training without it."""
    model = tiny_llama()
    plain = vera_fx.transform(model, vera_fx.VeraConfig(r=4))
    _, ref = _train(plain, tmp_path / "plain")
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4))
    _, losses = _train(ours, tmp_path / "ckpt", gradient_checkpointing=True)
    assert ours.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_accelerate_bf16_matches_peft():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    build, kw = CASES["llama"]
    model = build()
    ids = Rows(4).ids
    losses = {}
    try:
        for name, m in (("ours", vera_fx.transform(model, vera_fx.VeraConfig(r=8, **kw))), ("peft", _peft(model, kw))):
            AcceleratorState._reset_state(True)
            acc = Accelerator(mixed_precision="bf16", cpu=True)
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
            m, opt = acc.prepare(m, opt)
            m.train()
            losses[name] = []
            for _ in range(3):
                loss = m(input_ids=ids, labels=ids).loss
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
                losses[name].append(loss.item())
    finally:
        AcceleratorState._reset_state(True)
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["peft"]), atol=2e-2, rtol=1e-2)


def test_two_processes_through_torchrun(tmp_path):
    script = Path(__file__).with_name("torchrun_trainer.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # --standalone: the launcher binds a free port itself (a port picked here could be taken by a parallel test)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # DDP kept the ranks in step
    assert any(states[0][k].abs().sum() > 0 for k in states[0] if "lambda_b" in k)  # and they trained
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    back = vera_fx.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2")
    for k, v in vera_fx.adapter_state_dict(back).items():
        torch.testing.assert_close(v, states[0][k])
