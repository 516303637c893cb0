"""Every example runs: each examples/*.py with --quick (one subprocess runs them all), and the notebook top to
bottom."""

from __future__ import annotations

import json
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


# One interpreter runs every script in turn (each as __main__, with --quick, in a folder of its own): a fresh
# process per script would pay torch's and transformers' import for each.
_DRIVER = """
import json, os, runpy, sys, tempfile, traceback
out, scripts = sys.argv[1], sys.argv[2:]
results = {}
for path in scripts:
    os.chdir(tempfile.mkdtemp(dir=out))
    sys.argv = [path, "--quick"]
    try:
        runpy.run_path(path, run_name="__main__")
        results[path] = None
    except SystemExit as e:
        results[path] = None if e.code in (0, None) else "exited %r" % (e.code,)
    except BaseException:
        results[path] = traceback.format_exc()
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def example_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("examples")
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(out), *map(str, SCRIPTS)], cwd=out, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and (out / "results.json").is_file(), done.stderr[-3000:]
    return {"results": json.loads((out / "results.json").read_text()), "stdout": done.stdout, "stderr": done.stderr}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs_quick(script: Path, example_results: dict) -> None:
    error = example_results["results"].get(str(script), "did not run")
    assert error is None, f"{script.name}: {error}\n{example_results['stderr'][-2000:]}"


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
