"""Fine-tune a VeRA adapter with transformers' plain Trainer, as PEFT's VeraModel guide does.

    python examples/train_with_trainer.py            # a 4-layer GPT-2 (tied embeddings), 2 epochs, bf16 autocast
    python examples/train_with_trainer.py --quick    # 2 layers, a few steps: a smoke test

The object ``vera_fx.transform`` returns goes straight into ``Trainer``: its checkpoints hold the adapter only
(``state_dict()`` is the adapter), ``resume_from_checkpoint`` works, ``vera_fx.from_pretrained(model,
checkpoint_dir)`` reads a checkpoint, and ``model.save_pretrained(dir)`` writes the folder PEFT loads.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch


class CountingRows(torch.utils.data.Dataset):
    """Sequences that count up modulo ``vocab`` from a random start: easy to learn, easy to check."""

    def __init__(self, n: int, vocab: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and a few steps")
    parser.add_argument("--output-dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import vera_fx

    transformers.logging.set_verbosity_error()
    layers, hidden, rows, epochs = (2, 32, 16, 1) if args.quick else (4, 128, 256, 2)
    vocab = 64
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    vera = vera_fx.transform(model, vera_fx.VeraConfig(r=64, target_modules=["c_attn", "c_proj"],
                                                       fan_in_fan_out=True))
    vera.print_trainable_parameters()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        training = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=epochs,
                                     learning_rate=2e-2, logging_steps=max(1, rows // 32), save_strategy="epoch",
                                     eval_strategy="epoch", report_to=[], use_cpu=True, bf16=True,
                                     disable_tqdm=True, seed=0)
        trainer = Trainer(model=vera, args=training, train_dataset=CountingRows(rows, vocab, 16, 0),
                          eval_dataset=CountingRows(max(8, rows // 8), vocab, 16, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}; eval loss {trainer.evaluate()['eval_loss']:.3f}")
        last = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        size = (last / "model.safetensors").stat().st_size
        print(f"{last.name}: model.safetensors is {size:,d} bytes (the adapter, not the base)")
        back = vera_fx.from_pretrained(model, last)
        mine, saved = vera_fx.adapter_state_dict(vera), vera_fx.adapter_state_dict(back)
        diff = max((mine[k] - saved[k]).abs().max().item() for k in mine)
        print(f"reloaded from {last.name}: max difference to the trained adapter {diff:.1e}")
        vera.save_pretrained(out / "adapter")
        print(f"adapter folder for PeftModel.from_pretrained: {sorted(p.name for p in (out / 'adapter').iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
