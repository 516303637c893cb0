"""Every example runs: each examples/*.py with --quick as a subprocess, and the notebook top to bottom."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# torchrun_fsdp.py is run under torchrun, with 2 processes, by tests/test_distributed.py
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "torchrun_fsdp.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore",
               MPLBACKEND="Agg")
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs_quick(script: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--quick"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (f"{script.name} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                                  f"{done.stderr[-3000:]}")


def test_notebook_executes(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(EXAMPLES / "inspect.ipynb", as_version=4)
    env = _env()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "trainable params:" in text and "model.layers.0.self_attn.q_proj" in text
    shown = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")
             and ("text/html" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}))]
    assert shown, "vera_fx.view(gm) showed neither SVG nor HTML"
