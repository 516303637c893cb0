"""Inference: base graph, merged graph, unmerged vera_fx, peft VeRA unmerged and merged, eager and compiled.

A Llama-like model (hidden 256, 4 layers, batch 4, sequence 128, r=256, VeRA on q/v), the same inputs for
every variant. The timings are interleaved (one call of each variant, eager and compiled, per round), so
load from other processes spreads evenly over them; the table shows the fastest round (noise on a shared
machine only adds time) and the median's ratio. The goal: the merged graph within 2% of the base graph.
Run: python benchmarks/inference.py [--quick] [--all-linear] [--threads 1 (steadier on a shared machine)]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Hashable

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, print_table  # noqa: E402

import vera_fx  # noqa: E402


def build(hidden: int, layers: int, vocab: int):
    return llama_like(hidden, layers, vocab).eval()


def interleaved_times(fns: dict[Hashable, Callable[[], object]], rounds: int) -> dict[Hashable, list[float]]:
    """Seconds per call of every function, timed one call each per round, after one warm-up call each."""
    times: dict[Hashable, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--all-linear", action="store_true", help="adapt every linear layer, not only q/v")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, layers, batch, seq, r = (128, 2, 2, 32, 32) if args.quick else (256, 4, 4, 128, 256)
    rounds = 3 if args.quick else args.rounds
    targets = "all-linear" if args.all_linear else ["q_proj", "v_proj"]
    warnings.filterwarnings("ignore")
    import peft

    model = build(hidden, layers, vocab=4096)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"Llama-like: hidden {hidden}, {layers} layers, batch {batch}, sequence {seq}, r={r}, targets {targets}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    example = {k: v[:2, :8].clone() for k, v in inputs.items()}
    config = vera_fx.VeraConfig(r=r, target_modules=targets)
    base_graph = vera_fx.capture(model, example).eval()
    unmerged = vera_fx.transform(model, config, example).eval()
    with torch.no_grad():  # trained-looking lambdas, so that the merged weights differ from the base
        for name, p in unmerged.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = vera_fx.adapter_state_dict(unmerged)
    merged = vera_fx.transform(model, config, example).eval()
    vera_fx.load_adapter_state_dict(merged, state)
    vera_fx.merge(merged)
    peft_unmerged = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, target_modules=targets)).eval()
    peft.set_peft_model_state_dict(peft_unmerged, state)
    peft_merged = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, target_modules=targets))
    peft.set_peft_model_state_dict(peft_merged, state)
    peft_merged = peft_merged.merge_and_unload().eval()

    variants = {"base model (nn.Module)": model, "base graph": base_graph, "merged graph": merged,
                "vera_fx unmerged": unmerged, "peft VeRA unmerged": peft_unmerged,
                "peft merge_and_unload": peft_merged}
    is_graph = {"base graph", "merged graph", "vera_fx unmerged"}

    def caller(name: str, module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        kw = inputs if name in is_graph else {**inputs, "use_cache": False}
        return lambda: module(**kw).logits

    with torch.no_grad():
        ref = caller("vera_fx unmerged", unmerged)()
        diffs = {k: (caller(k, m)() - ref).abs().max().item() for k, m in variants.items()}
        compiled, graphs, compile_s = {}, {}, {}
        for name, module in variants.items():
            counter = CompileCounterWithBackend("inductor")
            fn = caller(name, torch.compile(module, backend=counter))
            t0 = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - t0
            compiled[name], graphs[name] = fn, counter
        # Eager and compiled calls in the same rounds, so that both see the same machine load.
        times = interleaved_times({**{("eager", k): caller(k, m) for k, m in variants.items()},
                                   **{("compiled", k): fn for k, fn in compiled.items()}}, rounds)
        eager = {k: times[("eager", k)] for k in variants}
        fast = {k: times[("compiled", k)] for k in variants}

    best = {k: min(v) for k, v in eager.items()}
    best_c = {k: min(v) for k, v in fast.items()}
    med_c = {k: statistics.median(v) for k, v in fast.items()}
    rows = []
    for name in variants:
        rows.append([name, f"{diffs[name]:.1e}", f"{best[name] * 1e3:.1f}", f"{best[name] / best['base graph']:.3f}",
                     f"{best_c[name] * 1e3:.1f}", f"{best_c[name] / best_c['base graph']:.3f}",
                     f"{med_c[name] / med_c['base graph']:.3f}", str(graphs[name].frame_count),
                     f"{compile_s[name]:.0f}"])
    print_table(f"inference forward, {rounds} interleaved rounds; ms = fastest round; x base = / base graph (same "
                "mode)", ["variant", "|logits - adapted|", "eager ms", "x base", "compiled ms", "x base",
                          "x base (median)", "graphs", "compile s"], rows)
    ratio = best_c["merged graph"] / best_c["base graph"]
    print(f"\nmerged graph / base graph: compiled {ratio:.3f} ({'within' if ratio <= 1.02 else 'over'} the 2% "
          f"goal), eager {best['merged graph'] / best['base graph']:.3f}")


if __name__ == "__main__":
    main()
