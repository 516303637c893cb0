"""Start-up cost: each step timed in fresh Python processes (median wall time of ``--repeat`` processes).

Rows: ``import vera_fx``; the ``vera-fx`` command's ``--help`` and ``--version`` (the console script's own call,
``vera_fx.cli.main``); ``import torch, transformers`` (the reference); ``import torch, transformers`` and then
the library's API (``vera_fx.transform``, which loads every module a transform needs); a first real use on a
transformers model (build a tiny Llama from its config and transform it) and on a plain torch model (a tiny
MLP), each against building the same model without vera_fx. Ratios are against ``import torch,
transformers`` (the model rows: against building that model without vera_fx). The last columns say which
heavy stacks the process loaded: transformers, its generation stack, torch's FSDP.

``--baseline DIR`` runs every row also with another checkout of vera_fx first on the path (e.g. the commit
before a change), interleaved with this tree's rows, so that both see the same machine load.

    python benchmarks/startup.py [--repeat 5] [--baseline DIR]
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

HEAVY = {"transformers": "transformers", "transformers.generation.logits_process": "generation",
         "torch.distributed.fsdp": "FSDP"}
_REPORT = f"import json, sys; print('@@' + json.dumps({{m: m in sys.modules for m in {tuple(HEAVY)!r}}}))"
_TINY = ("import torch, transformers\n"
         "from transformers import LlamaConfig, LlamaForCausalLM\n"
         "torch.manual_seed(0)\n"
         "model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
         "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))\n")
_MLP = ("import torch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))\n")

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
    ("tiny MLP, no vera_fx", ["-c", _MLP + _REPORT]),
    ("tiny MLP + vera_fx.transform", ["-c", _MLP + "import vera_fx\n"
                                      "vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=['0']), "
                                      "example_inputs=(torch.randn(2, 16),))\n" + _REPORT]),
]


def run_once(args: list[str], root: Path) -> tuple[float, dict]:
    """Wall time of one fresh interpreter running ``args`` with ``root`` first on the path, and the module
    report it printed (if any)."""
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=root)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            report = json.loads(line[2:])
    return elapsed, report


def _reference(name: str) -> str:
    if name.startswith("tiny "):
        return name.split(",")[0].split(" +")[0] + ", no vera_fx"
    return "import torch, transformers"


def _loaded(report: dict) -> str:
    return "-" if not report else ", ".join(HEAVY[m] for m in HEAVY if report.get(m)) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per row (median)")
    parser.add_argument("--baseline", type=Path, default=None, help="another vera_fx checkout to time alike")
    args = parser.parse_args(argv)
    roots = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    times = {(label, name): [] for label in roots for name, _ in CASES}
    reports: dict = {}
    for _ in range(args.repeat):  # interleaved rounds: machine load spreads over all rows alike
        for name, case in CASES:
            for label, root in roots.items():
                t, reports[label, name] = run_once(case, root)
                times[label, name].append(t)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    header = ["step"]
    for label in roots:
        header += [f"{label} (s)", "ratio", "loaded"]
    rows = []
    for name, _ in CASES:
        row = [name]
        for label in roots:
            row += [f"{med[label, name]:.2f}", f"{med[label, name] / med[label, _reference(name)]:.2f}x",
                    _loaded(reports[label, name])]
        rows.append(row)
    print_table(f"start-up, median of {args.repeat} fresh processes; ratio against `import torch, transformers` "
                "(model rows: against building that model without vera_fx)", header, rows)


if __name__ == "__main__":
    main()
