"""Generation: vera_fx.generate (KV-cache decode graph, eager and torch.compile'd) vs PEFT's eager generate.

A Llama-like model (hidden 512, 4 layers, vocab 8192, VeRA r=256 on q/v), the same adapter state in both
libraries (random lambdas), greedy decoding of N new tokens from prompts of 16 and 512 tokens, batch 1 and 4.
Per case the variants are interleaved (one call of each per round) and the median is reported:
- tokens/s: batch x N / the whole generate call (prefill included);
- ms/token: decode time per step, (time of N new tokens - time of 1 new token) / (N - 1).
Goals: vera_fx eager at least PEFT's speed; ms/token at prefix 512 within 1.5x of prefix 16.
Run: python benchmarks/generate.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, print_table  # noqa: E402

import vera_fx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, shorter prompts, fewer rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import peft

    hidden, layers, vocab, r = (128, 2, 1024, 32) if args.quick else (512, 4, 8192, 256)
    prefixes, batches = ((16, 64), (1, 2)) if args.quick else ((16, 512), (1, 4))
    rounds = 2 if args.quick else args.rounds
    new = 8 if args.quick else args.new_tokens
    model = llama_like(hidden, layers, vocab).eval()
    model.generation_config.eos_token_id = None  # always generate N tokens
    model.generation_config.pad_token_id = 0
    cfg = dict(r=r, target_modules=["q_proj", "v_proj"])
    gm = vera_fx.transform(model, vera_fx.VeraConfig(**cfg))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**cfg)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.2)
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    gm.eval()

    def ours(ids, n, compiled=False):
        return vera_fx.generate(gm, ids, max_new_tokens=n, compile=compiled)

    def theirs(ids, n):
        return pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False)

    rows, per_token = [], {}
    for prefix in prefixes:
        for batch in batches:
            ids = torch.randint(1, vocab, (batch, prefix), generator=torch.Generator().manual_seed(prefix + batch))
            variants = {"peft eager": lambda n: theirs(ids, n), "vera_fx eager": lambda n: ours(ids, n),
                        "vera_fx compiled": lambda n: ours(ids, n, True)}
            first = {}
            for name, fn in variants.items():  # warm-up: capture, compile, equal tokens
                fn(2)
                first[name] = fn(new)
            assert torch.equal(first["vera_fx eager"], first["peft eager"]), "greedy tokens differ from PEFT"
            assert torch.equal(first["vera_fx compiled"], first["peft eager"]), "compiled tokens differ"
            full = {k: [] for k in variants}
            one = {k: [] for k in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(1)
                    t1 = time.perf_counter()
                    fn(new)
                    t2 = time.perf_counter()
                    one[name].append(t1 - t0)
                    full[name].append(t2 - t1)
            med = {k: statistics.median(v) for k, v in full.items()}
            step = {k: (statistics.median(full[k]) - statistics.median(one[k])) / (new - 1) for k in variants}
            for name in variants:
                per_token[(name, prefix, batch)] = step[name]
                rows.append([str(prefix), str(batch), name, f"{batch * new / med[name]:.0f}",
                             f"{1e3 * step[name]:.2f}", f"{med['peft eager'] / med[name]:.2f}"])
    print_table(f"generate {new} tokens, Llama-like hidden {hidden} x {layers} layers, vocab {vocab}, VeRA r={r} "
                f"q/v, {torch.get_num_threads()} threads, median of {rounds}",
                ["prefix", "batch", "variant", "tokens/s", "ms/token (decode)", "speed vs peft"], rows)
    lo, hi = prefixes
    growth = [[name, str(b), f"{per_token[(name, hi, b)] / per_token[(name, lo, b)]:.2f}"]
              for name in ("peft eager", "vera_fx eager", "vera_fx compiled") for b in batches]
    print_table(f"decode time per token, prefix {hi} / prefix {lo} (goal for vera_fx: <= 1.5)",
                ["variant", "batch", "ratio"], growth)


if __name__ == "__main__":
    main()
