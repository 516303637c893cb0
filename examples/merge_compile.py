"""Train a VeRA adapter, merge it into the weights, and torch.compile the merged graph.

    python examples/merge_compile.py            # a 4-layer Llama built from a config, 60 steps
    python examples/merge_compile.py --quick    # 2 layers, 4 steps: a smoke test

The merged graph is node for node the captured base graph, so after ``torch.compile`` it costs what the base
model costs. Merging is copy-on-merge: the model the graph was captured from is not changed until you call
``vera_fx.merge_into(model, gm)``, after which ``model.generate()`` and ``model.save_pretrained()`` carry the
adapter.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch


def counting_batch(vocab: int, batch: int, length: int, generator: torch.Generator) -> dict:
    """Sequences that count up modulo ``vocab`` from a random start."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    ids = (start + torch.arange(length)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and a few steps")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    import vera_fx
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, steps = (64, 2, 4) if args.quick else (256, 4, args.steps)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()

    t0 = time.perf_counter()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=32, target_modules=["q_proj", "v_proj", "down_proj"]))
    print(f"capture + transform: {time.perf_counter() - t0:.1f} s, {len(vera_fx.sites(gm))} sites")

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=2e-2)
    gm.train()
    for step in range(1, steps + 1):
        loss = gm(**counting_batch(config.vocab_size, 8, 16, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step == steps or step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    gm.eval()
    check = counting_batch(config.vocab_size, 4, 24, gen)
    with torch.no_grad():
        adapted = gm(**check).logits
    nodes_adapted = len(gm.graph.nodes)
    vera_fx.merge(gm)
    with torch.no_grad():
        merged = gm(**check).logits
    print(f"merge: {nodes_adapted} -> {len(gm.graph.nodes)} nodes "
          f"(the captured base graph has {len(vera_fx.capture(model).graph.nodes)}); "
          f"|merged - adapted| = {(merged - adapted).abs().max().item():.1e}")

    compiled = torch.compile(gm, fullgraph=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(**check).logits
    print(f"torch.compile (fullgraph) of the merged graph: {time.perf_counter() - t0:.1f} s; "
          f"|compiled - adapted| = {(out - adapted).abs().max().item():.1e}")

    with torch.no_grad():  # the user's model is untouched by merge ...
        base = model(**check).logits
    print(f"model after merge: |model - adapted| = {(base - adapted).abs().max().item():.1e} (unchanged)")
    vera_fx.merge_into(model, gm)  # ... until merge_into writes the merged weights into it
    with torch.no_grad():
        baked = model(**check).logits
    prompt = check["input_ids"][:1, :6]
    more = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    print(f"model after merge_into: |model - adapted| = {(baked - adapted).abs().max().item():.1e}; "
          f"generate {prompt[0].tolist()} -> {more[0, 6:].tolist()}")

    vera_fx.unmerge(gm)  # the adapter nodes and the original weight tensors come back
    with torch.no_grad():
        back = gm(**check).logits
    print(f"unmerge: |unmerged - adapted| = {(back - adapted).abs().max().item():.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
