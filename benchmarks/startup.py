"""Start-up cost: each step timed in fresh Python processes (median wall time of ``--repeat`` processes).

Rows: ``import vera_fx``; the ``vera-fx`` command's ``--help`` and ``--version`` (the console script's own call,
``vera_fx.cli.main``); ``import torch, transformers`` (the reference); ``import torch, transformers`` and then
the library's API (``vera_fx.transform``, which loads every module a transform needs); and a first real use:
build a tiny Llama from its config and ``vera_fx.transform`` it, against building the same model without
vera_fx. Ratios are against ``import torch, transformers`` and against building without vera_fx; the last
column says whether the process loaded transformers' generation stack or torch's FSDP (neither is needed by
a transform).

    python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_REPORT = ("import json, sys; print('@@' + json.dumps({m: m in sys.modules for m in "
           "('torch', 'transformers.generation.logits_process', 'torch.distributed.fsdp')}))")
_TINY = ("import torch, transformers\n"
         "from transformers import LlamaConfig, LlamaForCausalLM\n"
         "torch.manual_seed(0)\n"
         "model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
         "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))\n")

CASES: list[tuple[str, list[str]]] = [
    ("import vera_fx", ["-c", "import vera_fx\n" + _REPORT]),
    ("vera-fx --help", ["-c", "from vera_fx.cli import main; main(['--help'])"]),
    ("vera-fx --version", ["-c", "from vera_fx.cli import main; main(['--version'])"]),
    ("import torch, transformers", ["-c", "import torch, transformers\n" + _REPORT]),
    ("import torch, transformers; vera_fx.transform", ["-c", "import torch, transformers, vera_fx\n"
                                                     "vera_fx.transform\n" + _REPORT]),
    ("tiny Llama, no vera_fx", ["-c", _TINY + _REPORT]),
    ("tiny Llama + vera_fx.transform", ["-c", _TINY + "import vera_fx\n"
                                        "vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=['q_proj']))"
                                        "\n" + _REPORT]),
]


def run_once(args: list[str]) -> tuple[float, dict]:
    """Wall time of one fresh interpreter running ``args``, and the module report it printed (if any)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            report = json.loads(line[2:])
    return elapsed, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per row (median)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name, _ in CASES}
    reports: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved rounds: machine load spreads over all rows alike
        for name, case in CASES:
            t, report = run_once(case)
            times[name].append(t)
            reports[name] = report
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref, build = med["import torch, transformers"], med["tiny Llama, no vera_fx"]
    rows = []
    for name, _ in CASES:
        against = build if name.startswith("tiny Llama") else ref
        loaded = reports.get(name) or {}
        heavy = [m for m in ("transformers.generation.logits_process", "torch.distributed.fsdp") if loaded.get(m)]
        rows.append([name, f"{med[name]:.2f}", f"{med[name] / against:.2f}x",
                     "-" if not loaded else (", ".join(heavy) or "neither")])
    print_table(f"start-up, median of {args.repeat} fresh processes (s); ratio against `import torch, "
                "transformers` (tiny Llama rows: against building it without vera_fx)",
                ["step", "seconds", "ratio", "generation / FSDP loaded"], rows)


if __name__ == "__main__":
    main()
