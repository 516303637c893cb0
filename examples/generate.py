"""Generate text with the adapter unmerged: greedy and sampled, left-padded prompts, during training.

A small Llama-like model built from a config (no download) learns to continue a counting pattern with VeRA;
``vera_fx.generate`` runs a KV-cache decode graph that shares the adapter's parameters with the training
graph, so its output follows every training step without re-transforming. At the end the tokens equal those
of the merged model's own ``generate`` (``vera_fx.merge_into``).
Run: python examples/generate.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vera_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    vocab = 64
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=2))
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=64, target_modules="all-linear", d_initial=0.5))

    # Training data: runs of counting tokens 3, 4, 5, ... (mod the vocabulary), the pattern to learn.
    def batch(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        start = torch.randint(3, vocab, (n, 1), generator=gen)
        return 3 + (start - 3 + torch.arange(length)) % (vocab - 3)

    # Two prompts of different lengths, left-padded as a tokenizer with padding_side="left" gives them.
    prompts = [[10, 11, 12], [40, 41, 42, 43, 44, 45]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def show(title: str) -> torch.Tensor:
        gm.eval()
        out = vera_fx.generate(gm, ids, mask, max_new_tokens=8)
        gm.train()
        print(f"{title:>22}: " + " | ".join(" ".join(map(str, row[width:].tolist())) for row in out))
        return out

    show("before training")
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    steps = 12 if args.quick else 300
    for step in range(1, steps + 1):
        x = batch(16, 16, gen)
        loss = gm(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (steps // 3) == 0:
            show(f"step {step} (loss {loss.item():.2f})")
    gm.eval()
    greedy = vera_fx.generate(gm, ids, mask, max_new_tokens=8)
    sampled = vera_fx.generate(gm, ids, mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=10, seed=0)
    assert torch.equal(sampled, vera_fx.generate(gm, ids, mask, max_new_tokens=8, do_sample=True,
                                                 temperature=0.7, top_k=10, seed=0))  # a seed reproduces it
    print(f"{'sampled (seed 0)':>22}: " + " | ".join(" ".join(map(str, r[width:].tolist())) for r in sampled))
    with vera_fx.disable_adapters(gm):
        base = vera_fx.generate(gm, ids, mask, max_new_tokens=8)
    print(f"{'adapters disabled':>22}: " + " | ".join(" ".join(map(str, r[width:].tolist())) for r in base))

    merged = vera_fx.merge_into(copy.deepcopy(model), gm)
    ref = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, ref), "the merged model generates other tokens"
    print("greedy tokens equal the merged model's generate()")


if __name__ == "__main__":
    main()
