"""Generation: ``vera_fx.generate`` (KV-cache decode graph, adapters unmerged) against PEFT's and the base
model's ``generate``.

A Llama-like model (hidden 1024, 4 layers, intermediate 2048, vocab 4096), VeRA and PVeRA (its mean) at r=256
on every linear layer or q/v only, random lambdas, the same adapter state in both libraries: greedy, 32 new
tokens after a prompt of 8, batch 1 and 8. Plus the small model of issue 32 (hidden 64, 2 layers, batch 4).
Variants per case, interleaved (one call of each per round), medians:

- ``base``: the model's own ``generate``; ``peft``: PEFT's, unmerged; ``peft merged``: after
  ``merge_and_unload``;
- ``vera_fx``: ``vera_fx.generate`` (eager; ``--compile`` adds ``compile=True``); ``vera_fx merged``: the same
  after ``vera_fx.merge``.

The tokens equal PEFT's (asserted). Targets (issue 32, quiet machine): vera_fx <= 0.90x PEFT's time; the small
model at least PEFT's tokens/s.
Run: python benchmarks/generate.py [--quick] [--rounds N] [--threads N] [--compile] [--cases vera-all,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import peft_with_random_lambdas, print_table  # noqa: E402

import vera_fx  # noqa: E402

CASES = {"vera-all": ("vera", "all-linear"), "vera-qv": ("vera", ["q_proj", "v_proj"]),
         "pvera-all": ("pvera", "all-linear"), "pvera-qv": ("pvera", ["q_proj", "v_proj"])}


def build(hidden: int, layers: int, inter: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8 if hidden >= 128 else 4, num_key_value_heads=8 if hidden >= 128 else 4,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # always generate N tokens
    model.generation_config.pad_token_id = 0
    return model


def variants(model: torch.nn.Module, method: str, targets, r: int) -> dict[str, torch.nn.Module]:
    import peft

    peft_cfg, ours_cfg, pm, state = peft_with_random_lambdas(model, method, targets, r)
    ours = vera_fx.transform(model, ours_cfg)
    vera_fx.load_adapter_state_dict(ours, state)
    merged = vera_fx.transform(model, ours_cfg)
    vera_fx.load_adapter_state_dict(merged, state)
    vera_fx.merge(merged)
    pmerged = peft.get_peft_model(copy.deepcopy(model), peft_cfg)
    peft.set_peft_model_state_dict(pmerged, state)
    return {"base": model, "peft": pm, "peft merged": pmerged.merge_and_unload().eval(), "vera_fx": ours.eval(),
            "vera_fx merged": merged.eval()}


def generator(name: str, m: torch.nn.Module, ids: torch.Tensor, new: int, compiled: bool = False
              ) -> Callable[[], torch.Tensor]:
    mask = torch.ones_like(ids)
    if name.startswith("vera_fx"):
        return lambda: vera_fx.generate(m, ids, mask, max_new_tokens=new, compile=compiled)
    return lambda: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)


def run_case(case: str, models: dict[str, torch.nn.Module], batches: list[int], prompt: int, new: int,
             rounds: int, vocab: int, compile_: bool) -> list[list[str]]:
    rows = []
    for batch in batches:
        ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
        fns = {k: generator(k, m, ids, new) for k, m in models.items()}
        if compile_:
            fns["vera_fx compiled"] = generator("vera_fx", models["vera_fx"], ids, new, True)
        first = {k: fn() for k, fn in fns.items()}  # warm-up: decode graphs, compile
        for k in ("vera_fx", "vera_fx compiled"):
            if k in first:
                assert torch.equal(first[k], first["peft"]), f"{case}: {k}'s greedy tokens differ from PEFT's"
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, t in med.items():
            rows.append([case, str(batch), k, f"{t * 1e3:.1f}", f"{batch * new / t:.0f}", f"{t / med['peft']:.2f}",
                         f"{t / med['base']:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, few rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add vera_fx.generate(compile=True)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-small", action="store_true", help="skip the small-model (hidden 64) row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hidden, layers, inter, vocab, r = (128, 2, 256, 512, 32) if args.quick else (1024, 4, 2048, 4096, 256)
    rounds = 2 if args.quick else args.rounds
    prompt, new = 8, 8 if args.quick else 32
    batches = [int(b) for b in args.batches.split(",")]
    model = build(hidden, layers, inter, vocab)
    print(f"Llama-like: hidden {hidden}, {layers} layers, intermediate {inter}, vocab {vocab}, r={r}; greedy, "
          f"{new} new tokens after {prompt}; torch {torch.__version__}, {torch.get_num_threads()} threads, median "
          f"of {rounds} interleaved rounds")
    table = []
    for case in args.cases.split(","):
        method, targets = CASES[case]
        table += run_case(case, variants(model, method, targets, r), batches, prompt, new, rounds, vocab,
                          args.compile)
    if not args.no_small:  # issue 32's small model: hidden 64, 2 layers, batch 4, VeRA all-linear
        small = build(64, 2, 172, 512)
        table += run_case("small vera-all", variants(small, "vera", "all-linear", 16), [4], prompt, new,
                          max(rounds, 5), 512, False)
    print_table("generate: ms per call (median), tokens/s = batch x new tokens / time; x peft / x base = time "
                "over PEFT's unmerged / the base model's generate",
                ["case", "batch", "variant", "ms", "tokens/s", "x peft", "x base"], table)


if __name__ == "__main__":
    main()
