"""VeRA on GPT-2's Conv1D layers: a small GPT-2 built from a config learns to count, a few steps at a time.

    python examples/gpt2_conv1d.py            # 80 steps
    python examples/gpt2_conv1d.py --quick    # 5 steps: a smoke test

transformers' ``Conv1D`` stores its weight as (in_features, out_features) and computes
``addmm(bias, x.view(-1, in), weight)``; vera_fx recognises that pattern as a site of kind ``conv1d`` (PEFT's
``fan_in_fan_out=True``), so GPT-2 needs no special handling from the user.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch


def counting_batch(vocab: int, batch: int, length: int, generator: torch.Generator) -> dict:
    """Sequences that count up modulo ``vocab`` from a random start: easy to learn, easy to check."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    ids = (start + torch.arange(length)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def next_token_accuracy(gm: torch.nn.Module, batch: dict) -> float:
    gm.eval()
    with torch.no_grad():
        pred = gm(**batch).logits[:, :-1].argmax(-1)
    return float((pred == batch["input_ids"][:, 1:]).float().mean())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="VeRA on a small GPT-2 (Conv1D sites).")
    parser.add_argument("--steps", type=int, default=80, help="training steps (default 80)")
    parser.add_argument("--r", type=int, default=64, help="VeRA rank (default 64)")
    parser.add_argument("--lr", type=float, default=5e-2, help="AdamW learning rate (default 5e-2)")
    parser.add_argument("--quick", action="store_true", help="5 steps: a smoke test")
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps

    from transformers import GPT2Config, GPT2LMHeadModel

    import vera_fx

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()

    # Every Conv1D of the blocks; c_proj names both the attention and the MLP output projections.
    vera_config = vera_fx.VeraConfig(r=args.r, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    start = time.perf_counter()
    gm = vera_fx.transform(model, vera_config)
    print(f"capture + transform: {time.perf_counter() - start:.1f} s")
    print(vera_fx.summary(gm))
    kinds = {s.kind for s in vera_fx.sites(gm)}
    print(f"site kinds: {sorted(kinds)}; weights stored (in, out): "
          f"{all(s.fan_in_fan_out for s in vera_fx.sites(gm))}")

    gen = torch.Generator().manual_seed(0)
    check = counting_batch(config.vocab_size, 8, 16, gen)
    with torch.no_grad():  # lambda_b starts at zero: the adapted graph computes exactly the base model
        diff = (gm(**check).logits - model(**check).logits).abs().max().item()
    print(f"at initialisation |graph - model| = {diff:.2e}")

    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    print(f"next-token accuracy before: {next_token_accuracy(gm, check):.0%}")
    for step in range(1, steps + 1):
        gm.train()
        # Other batch sizes and lengths than the capture example (2 x 8): the graph's dimensions are dynamic.
        loss = gm(**counting_batch(config.vocab_size, 16, 12 + step % 5, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step == steps or step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"next-token accuracy after:  {next_token_accuracy(gm, check):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
