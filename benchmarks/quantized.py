"""Quantized bases: peak memory and training-step time of VeRA on an int8 and an nf4 Llama-like model.

Compares, in one run and on one machine, vera_fx on the quantized model against vera_fx on the fp32 model
and against PEFT on the same quantized model. Each configuration runs in its own process (so peak memory
is not polluted by the others): peak memory is the process's resident set during the training steps above
its resident set after imports ("in step": above its resident set just before the first step); step time
is the fastest of ``--steps`` forward + backward + AdamW steps after a warm-up step (the least disturbed
by other processes on a shared machine). Ratios: time/fp32 and mem/fp32 against vera_fx on the
fp32 model, time/peft and mem/peft against PEFT on the same base. After training, each run merges
(``merge_and_unload``: on int8 / nf4 dequantize, add the update, quantize again) and reports the merge's wall
time and its error, the largest |merged - adapted| logit on the training batch in eval mode (the rounding a
requantization adds; on fp32 float rounding only).

    python benchmarks/quantized.py [--hidden 512] [--layers 4] [--batch 4] [--length 64] [--steps 6]

Needs bitsandbytes (pip install 'vera_fx[quant]') and peft.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

logger = logging.getLogger("benchmarks.quantized")

CONFIGS = [  # (base, library)
    ("fp32", "vera_fx"),
    ("fp32", "peft"),
    ("int8", "vera_fx"),
    ("int8", "peft"),
    ("nf4", "vera_fx"),
    ("nf4", "peft"),
]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class _PeakRss:
    """Polls the resident set size in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    h = args.hidden
    return dict(vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers,
                num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128),
                max_position_embeddings=max(128, args.length))


def _weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer, plus 4-bit quantization statistics (each tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def run_one(base: str, library: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``base``, adapt it with ``library``, train ``args.steps`` steps; returns the measurements."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    baseline = _rss()
    if base == "fp32":
        model = LlamaForCausalLM.from_pretrained(path)
    else:
        qc = (BitsAndBytesConfig(load_in_8bit=True) if base == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    model.eval()
    weights = _weight_bytes(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if library == "vera_fx":
        import vera_fx

        net = vera_fx.transform(model, vera_fx.VeraConfig(r=args.r, target_modules="all-linear"))
    else:
        import peft

        net = peft.get_peft_model(model, peft.VeraConfig(r=args.r, target_modules="all-linear"))
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    _trim()
    before_steps = _rss()
    times = []
    with _PeakRss() as peak:
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = net(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up (bnb's int8 state, allocator)
                times.append(time.perf_counter() - t0)
    merge_s, merge_err = _merge(net, batch)
    return {"merge_s": merge_s, "merge_err": merge_err, "base": base, "library": library, "step_s": min(times),
            "peak_mb": (peak.peak - baseline) / 2**20, "step_mb": (peak.peak - before_steps) / 2**20,
            "weights_mb": weights / 2**20,
            "trainable": sum(p.numel() for p in params), "loss": float(loss)}


def _merge(net: Any, batch: dict[str, Any]) -> tuple[float, float]:
    """(wall time of ``merge_and_unload``, max |merged - adapted| logit on ``batch``) in eval mode."""
    import torch

    net.eval()
    with torch.no_grad():
        adapted = net(**batch).logits
    t0 = time.perf_counter()
    merged = net.merge_and_unload()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        return elapsed, float((merged(**batch).logits - adapted).abs().max())


def _table(rows: list[dict[str, Any]]) -> str:
    by = {(r["base"], r["library"]): r for r in rows}
    fp32 = by.get(("fp32", "vera_fx"))
    lines = [f"{'base':<5} {'library':<8} {'step ms':>8} {'peak MB':>8} {'in step':>8} {'weights MB':>10} "
             f"{'time/fp32':>9} {'mem/fp32':>8} {'time/peft':>9} {'mem/peft':>8} {'merge ms':>8} "
             f"{'merge/peft':>10} {'merge err':>9}"]
    for r in rows:
        def ratio(other: Any, key: str) -> str:
            return f"{r[key] / other[key]:.2f}" if other and other is not r and other[key] > 0 else "-"

        peft_row = by.get((r["base"], "peft")) if r["library"] == "vera_fx" else None
        fp32_row = fp32 if r["library"] == "vera_fx" else by.get(("fp32", "peft"))
        lines.append(f"{r['base']:<5} {r['library']:<8} {r['step_s'] * 1e3:>8.1f} {r['peak_mb']:>8.1f} "
                     f"{r['step_mb']:>8.1f} "
                     f"{r['weights_mb']:>10.1f} {ratio(fp32_row, 'step_s'):>9} {ratio(fp32_row, 'peak_mb'):>8} "
                     f"{ratio(peft_row, 'step_s'):>9} {ratio(peft_row, 'peak_mb'):>8} {r['merge_s'] * 1e3:>8.1f} "
                     f"{ratio(peft_row, 'merge_s'):>10} {r['merge_err']:>9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 2 steps (a smoke run)")
    parser.add_argument("--one", nargs=3, metavar=("BASE", "LIBRARY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.r = 128, 2, 2, 64
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.one:
        base, library, path = args.one
        sys.stdout.write("RESULT " + json.dumps(run_one(base, library, path, args)) + "\n")
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**_model_config(args))).save_pretrained(tmp)
        for base, library in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", base, library, tmp],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{base} / {library} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            logger.warning("%s / %s: %.1f ms per step", base, library, rows[-1]["step_s"] * 1e3)
    print(f"Llama-like: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; VeRA r={args.r} on all "
          f"linears but lm_head; batch {args.batch} x {args.length}; {args.threads} threads; fastest of "
          f"{args.steps} steps (forward + backward + AdamW); then merge_and_unload")
    print(_table(rows))


if __name__ == "__main__":
    main()
