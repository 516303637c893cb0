"""Many adapters in one batch: 64 rows with 64 different VeRA adapters in one forward (the bank), against
the same batch with one adapter, PEFT's way (set_adapter + one forward per adapter's sub-batch) and the
merged base; plus the time to load many adapter folders with vera_fx.load_adapters.

A Llama-like model (hidden 256, 4 layers, r=64, VeRA on q/v; batch 64 x 32 tokens), eval, no grad. Timings
are interleaved (one call of each variant per round) and the table shows medians and ratios to the
one-adapter batch. Memory: the bytes the bank adds (lambdas, and the per-forward stacked copies).
Run: python benchmarks/many_adapters.py [--quick] [--threads N] [--load N (folders to load, default 1000)]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, print_table  # noqa: E402

import vera_fx  # noqa: E402


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def interleaved(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--load", type=int, default=1000, help="adapter folders to load with load_adapters")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import peft

    hidden, layers, n_adapters, seq, r = (128, 2, 16, 16, 32) if args.quick else (256, 4, 64, 32, 64)
    rounds = 3 if args.quick else args.rounds
    vocab = 512
    model = llama_like(hidden, layers, vocab).eval()
    cfg = vera_fx.VeraConfig(r=r, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n_adapters, seq), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    example = {k: v[:2, :8] for k, v in x.items()}
    names = [f"user{i}" for i in range(n_adapters)]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = vera_fx.transform(model, cfg, example_inputs=example, adapter_name=names[0])
        for i, name in enumerate(names):
            if i:
                vera_fx.add_adapter(src, name, cfg)
            randomise(src.vera_fx_adapters[name].sites, i)
            vera_fx.save_adapter(src, root / name, name)
        del src

        # vera_fx: one graph, every adapter in the bank.
        gm = vera_fx.capture(model, example).eval()
        t0 = time.perf_counter()
        vera_fx.load_adapters(gm, {n: root / n for n in names}, progress=False)
        load_64 = time.perf_counter() - t0
        merged = vera_fx.from_pretrained(model, root / names[0], example_inputs=example).eval()
        vera_fx.merge(merged)
        base = vera_fx.capture(model, example).eval()

        # PEFT: every adapter loaded, one set_adapter + forward per adapter's sub-batch (one row each here).
        pm = peft.PeftModel.from_pretrained(llama_like(hidden, layers, vocab).eval(), str(root / names[0]),
                                            adapter_name=names[0]).eval()  # PEFT changes the model it wraps
        for n in names[1:]:
            pm.load_adapter(str(root / n), adapter_name=n)

        def peft_way():
            outs = []
            for i, n in enumerate(names):
                pm.base_model.set_adapter(n)
                outs.append(pm(input_ids=ids[i:i + 1], attention_mask=x["attention_mask"][i:i + 1]).logits)
            return torch.cat(outs)

        with torch.no_grad():
            want = peft_way()
            got = vera_fx.mixed_adapter_forward(gm, names, **x).logits
            err = (got - want).abs().max().item()
            vera_fx.set_adapter(gm, names[0])
            n = n_adapters
            one_name = f"vera_fx one adapter (set_adapter), {n} rows"
            fns = {
                f"vera_fx mixed: {n} rows, {n} adapters": lambda: vera_fx.mixed_adapter_forward(gm, names, **x),
                one_name: lambda: gm(**x),
                f"vera_fx mixed: {n} rows, 1 adapter": lambda: vera_fx.mixed_adapter_forward(
                    gm, [names[0]] * len(names), **x),
                f"vera_fx merged, {n} rows": lambda: merged(**x),
                f"base graph, {n} rows": lambda: base(**x),
                "PEFT: set_adapter + forward per row": peft_way,
            }
            times = interleaved(fns, rounds)
        ref = times[one_name]
        print_table(f"hidden {hidden}, {layers} layers, r={r}, q/v, batch {n_adapters} x {seq}, "
                    f"{torch.get_num_threads()} threads (median of {rounds} interleaved rounds)",
                    ["variant", "ms", "/ one adapter"],
                    [[k, f"{v * 1e3:.1f}", f"{v / ref:.3f}"] for k, v in times.items()])
        print(f"max |mixed - PEFT per row| = {err:.2e}")

        # Memory: what the bank adds over one adapter.
        lam = sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if "lambda" in n)
        one = lam // n_adapters
        proj = sum(b.numel() * b.element_size() for n, b in gm.vera_fx_adapters[names[0]].named_buffers()
                   if n.endswith(("_A", "_B")))
        own = set(gm.vera_fx_adapters[names[0]].site_names)
        calls = [s for s in vera_fx.read_sites(gm) if s.name in own]
        stacked = sum((n_adapters + 1) * (r + s.out_features) * 4 for s in calls)
        base_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters())
        print_table("memory", ["what", "bytes", "vs base weights"], [
            ["base model weights", f"{base_bytes:,}", "1"],
            ["shared projections A, B (once)", f"{proj:,}", f"{proj / base_bytes:.4f}"],
            [f"lambda bank ({n_adapters} adapters)", f"{lam:,}", f"{lam / base_bytes:.4f}"],
            ["  per adapter", f"{one:,}", f"{one / base_bytes:.5f}"],
            ["stacked banks per forward (temporary)", f"{stacked:,}", f"{stacked / base_bytes:.4f}"],
        ])

        # Loading many folders at once.
        n_load = 50 if args.quick else args.load
        small = root / "small"
        sm = vera_fx.VeraConfig(r=8, target_modules=["q_proj"])
        src = vera_fx.transform(model, sm, example_inputs=example, adapter_name="s")
        vera_fx.save_adapter(src, small / "s0", "s")
        for i in range(1, n_load):  # the same tiny adapter, copied: reading and checking is what is timed
            (small / f"s{i}").mkdir()
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                (small / f"s{i}" / f).write_bytes((small / "s0" / f).read_bytes())
        fresh = vera_fx.capture(model, example).eval()
        t0 = time.perf_counter()
        vera_fx.load_adapters(fresh, {f"s{i}": small / f"s{i}" for i in range(n_load)}, progress=False)
        load_n = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            vera_fx.mixed_adapter_forward(fresh, [f"s{i}" for i in range(n_adapters)], **x)
        first_mixed = time.perf_counter() - t0
        t0 = time.perf_counter()
        one_by_one = vera_fx.capture(model, example).eval()
        for i in range(min(n_load, 20)):
            vera_fx.load_adapter(one_by_one, small / f"s{i}", adapter_name=f"s{i}")
        per_load = (time.perf_counter() - t0) / min(n_load, 20)
        print_table("loading", ["what", "seconds"], [
            [f"load_adapters, {n_adapters} folders (r={r}, q/v)", f"{load_64:.2f}"],
            [f"load_adapters, {n_load} folders (r=8, q)", f"{load_n:.2f}"],
            [f"  first mixed forward after it (builds the {n_load}-adapter bank graph)", f"{first_mixed:.2f}"],
            [f"load_adapter one at a time, per folder (first {min(n_load, 20)})", f"{per_load:.3f}"],
        ])


if __name__ == "__main__":
    main()
