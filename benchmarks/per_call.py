"""Per-call overhead: what a call of the vera_fx object costs over its inference graph called directly.

A small Llama-like model (hidden 64, 2 layers, VeRA r=16 on q/v), eval mode under ``torch.no_grad``, 8 tokens:
the median of N calls of the object minus the median of N calls of the graph it runs (its inference twin),
one call of each per round (interleaved), each timed in this thread's CPU time (one torch thread: the
whole call runs here), which other processes' load does not inflate. With ``--before DIR``, the vera_fx package of another checkout
(``DIR/vera_fx``, e.g. ``git worktree add /tmp/old <commit>``) is loaded under another name and timed in the
same rounds, so the two overheads compare on the same machine state.
Run: python benchmarks/per_call.py [--calls N] [--before DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch


def load_package(directory: Path, name: str):  # noqa: ANN201 - a module
    """``directory/vera_fx`` imported as the package ``name`` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, directory / "vera_fx" / "__init__.py",
                                                  submodule_search_locations=[str(directory / "vera_fx")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def calls(lib, base: torch.nn.Module, kw: dict) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the object's call, its inference graph's call) for ``lib``'s transform of a copy of ``base``."""
    m = lib.transform(copy.deepcopy(base), lib.VeraConfig(r=16, target_modules=["q_proj", "v_proj"]),
                      example_inputs=dict(kw)).eval()
    with torch.no_grad():
        m(**kw)
    twin = next(reversed(next(iter(m._twins.values())).values()))
    return (lambda: m(**kw)), (lambda: twin(**kw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--before", type=Path, default=None, help="a checkout whose vera_fx is timed as well")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM

    import vera_fx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    libs = {"vera_fx": vera_fx}
    if args.before is not None:
        libs = {"before": load_package(args.before, "vera_fx_before"), **libs}
    fns: dict[str, Callable[[], object]] = {}
    for name, lib in libs.items():
        fns[name], fns[f"{name} graph alone"] = calls(lib, base, kw)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(args.calls):
            for k, fn in fns.items():
                t0 = time.thread_time()
                fn()
                times[k].append(time.thread_time() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{'row':24s} {'median ms':>10s}")
    for k, v in med.items():
        print(f"{k:24s} {v:10.3f}")
    for name in libs:
        print(f"{name + ' per-call overhead':24s} {med[name] - med[name + ' graph alone']:10.3f}")


if __name__ == "__main__":
    main()
