"""Run by tests/test_trainer.py under torchrun (2 processes, gloo): Trainer on a tiny Llama with vera_fx."""

from __future__ import annotations

import sys
import warnings

import torch
import transformers

import vera_fx
from conftest import tiny_llama
from test_trainer import Rows

out = sys.argv[1]
model = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=2, learning_rate=5e-2,
                                      logging_steps=1, save_strategy="steps", save_steps=2, report_to=[],
                                      use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo")
trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(8))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer.train()
rank = trainer.args.process_index
torch.save({k: v.clone() for k, v in vera_fx.adapter_state_dict(model).items()}, f"{out}/rank{rank}.pt")
