"""A serving artefact: vera_fx.export of a mixed-adapter graph, packaged with AOTInductor, against the eager
graphs. Compiling takes a minute or more on a small CPU, so this is a benchmark, not a test.

A Llama-like model (hidden 128, 2 layers, VeRA r=32 on q/v, 8 adapters in the bank; batch 8 x 32), eval,
no grad. Prints the compile time, the outputs' largest difference and median latencies (interleaved).
Run: python benchmarks/export_aoti.py [--threads N] [--rounds N]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rounds = 3 if args.quick else args.rounds
    vocab, batch, seq = 512, 8, 32
    model = llama_like(128, 2, vocab).eval()
    cfg = vera_fx.VeraConfig(r=32, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    example = {k: v[:2, :8] for k, v in x.items()}
    gm = vera_fx.transform(model, cfg, example_inputs=example, adapter_name="u0")
    names = [f"u{i}" for i in range(batch)]
    for i, n in enumerate(names):
        if i:
            vera_fx.add_adapter(gm, n, cfg)
        with torch.no_grad():
            for p in gm.vera_fx_adapters[n].sites.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    gm.eval()
    index = vera_fx.adapter_index(gm, names)
    ep = vera_fx.export(gm, example, adapter_names=names[:2])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "mixed.pt2"))
        compile_s = time.perf_counter() - t0
        compiled = torch._inductor.aoti_load_package(path)
        program = ep.module()
        with torch.no_grad():
            want = vera_fx.mixed_adapter_forward(gm, names, **x).logits
            got = compiled(**x, vera_fx_adapter_index=index)["logits"]
            err = (got - want).abs().max().item()
            fns = {
                "eager mixed graph (mixed_adapter_forward)": lambda: vera_fx.mixed_adapter_forward(gm, names, **x),
                "ExportedProgram.module()": lambda: program(**x, vera_fx_adapter_index=index),
                "AOTInductor package": lambda: compiled(**x, vera_fx_adapter_index=index),
            }
            for fn in fns.values():
                fn()
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["eager mixed graph (mixed_adapter_forward)"]
    print_table(f"mixed batch {batch} x {seq}, {batch} adapters, {torch.get_num_threads()} threads; "
                f"AOTInductor compile {compile_s:.0f} s; max |AOTI - eager| = {err:.1e}",
                ["variant", "ms", "/ eager"], [[k, f"{v * 1e3:.2f}", f"{v / ref:.3f}"] for k, v in med.items()])


if __name__ == "__main__":
    main()
