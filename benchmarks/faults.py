"""Issue 28's fault table, re-measured: SIGKILLs at random times during saves of a large adapter over an
existing folder, and a reader racing a saving process.

    PYTHONPATH=. python benchmarks/faults.py --kills 30 --reads 300

Each kill: a child process saves an r=2048 adapter (about 64 MB) over a folder holding an r=1024 one and is
killed after a random delay within the measured save time. Then the folder must read (``read_checkpoint``
checks the pair: r against the shapes, the checksum) as one of the two adapters, and the next save must leave
no temporary files. Prints a table (counts, not timings).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = '''
import sys, torch, vera_fx
from torch import nn

class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4096, 4096), nn.Linear(4096, 4096)

    def forward(self, x):
        return self.b(self.a(x))

def adapted(r):
    return vera_fx.transform(Wide(), vera_fx.VeraConfig(r=r, target_modules=["a", "b"]),
                             example_inputs=(torch.randn(2, 4096),))

def saved(r, directory):
    m = adapted(r)
    print("ready", flush=True)
    start = __import__("time").perf_counter()
    vera_fx.save_adapter(m, directory)
    print(__import__("time").perf_counter() - start, flush=True)
'''

logger = logging.getLogger("faults")


def _child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def _save(r: int, path: Path) -> float:
    proc = _child(MODEL + f"saved({r}, {str(path)!r})")
    out, _ = proc.communicate(timeout=600)
    return float(out.split()[-1])


def _leftovers(path: Path) -> int:
    return len([p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]) + \
        len(list(path.glob(".*.tmp")))


def measure_kills(kills: int, root: Path) -> dict[str, int]:
    from vera_fx.checkpoint import read_checkpoint

    import vera_fx

    namespace: dict = {}
    exec(MODEL, namespace)
    old_model = namespace["adapted"](1024)
    path = root / "adapter"
    duration = _save(2048, root / "timing")
    rng = random.Random(28)
    intact = old = new = leftovers_before = 0
    for _ in range(kills):
        vera_fx.save_adapter(old_model, path)
        proc = _child(MODEL + f"saved(2048, {str(path)!r})")
        proc.stdout.readline()  # "ready": the save starts now
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftovers_before += _leftovers(path)
        try:
            config, _ = read_checkpoint(path)
        except ValueError as e:
            logger.warning("unusable: %s", e)
            continue
        intact += 1
        old += config.r == 1024
        new += config.r == 2048
    vera_fx.save_adapter(old_model, path)
    return {"kills": kills, "intact": intact, "old": old, "new": new, "leftovers seen after kills": leftovers_before,
            "leftovers after the next save": _leftovers(path)}


WRITER = '''
import sys, time
from pathlib import Path
from vera_fx import folder
a, b, path, reads_file = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
pairs = [{n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")} for d in (a, b)]
print("ready", flush=True)
i = 0
while not reads_file.exists():
    folder.write_folder(path, pairs[i % 2])
    i += 1
print(i)
'''


def measure_reads(reads: int, root: Path) -> dict[str, int]:
    from vera_fx.checkpoint import read_checkpoint

    _save(8, root / "r8")
    _save(16, root / "r16")
    path, done = root / "live", root / "done"
    shutil.copytree(root / "r8", path)  # the folder exists before the first read, as in use
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root / "r8"), str(root / "r16"), str(path), str(done)],
                            env=env, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    mixed = errors = 0
    seen = {}
    for _ in range(reads):
        try:
            config, tensors = read_checkpoint(path)
        except ValueError as e:
            errors += 1
            mixed += "different adapters" in str(e)
            continue
        if {tuple(v.shape) for k, v in tensors.items() if k.endswith("lambda_d")} != {(config.r,)}:
            mixed += 1
        seen[config.r] = seen.get(config.r, 0) + 1
    done.touch()
    saves = int(proc.communicate(timeout=120)[0].split()[-1])
    return {"reads": reads, "saves meanwhile": saves, "mixed pairs": mixed, "errors": errors, **{f"r={k}": v for k, v in seen.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {**measure_kills(args.kills, Path(tmp) / "kills"), **measure_reads(args.reads, Path(tmp) / "reads")}
    for k, v in rows.items():
        logger.info("| %s | %s |", k, v)


if __name__ == "__main__":
    main()
