"""Inference without merging: decode and prefill forwards of vera_fx against PEFT and the base model.

A Llama-like model (hidden 1024, 4 layers, intermediate 2048, vocab 4096; every linear layer or q/v only),
VeRA and PVeRA (its mean: eval mode) at r=256 with random lambdas, the same adapter state in both libraries.
Rows: decode (a forward of 1 token) and prefill (128 tokens), batch 1 and 8, under ``torch.no_grad`` in eval
mode. Variants, all timed in one interleaved run (per round each variant in turn: two untimed calls that bring
its weights back into the cache, then one timed call; so load from other processes spreads evenly over them,
and no variant gains from running after another that shares its weights; medians):

- ``base``: the model itself; ``peft``: PEFT's model, unmerged; ``peft merged``: ``merge_and_unload``;
- ``vera_fx``: the object in eval (its inference variant, per-site products, the default); ``vera_fx batched``:
  the same with a site group's products batched (``m.inference_form = "batched"``), the row that shows whether
  batching wins;
- ``graph alone``: the inference graph called directly (the object's per-call overhead is the difference);
- ``training plan``: the training graph (``lowering="auto"``) called in eval, what eval ran before the inference
  variant; ``vera_fx merged``: ``vera_fx.merge``;
- with ``--compile``: the base, PEFT and vera_fx under ``torch.compile`` (decode rows only).

Targets (issue 32, on a quiet machine): vera_fx <= 0.90x PEFT's time, decode <= 1.25x the base's.
Run: python benchmarks/inference.py [--quick] [--rounds N] [--threads N] [--compile] [--cases vera-all,...]
[--rows decode,prefill]
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
from vera_fx.variants import attach_adapters  # noqa: E402
from vera_fx.variants import inference_twin  # noqa: E402

CASES = {"vera-all": ("vera", "all-linear"), "vera-qv": ("vera", ["q_proj", "v_proj"]),
         "pvera-all": ("pvera", "all-linear"), "pvera-qv": ("pvera", ["q_proj", "v_proj"])}


def build(hidden: int, layers: int, inter: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warm: int = 2) -> dict[str, float]:
    """Median seconds per call of every function: per round, each function in turn is called ``warm`` times
    untimed (its weights back in the cache: the models hold 4 x 176 MB, more than the 480 MB L3, and a
    decode loop calls one model over and over), then once timed. Without it the order decided the ratios: a
    variant run right after another one sharing its weights ran up to 10% faster."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warm):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def variants(model: torch.nn.Module, method: str, targets, r: int, compile_: bool) -> dict[str, torch.nn.Module]:
    """Every model of one case, with the same adapter state (random lambdas)."""
    import peft

    peft_cfg, ours_cfg, pm, state = peft_with_random_lambdas(model, method, targets, r)
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    ours = vera_fx.transform(model, ours_cfg, example)
    vera_fx.load_adapter_state_dict(ours, state)
    batched = vera_fx.transform(model, ours_cfg, example)
    vera_fx.load_adapter_state_dict(batched, state)
    batched.inference_form = "batched"
    merged = vera_fx.transform(model, ours_cfg, example)
    vera_fx.load_adapter_state_dict(merged, state)
    vera_fx.merge(merged)
    alone = attach_adapters(inference_twin(ours.graph_module, ours.inference_form), ours.graph_module).eval()
    pmerged = peft.get_peft_model(copy.deepcopy(model), peft_cfg)
    peft.set_peft_model_state_dict(pmerged, state)
    out = {"base": model, "peft": pm, "peft merged": pmerged.merge_and_unload().eval(), "vera_fx": ours.eval(),
           "vera_fx batched": batched.eval(), "graph alone": alone, "training plan": ours.graph_module,
           "vera_fx merged": merged.eval()}
    if compile_:
        out.update({"base compiled": torch.compile(model), "peft compiled": torch.compile(pm),
                    "vera_fx compiled": torch.compile(ours)})
    return out


def caller(name: str, module: torch.nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not name.startswith(("vera_fx", "graph alone", "training plan")):
        kw["use_cache"] = False
    return lambda: module(**kw).logits


def run_case(name: str, models: dict[str, torch.nn.Module], rows: list[tuple[str, int, int]], rounds: int,
             vocab: int) -> list[list[str]]:
    out = []
    for row, batch, tokens in rows:
        ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(tokens + batch))
        fns = {k: caller(k, m, ids) for k, m in models.items() if "compiled" not in k or tokens == 1}
        with torch.no_grad():
            ref = fns["peft"]()
            diff = max((fns[k]() - ref).abs().max().item() for k in fns if k not in ("base", "base compiled"))
            med = interleaved(fns, rounds)
        for k, t in med.items():
            peft_ref = med["peft compiled"] if "compiled" in k else med["peft"]
            base_ref = med["base compiled"] if "compiled" in k else med["base"]
            out.append([name, row, str(batch), k, f"{t * 1e3:.2f}", f"{t / peft_ref:.2f}", f"{t / base_ref:.2f}",
                        f"{diff:.1e}" if k == "vera_fx" else ""])
        over = (med["vera_fx"] - med["graph alone"]) * 1e6
        out.append([name, row, str(batch), "per-call overhead (vera_fx - graph alone)", f"{over / 1e3:.3f}", "", "",
                    ""])
    return out


SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})  # Llama's sites that read one x


def work_floor(model: torch.nn.Module, targets, r: int) -> list[list[str]]:
    """Per token, the multiply-adds and the weight values read by the base's linears and by each adapter form,
    and the ratio to the base that they set (what the timings approach where the linears dominate)."""
    base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    groups: dict[tuple[str, int], list[torch.nn.Linear]] = {}
    for name, m in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if isinstance(m, torch.nn.Linear) and leaf != "lm_head" and (targets == "all-linear" or leaf in targets):
            key = next((i for i, s in enumerate(SHARED_INPUT) if leaf in s), leaf)
            groups.setdefault((parent, key), []).append(m)
    a_shared = sum(r * g[0].in_features for g in groups.values())
    b_site = sum(r * m.out_features for g in groups.values() for m in g)
    b_group = sum(r * max(m.out_features for m in g) for g in groups.values())
    peft_work = sum(r * (m.in_features + m.out_features) for g in groups.values() for m in g)
    rows = [("PEFT (A and B per site)", peft_work, peft_work), ("vera_fx (x A.T per input, B per site)",
            a_shared + b_site, a_shared + b_site), ("vera_fx batched (B once per group)", a_shared + b_site,
            a_shared + b_group)]
    return [[form, f"{macs / 1e6:.2f} M", f"{1 + macs / base:.3f}", f"{reads / 1e6:.2f} M", f"{1 + reads / base:.3f}"]
            for form, macs, reads in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, few rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add compiled base / PEFT / vera_fx decode rows")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rows", default="decode,prefill", help="comma-separated, of decode, prefill")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hidden, layers, inter, vocab, r, prefill = (128, 2, 256, 512, 32, 32) if args.quick else (1024, 4, 2048, 4096,
                                                                                             256, 128)
    rounds = 3 if args.quick else args.rounds
    batches = [int(b) for b in args.batches.split(",")]
    rows = [(kind, b, t) for kind, t in (("decode", 1), ("prefill", prefill)) for b in batches
            if kind in args.rows.split(",")]
    model = build(hidden, layers, inter, vocab)
    print(f"Llama-like: hidden {hidden}, {layers} layers, intermediate {inter}, vocab {vocab}, r={r}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} interleaved rounds, eval, "
          "no_grad")
    table = []
    for case in args.cases.split(","):
        method, targets = CASES[case]
        if method == "vera":
            print_table(f"{case}: adapter work per token against the base's linears ({r=})",
                        ["form", "multiply-adds", "floor x base (prefill)", "values read", "floor x base (decode)"],
                        work_floor(model, targets, r))
        rows_of_case = run_case(case, variants(model, method, targets, r, args.compile), rows, rounds, vocab)
        print_table(f"{case} (as it finishes)", ["case", "row", "batch", "variant", "ms", "x peft", "x base", "diff"],
                    rows_of_case)
        table += rows_of_case
    print_table("inference forward: ms (median); x peft / x base = time over PEFT's unmerged / the base model's "
                "(compiled rows: over compiled PEFT / base)",
                ["case", "row", "batch", "variant", "ms", "x peft", "x base", "max |diff| vs peft"], table)


if __name__ == "__main__":
    main()
