"""Transform time against depth: vera_fx.transform (block capture, and the flat one-graph capture) vs
peft.get_peft_model, on a Llama-like model (hidden 256, VeRA all-linear, r=256) of 2 to 32 layers.

Each depth is measured ``--repeat`` times, interleaved (block, flat, peft per round), and the median shown.
Goals (issue 14): at most +0.05 s per layer; 16 layers in at most 1.5x the 2-layer time; 2 layers in at most
half of the flat capture's time. ``--compile`` adds the first compiled training step of an 8-layer model:
whole-graph ``torch.compile`` of the flat graph vs regional compile of the blocks.
Run: python benchmarks/transform.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, print_table  # noqa: E402

import vera_fx  # noqa: E402
from vera_fx.blockwise import compile_blocks  # noqa: E402

HIDDEN, VOCAB = 256, 512


def _config() -> vera_fx.VeraConfig:
    return vera_fx.VeraConfig(r=256, target_modules="all-linear")


def time_block(layers: int) -> float:
    model = llama_like(HIDDEN, layers, VOCAB)
    gc.collect()  # the garbage of earlier rounds is not this one's cost
    t0 = time.perf_counter()
    vera_fx.transform(model, _config())
    return time.perf_counter() - t0


def time_flat(layers: int) -> float:
    model = llama_like(HIDDEN, layers, VOCAB)
    gc.collect()
    t0 = time.perf_counter()
    gm = vera_fx.capture(model, blocks=False)
    vera_fx.passes.pipeline.run_passes(gm, vera_fx.passes.pipeline.add_adapter_passes(_config(), "default"))
    return time.perf_counter() - t0


def time_peft(layers: int) -> float:
    import peft

    model = llama_like(HIDDEN, layers, VOCAB)
    gc.collect()
    t0 = time.perf_counter()
    peft.get_peft_model(model, peft.VeraConfig(r=256, target_modules="all-linear"))
    return time.perf_counter() - t0


def first_compiled_step(layers: int, regional: bool) -> float:
    """Seconds of the first compiled forward + backward (compilation included)."""
    torch._dynamo.reset()
    model = llama_like(HIDDEN, layers, VOCAB)
    if regional:
        gm = vera_fx.transform(model, _config())
        compile_blocks(gm)
        fn = gm
    else:
        gm = vera_fx.capture(model, blocks=False)
        vera_fx.passes.pipeline.run_passes(gm, vera_fx.passes.pipeline.add_adapter_passes(_config(), "default"))
        fn = torch.compile(gm)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    fn(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 layers, one repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flat-max", type=int, default=8, help="deepest model for the (slow) flat capture")
    parser.add_argument("--compile", action="store_true", help="also time the first compiled step (8 layers)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    depths = [2, 4] if args.quick else [2, 4, 8, 16, 32]
    repeat = 1 if args.quick else args.repeat
    times: dict[tuple[str, int], list[float]] = {}
    time_block(2), time_peft(2)  # warm-up: the first export of a process pays one-time costs
    for _ in range(repeat):
        for n in depths:
            times.setdefault(("block", n), []).append(time_block(n))
            if n <= args.flat_max:
                times.setdefault(("flat", n), []).append(time_flat(n))
            times.setdefault(("peft", n), []).append(time_peft(n))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for n in depths:
        flat = med.get(("flat", n))
        rows.append([str(n), f"{med[('block', n)]:.2f} s", f"{flat:.2f} s" if flat else "-",
                     f"{med[('peft', n)]:.2f} s", f"{med[('block', n)] / med[('peft', n)]:.1f}x",
                     f"{med[('block', n)] / flat:.2f}" if flat else "-"])
    print_table("transform time (median of %d)" % repeat,
                ["layers", "vera_fx (blocks)", "vera_fx (one graph)", "peft", "blocks / peft", "blocks / one graph"],
                rows)
    lo, hi = depths[0], depths[-1]
    per_layer = (med[("block", hi)] - med[("block", lo)]) / (hi - lo)
    print(f"\nper layer: +{per_layer:.3f} s (goal <= 0.05 s)")
    if 16 in depths:
        print(f"16 layers / 2 layers: {med[('block', 16)] / med[('block', 2)]:.2f} (goal <= 1.5)")
    if ("flat", 2) in med:
        print(f"2 layers, blocks / one graph: {med[('block', 2)] / med[('flat', 2)]:.2f} (goal <= 0.5)")
    if args.compile:
        whole = first_compiled_step(8, regional=False)
        regional = first_compiled_step(8, regional=True)
        print_table("first compiled training step, 8 layers", ["whole graph", "regional (blocks)", "ratio"],
                    [[f"{whole:.1f} s", f"{regional:.1f} s", f"{regional / whole:.2f} (goal <= 0.33)"]])


if __name__ == "__main__":
    main()
