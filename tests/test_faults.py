"""Faults an operator meets (issue 28): killed and concurrent saves, distributed saves, bad values and files,
unknown keywords, threads, unclear errors, and a fuzz of corrupted folders.

Saves are killed through ``vera_fx.folder.STEP_HOOKS`` in a subprocess (SIGKILL at every step boundary, no
timing). The fuzz runs 20 corruptions of real saved folders here and 200 with ``VERA_FX_LONG=1``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vera_fx
from vera_fx.checkpoint import read_checkpoint
from vera_fx.checks import check_rank
from vera_fx.sites import read_sites
from conftest import needs_torchrun, tiny_llama, torchrun

ROOT = Path(__file__).resolve().parents[1]
LONG = os.environ.get("VERA_FX_LONG") == "1"
FILES = ("adapter_config.json", "adapter_model.safetensors")

# A small model both this process and the killed children build (the same module source, exec'd).
MLP_SOURCE = '''
import torch
from torch import nn

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def adapted(r, **kw):
    import vera_fx
    m = vera_fx.transform(MLP(), vera_fx.VeraConfig(r=r, target_modules=["fc1", "fc2"], **kw),
                          example_inputs=(torch.randn(2, 16),))
    g = torch.Generator().manual_seed(r)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return m
'''
_ns: dict = {}
exec(MLP_SOURCE, _ns)
MLP, adapted = _ns["MLP"], _ns["adapted"]
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))

KILL_CHILD = MLP_SOURCE + '''
import os, signal, sys
import vera_fx
from vera_fx import folder
step, directory, r = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = adapted(r)
folder.STEP_HOOKS.append(lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None)
vera_fx.save_adapter(m, directory)
'''

STEPS = ["wrote adapter_model.safetensors", "wrote adapter_config.json", "new complete", "old aside", "new in",
         "extras moved", "old removed"]


def _run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _leftovers(path: Path) -> list[str]:
    hidden = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return hidden + [p.name for p in path.glob(".*.tmp")]


def _adapter_values(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vera_fx.adapter_state_dict(m).items()}


def _state(m) -> tuple:
    """Everything a load may change: the adapters, their tensors (parameters and buffers), the active list."""
    gm = m.graph_module
    tensors = {k: v.detach().clone() for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    return list(gm.vera_fx_adapters), m.active_adapters, tensors


def _same_state(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# --- 1. saves: all or nothing, killed at every step, concurrent readers ----------------------------------

@pytest.mark.parametrize("step", STEPS)
def test_a_save_killed_at_any_step_leaves_one_complete_adapter(step, tmp_path):
    """SIGKILL at each step of a save over an existing folder (r=8, with another adapter's subfolder): the
    folder then holds the r=8 adapter or the r=16 one, complete and loadable; the next save removes what the
    killed one left, and keeps the subfolder."""
    path = tmp_path / "adapter"
    old = adapted(8)
    vera_fx.save_adapter(old, path)
    (path / "other").mkdir()
    (path / "other" / "note.txt").write_text("kept")
    done = _run_child(KILL_CHILD, step, str(path), "16")
    assert done.returncode == -9, done.stderr[-2000:]  # killed where the hook said
    config, tensors = read_checkpoint(path)  # recovers an interrupted swap first
    assert config.r in (8, 16)
    m = adapted(config.r)
    want = m(X).detach()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.zero_()
    vera_fx.load_adapter(m, path)
    torch.testing.assert_close(m(X), want, atol=0, rtol=0)  # the whole adapter of that r
    assert (path / "other" / "note.txt").read_text() == "kept"
    vera_fx.save_adapter(old, path)
    assert _leftovers(path) == [] and sorted(os.listdir(path)) == sorted([*FILES, "other"])
    assert read_checkpoint(path)[0].r == 8


def test_a_save_killed_before_its_folder_existed_leaves_nothing(tmp_path):
    path = tmp_path / "fresh"
    done = _run_child(KILL_CHILD, "new complete", str(path), "8")
    assert done.returncode == -9
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(path)
    assert _leftovers(path) == []  # the read removed the incomplete new folder


WRITER_CHILD = '''
import sys, time
from pathlib import Path
from vera_fx import folder
a, b, path, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
pairs = [{n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")} for d in (a, b)]
print("ready", flush=True)
end, i = time.time() + seconds, 0
while time.time() < end:
    folder.write_folder(path, pairs[i % 2])
    i += 1
print(i)
'''


def test_concurrent_reader_never_sees_a_mixed_pair(tmp_path):
    """A process saves r=8 and r=16 adapters in turn into one folder; every read here gets one whole pair."""
    vera_fx.save_adapter(adapted(8), tmp_path / "a")
    vera_fx.save_adapter(adapted(16), tmp_path / "b")
    path = tmp_path / "live"
    shutil.copytree(tmp_path / "a", path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(tmp_path / "a"), str(tmp_path / "b"),
                               str(path), "4"], env=env, stdout=subprocess.PIPE, text=True)
    seen, reads = set(), 0
    try:
        assert writer.stdout.readline().strip() == "ready"
        while writer.poll() is None:  # the writer saves for 4 seconds, then prints how many saves it made
            config, tensors = read_checkpoint(path)  # raises on a mixed pair (r against the shapes)
            assert {tuple(v.shape) for k, v in tensors.items() if k.endswith("lambda_d")} == {(config.r,)}
            seen.add(config.r)
            reads += 1
        out, _ = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate(timeout=60)
    assert reads >= 50 and seen == {8, 16} and int(out) > 10, (reads, seen, out)


def test_a_read_while_the_old_version_is_set_aside_gets_the_old_version(tmp_path):
    """Between "old aside" and "new in" the folder exists only as the set-aside copy: a read there (here from a
    step hook, in the saving process) gets that whole old version, though it has no adapter_model.bin (an
    optional name: only a missing required file means a save is deleting it)."""
    from vera_fx import folder

    path = tmp_path / "live"
    vera_fx.save_adapter(adapted(8), path)
    seen = []

    def read_when_aside(step):
        if step == "old aside":
            config, tensors = read_checkpoint(path)
            seen.append((config.r, {tuple(v.shape) for k, v in tensors.items() if k.endswith("lambda_d")}))

    folder.STEP_HOOKS.append(read_when_aside)
    try:
        vera_fx.save_adapter(adapted(16), path)
    finally:
        folder.STEP_HOOKS.remove(read_when_aside)
    assert seen == [(8, {(8,)})]
    assert read_checkpoint(path)[0].r == 16


# --- 2. distributed saves: conventions, no hang --------------------------------------------------------

@needs_torchrun
def test_distributed_saves_follow_the_conventions_and_never_hang(tmp_path):
    """DDP: save_adapter on rank 0 only and save_pretrained(is_main_process=...) on every rank write without
    a collective. FSDP2: a save on one rank without is_main_process refuses at once; on every rank it writes
    the full adapter; a Trainer-style checkpoint of state_dict() loads in one process."""
    torchrun(ROOT / "tests" / "torchrun_saves.py", str(tmp_path), timeout=300)
    rec = torch.load(tmp_path / "record.pt")
    assert "Call it on every rank with is_main_process=(rank == 0)" in rec["fsdp2_one_rank_error"]
    assert rec["fsdp2_one_rank_seconds"] < 60  # at once: no collective was entered (a hang would time out)
    for name in ("ddp_rank0", "ddp_pretrained", "fsdp2_all"):
        config, tensors = read_checkpoint(tmp_path / name)
        assert tensors.keys() == rec["full"].keys(), name
        for k, v in rec["full"].items():
            torch.testing.assert_close(tensors[k], v, atol=0, rtol=0, msg=f"{name}: {k}")
    m = vera_fx.from_pretrained(tiny_llama(), tmp_path / "trainer")  # model.safetensors of state_dict()
    got = vera_fx.adapter_state_dict(m)
    for k, v in rec["full"].items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=k)


# --- 3. validation before any work ---------------------------------------------------------------------

def test_r_is_bounded_by_the_layers_and_by_memory():
    with pytest.raises(ValueError, match=r"r=1000000000 is more than the targeted layers can use.*bytes.*"
                                         r"Choose r <= 2048"):
        vera_fx.transform(MLP(), vera_fx.VeraConfig(r=10 ** 9, target_modules=["fc1"]),
                          example_inputs=(torch.randn(2, 16),))
    with pytest.raises(ValueError, match="r=10000000 is more"):
        vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=10 ** 7, target_modules=["q_proj"]))
    sites = [s.__class__(**{**s.__dict__, "in_features": 10 ** 6, "out_features": 10 ** 6})
             for s in read_sites(adapted(4).graph_module)]
    with pytest.raises(ValueError, match=r"r=1000000 needs .* bytes.* more than half of the .* this device has"):
        check_rank(vera_fx.VeraConfig(r=10 ** 6), sites)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_d_initial_is_refused(value):
    with pytest.raises(ValueError, match="d_initial=.* expected a finite float"):
        vera_fx.VeraConfig(d_initial=value)
    with pytest.raises(ValueError, match="d_initial"):
        vera_fx.PveraConfig(d_initial=value)


class _NoCapture(MLP):
    def forward(self, x):
        raise AssertionError("captured: the folder was not checked first")


def _rewrite(src: Path, dst: Path, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((src / FILES[0]).read_text())
        config(data)
        (dst / FILES[0]).write_text(json.dumps(data))
    if tensors is not None:
        values = safetensors.torch.load_file(str(src / FILES[1]))
        tensors(values)
        safetensors.torch.save_file(values, str(dst / FILES[1]))
    return dst


def test_folder_r_is_checked_against_the_tensors_before_capture(tmp_path):
    vera_fx.save_adapter(adapted(8), tmp_path / "a")
    bad = _rewrite(tmp_path / "a", tmp_path / "bad", config=lambda d: d.update(r=10 ** 9))
    with pytest.raises(ValueError, match=r"bad/adapter_model.safetensors: base_model.* has shape .*, but the folder's "
                                         r"config says r=1000000000"):
        vera_fx.from_pretrained(_NoCapture(), bad, example_inputs=(torch.randn(2, 16),))


@pytest.mark.parametrize("key,value", [("fc1.vera_lambda_d", float("nan")), ("vera_A", float("inf"))])
def test_non_finite_tensors_are_refused_naming_file_and_key(key, value, tmp_path):
    m = adapted(8)
    vera_fx.save_adapter(m, tmp_path / "a")

    def poison(t):
        name = next(k for k in t if k.endswith(key))
        t[name][0] = value
    bad = _rewrite(tmp_path / "a", tmp_path / "bad", tensors=poison)
    before = _state(m)
    with pytest.raises(ValueError, match=rf"bad/adapter_model.safetensors: tensor '.*{key}' holds NaN or Inf"):
        vera_fx.load_adapter(m, bad)
    assert _same_state(before, _state(m))


def test_folder_fields_that_differ_from_the_adapter_are_refused(tmp_path):
    m = adapted(8)
    vera_fx.save_adapter(adapted(8, vera_dropout=0.1), tmp_path / "dropout")
    vera_fx.save_adapter(adapted(8, projection_prng_key=5, save_projection=False), tmp_path / "key")
    before = _state(m)
    with pytest.raises(ValueError, match=r"differs from adapter 'default' in vera_dropout=0.1 \(the adapter has "
                                         r"0.0\).*new adapter_name"):
        vera_fx.load_adapter(m, tmp_path / "dropout")
    with pytest.raises(ValueError, match=r"projection_prng_key=5 \(the adapter has 0\)"):
        vera_fx.load_adapter(m, tmp_path / "key")
    assert _same_state(before, _state(m))
    vera_fx.load_adapter(m, tmp_path / "dropout", adapter_name="other")  # under a new name it loads
    assert list(m.graph_module.vera_fx_adapters) == ["default", "other"]


def test_projections_that_differ_from_the_graphs_are_applied(tmp_path):
    src = adapted(8, projection_prng_key=7)  # other projections than a key-0 graph's
    vera_fx.save_adapter(src, tmp_path / "a")
    m = adapted(8)
    vera_fx.load_adapter(m, tmp_path / "a")
    torch.testing.assert_close(m(X), src(X), atol=1e-6, rtol=0)


def test_a_large_garbage_file_is_refused_without_reading_it(tmp_path):
    vera_fx.save_adapter(adapted(8), tmp_path / "a")
    weights = tmp_path / "a" / FILES[1]
    with open(weights, "wb") as f:  # 2 GiB, sparse on disk: a header length of 50 MB, then zeros
        f.write((50_000_000).to_bytes(8, "little"))
        f.truncate(2 ** 31)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: its header is not JSON"):
        read_checkpoint(tmp_path / "a")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: not the 2 GiB
    for n, message in [(2 ** 30, "over safetensors' limit"), (2 ** 40, "but the file has 2147483640")]:
        with open(weights, "r+b") as f:
            f.write(n.to_bytes(8, "little"))
        with pytest.raises(ValueError, match=f"its header claims {n} bytes.*{message}"):
            read_checkpoint(tmp_path / "a")


# --- 4. keywords and threads -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"])).eval()


def test_an_unknown_keyword_is_refused_with_close_names(llama):
    ids = torch.randint(0, 96, (2, 6))
    graphs = llama.num_graphs
    with pytest.raises(TypeError, match=r"unexpected keyword arguments 'atention_mask' \(close names: "
                                        r"attention_mask.*TransformersKwargs"):
        llama(input_ids=ids, atention_mask=torch.ones_like(ids))
    with pytest.raises(TypeError, match="'colour'"):
        llama(input_ids=ids, colour=1)
    assert llama.num_graphs == graphs  # nothing captured
    with torch.no_grad():  # TransformersKwargs and transformers' return_dict are known
        llama(input_ids=ids, return_dict=True, num_items_in_batch=4)


def test_a_constant_keyword_that_costs_a_graph_per_value_is_said_once(llama, caplog):
    ids = torch.randint(0, 96, (2, 6))
    with caplog.at_level(logging.WARNING, logger="vera_fx"), torch.no_grad():
        for value in (True, False, True):
            llama(input_ids=ids, output_hidden_states=value, output_attentions=False)
        llama(input_ids=ids, output_hidden_states=False, output_attentions=True)
    said = [r.getMessage() for r in caplog.records if "constant keyword" in r.getMessage()]
    assert len(said) == 2, said  # once for output_hidden_states, once for output_attentions
    assert "output_hidden_states changed value" in said[0] and "slots left" in said[0]


# --- 5. the unclear errors, now clear --------------------------------------------------------------------

def test_unclear_errors_name_the_argument_value_and_fix(llama):
    with pytest.raises(TypeError, match=r"adapter_name=3: expected an adapter name"):
        vera_fx.set_adapter(llama, 3)
    with pytest.raises(TypeError, match=r"state_dict='x' is a str; give the dict m.state_dict\(\) returns"):
        llama.load_state_dict("x")
    with pytest.raises(TypeError, match=r"model is already transformed.*m.add_adapter"):
        vera_fx.transform(llama, vera_fx.VeraConfig(r=4), example_inputs={"input_ids": torch.ones(2, 4).long()})
    ids = torch.randint(0, 96, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but input_ids has \(2, 6\)"):
        llama(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long))


# --- 6. fuzz: corrupted real folders ---------------------------------------------------------------------

def _flip(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    buf = bytearray(data)
    i = rng.randrange(lo, max(lo + 1, hi))
    buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _mutate_json(data: dict, rng: random.Random) -> object:
    kind = rng.randrange(7)
    key = rng.choice(sorted(data))
    if kind == 0:
        data.pop(key)
    elif kind == 1:
        data[key] = rng.choice([None, -1, 10 ** 9, "x", [], {}, 0.5, True, float("nan")])
    elif kind == 2:
        data["unknown_field"] = 1
    elif kind == 3:
        data["r"] = rng.choice([0, 4, 16, 10 ** 9, -3, "8", 8.0])
    elif kind == 4:
        data["peft_type"] = rng.choice(["LORA", "vera", None])
    elif kind == 5:
        return [data]
    else:
        data["vera_dropout"] = rng.choice([0.1, 1.5, -0.1])
    return data


def _corrupt(folder_path: Path, rng: random.Random) -> str:
    """One random corruption of the saved folder, in place; returns what was done."""
    weights, config = folder_path / FILES[1], folder_path / FILES[0]
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["truncate", "flip header", "flip data", "flip length", "dtype", "shape", "json",
                       "bad json", "drop key", "extra key"])
    if kind == "truncate":
        weights.write_bytes(raw[:rng.randrange(len(raw))])
    elif kind == "flip header":
        weights.write_bytes(_flip(raw, 8, 8 + n, rng))
    elif kind == "flip data":
        weights.write_bytes(_flip(raw, 8 + n, len(raw), rng))
    elif kind == "flip length":
        weights.write_bytes(_flip(raw, 0, 8, rng))
    elif kind in ("dtype", "shape", "drop key", "extra key"):
        tensors = safetensors.torch.load(raw)
        key = rng.choice(sorted(tensors))
        if kind == "dtype":
            tensors[key] = tensors[key].to(rng.choice([torch.float16, torch.float64, torch.int64, torch.bfloat16]))
        elif kind == "shape":
            tensors[key] = torch.cat([tensors[key].flatten(), torch.zeros(1)])
        elif kind == "drop key":
            tensors.pop(key)
        else:
            tensors["base_model.model.fc3.vera_lambda_b"] = torch.zeros(3)
        weights.write_bytes(safetensors.torch.save(tensors))
    elif kind == "json":
        config.write_text(json.dumps(_mutate_json(json.loads(config.read_text()), rng)))
    else:
        text = config.read_text()
        config.write_text(text[:rng.randrange(len(text))])
    return kind


def test_fuzz_corrupted_folders_are_refused_clearly_or_load_correctly(tmp_path):
    """Each corrupted folder is refused with a ValueError / TypeError naming the file (the model unchanged), or
    it loads and the adapter holds exactly what the file holds."""
    cases = 200 if LONG else 20
    src = adapted(8)
    vera_fx.save_adapter(src, tmp_path / "good")
    m = adapted(8)
    rng = random.Random(28)
    outcomes: dict[str, int] = {}
    for i in range(cases):
        case = tmp_path / f"case{i}"
        shutil.copytree(tmp_path / "good", case)
        kind = _corrupt(case, rng)
        before = _state(m)
        try:
            vera_fx.load_adapter(m, case)
        except (ValueError, TypeError) as e:
            assert str(case) in str(e), f"{kind}: the error does not name the folder: {e}"
            assert _same_state(before, _state(m)), kind
            outcomes[f"{kind}: refused"] = outcomes.get(f"{kind}: refused", 0) + 1
            continue
        file = safetensors.torch.load_file(str(case / FILES[1]))
        got = vera_fx.adapter_state_dict(m)
        for k, v in file.items():
            torch.testing.assert_close(got[k], v.to(got[k].dtype), atol=0, rtol=0, msg=f"{kind}: {k}")
        outcomes[f"{kind}: loaded"] = outcomes.get(f"{kind}: loaded", 0) + 1
        vera_fx.load_adapter(m, tmp_path / "good")  # back to the reference for the next case
        shutil.rmtree(case)
    logging.getLogger(__name__).info("fuzz outcomes: %s", outcomes)
    assert sum(outcomes.values()) == cases


def test_a_call_while_another_thread_exports_a_new_signature():
    """torch.export's 'exporting' flag is global: a call made in this thread while another thread captures must
    run (torch.compiler.disable(recursive=False) on forward refused it: 'not supported with torch.export')."""
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"])).eval()
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        plain = m(input_ids=ids).logits
    out = []
    capturing = threading.Thread(target=lambda: out.append(m(input_ids=ids, output_hidden_states=True).logits))
    capturing.start()
    deadline = time.monotonic() + 60
    while not torch.compiler.is_exporting() and capturing.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert torch.compiler.is_exporting(), "the other thread never reached torch.export"
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, plain)  # during the other thread's export
    capturing.join()
    torch.testing.assert_close(out[0], plain)
