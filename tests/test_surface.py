"""PEFT's model surface on the object ``transform`` returns, method by method against PEFT on a tiny Llama, and
PEFT's multi-adapter flow run twice with only the import line changed."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch

import vera_fx
from vera_fx.surface import PeftSurface

from conftest import text_inputs, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def randomise(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two adapters trained (randomised) and saved by PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(("a", "b")):
            pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS))
            randomise(pm, seed=10 + i)
            pm.save_pretrained(str(root / name))
    return {name: str(root / name) for name in ("a", "b")}


@pytest.fixture
def pair():
    """(vera_fx object, PEFT model) with the same fresh default adapter."""
    x = text_inputs(tiny_llama(), labels=False)
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS), example_inputs=x)
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS))
    return m, pm, x


SNIPPET = textwrap.dedent('''
    {import_line}
    model = get_peft_model(base_model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.load_adapter(folders["a"], adapter_name="task_a")
    model.load_adapter(folders["b"], "task_b")
    model.add_adapter("task_c", VeraConfig(r=8, target_modules=["q_proj"]))
    out["active_after_add"] = model.active_adapter
    out["configs"] = sorted(model.peft_config)
    model.set_adapter("task_a")
    model.eval()
    out["a"] = model(**inputs).logits
    with model.disable_adapter():
        out["disabled"] = model(**inputs).logits
    out["a_again"] = model(**inputs).logits
    model.set_adapter("task_b")
    out["b"] = model(**inputs).logits
    model.disable_adapter_layers()
    out["layers_disabled"] = model(**inputs).logits
    model.enable_adapter_layers()
    model.merge_adapter()
    out["merged"] = model(**inputs).logits
    model.unmerge_adapter()
    out["unmerged"] = model(**inputs).logits
    model.delete_adapter("task_c")
    out["after_delete"] = (sorted(model.peft_config), model.active_adapters, model.active_adapter)
    merged_model = model.merge_and_unload()
    out["merged_and_unloaded"] = merged_model(**inputs).logits
''')


def run_snippet(import_line: str, folders: dict) -> dict:
    inputs = text_inputs(tiny_llama(), labels=False)
    env = {"base_model": tiny_llama(), "folders": folders, "inputs": inputs, "out": {}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(SNIPPET.format(import_line=import_line), env)
    return env["out"]


def test_peft_multi_adapter_snippet_with_only_the_import_changed(folders):
    theirs = run_snippet("from peft import VeraConfig, get_peft_model", folders)
    ours = run_snippet("from vera_fx import VeraConfig, transform as get_peft_model", folders)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert ours[key] == value, key
    assert not torch.allclose(ours["a"], ours["b"]) and not torch.allclose(ours["a"], ours["disabled"])


def test_methods_resolve_to_the_adapter_versions_not_the_transformers_model(pair):
    m, _, _ = pair
    base = m.base_model
    for name in ("add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "enable_adapter_layers",
                 "disable_adapter_layers", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload",
                 "get_base_model", "load_adapter", "save_pretrained"):
        assert callable(getattr(m, name)), name
    for name in ("add_adapter", "set_adapter", "delete_adapter", "load_adapter", "disable_adapters"):
        if hasattr(base, name):  # transformers' own PEFT integration: never reached through the object
            assert getattr(type(m), name, None) is not getattr(type(base), name), name
    assert getattr(type(m), "add_adapter") is PeftSurface.add_adapter
    with pytest.raises(AttributeError, match="resize_token_embeddings would run the model without its adapters"):
        m.resize_token_embeddings  # other base-model methods are still refused


def test_peft_config_and_active_adapter_types(pair):
    m, pm, _ = pair
    assert list(m.peft_config) == list(pm.peft_config) == ["default"]
    assert isinstance(m.peft_config["default"], vera_fx.VeraConfig)
    assert m.active_adapter == pm.active_adapter == "default" and isinstance(m.active_adapter, str)
    assert m.active_adapters == pm.active_adapters == ["default"]


def test_add_adapter_does_not_activate_and_rejects_a_taken_name(pair):
    m, pm, _ = pair
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    pm.add_adapter("other", peft.VeraConfig(r=8, target_modules=TARGETS))
    assert m.active_adapter == pm.active_adapter == "default"
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("other", peft.VeraConfig(r=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match="'other' already exists"):
        m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))


def test_add_adapter_takes_a_peft_config(pair):
    m, _, _ = pair
    m.add_adapter("other", peft.VeraConfig(r=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(m.peft_config["other"], vera_fx.VeraConfig)
    assert m.peft_config["other"].task_type == "CAUSAL_LM"


def test_set_adapter_trains_only_the_active_one_and_inference_mode_freezes(pair):
    m, pm, _ = pair
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    pm.add_adapter("other", peft.VeraConfig(r=8, target_modules=TARGETS))
    m.set_adapter("other")
    pm.set_adapter("other")
    states = m.graph_module.vera_fx_adapters
    assert {n for n, st in states.items() if any(p.requires_grad for p in st.lambda_parameters())} == {"other"}
    assert all(".other" in n for n, p in pm.named_parameters() if p.requires_grad)
    assert m.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    m.set_adapter("default", inference_mode=True)
    pm.set_adapter("default", inference_mode=True)
    assert m.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0] == 0
    with pytest.raises(ValueError, match="not on this graph"):
        m.set_adapter("missing")


def test_delete_adapter_like_peft(pair):
    m, pm, _ = pair
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    pm.add_adapter("other", peft.VeraConfig(r=8, target_modules=TARGETS))
    with pytest.warns(UserWarning):
        m.delete_adapter("default")
    pm.delete_adapter("default")
    assert list(m.peft_config) == list(pm.peft_config) == ["other"]
    assert m.active_adapters == pm.active_adapters == ["other"]
    with pytest.raises(ValueError, match="does not exist"):
        pm.delete_adapter("default")
    with pytest.raises(ValueError, match="Adapter default does not exist; adapters: \\['other'\\]"):
        m.delete_adapter("default")


def test_disable_and_enable_adapter_layers(pair):
    m, pm, x = pair
    randomise(m)
    base = logits(m.get_base_model(), x)
    adapted = logits(m.eval(), x)
    assert not torch.allclose(adapted, base)
    m.disable_adapter_layers()
    torch.testing.assert_close(logits(m, x), base, atol=1e-6, rtol=0)
    m.disable_adapter_layers()  # twice: still disabled, as PEFT
    m.enable_adapter_layers()
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-6, rtol=0)
    with m.disable_adapter():
        torch.testing.assert_close(logits(m, x), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="disabled='yes'"):
        vera_fx.adapters.set_adapters_disabled(m, "yes")


def test_merge_adapter_unmerge_and_merge_and_unload(pair):
    m, pm, x = pair
    randomise(m)
    adapted = logits(m.eval(), x)
    m.merge_adapter()
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merged"):
        m.disable_adapter_layers()
    m.unmerge_adapter()
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-6, rtol=0)
    # merge_and_unload with adapter_names: the named adapter only, the active list restored.
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    merged = m.merge_and_unload(adapter_names=["default"])
    assert merged is m.base_model and m.active_adapters == ["default"]
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-5, rtol=0)


def test_unload_and_get_base_model_give_the_model_without_adapters(pair):
    m, pm, x = pair
    randomise(m)
    randomise(pm)
    base = tiny_llama()
    assert m.get_base_model() is m.unload() is m.base_model
    torch.testing.assert_close(logits(m.unload(), x), logits(base, x))
    torch.testing.assert_close(logits(pm.unload(), x), logits(base, x))


def test_load_adapter_argument_order_is_peft_s(pair, folders):
    m, pm, x = pair
    m.load_adapter(folders["a"], "task_a")
    pm.load_adapter(folders["a"], "task_a")
    assert m.active_adapter == pm.active_adapter == "default"
    assert m.training is False  # is_trainable=False: eval mode, as PEFT
    m.set_adapter("task_a")
    pm.set_adapter("task_a")
    torch.testing.assert_close(logits(m, x), logits(pm.eval(), x), atol=1e-5, rtol=0)
    m.load_adapter(folders["b"], "task_b", is_trainable=True)
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("task_b", vera_fx.VeraConfig(r=8, target_modules=TARGETS))


def test_save_pretrained_config_matches_peft_s(pair, tmp_path):
    """adapter_config.json: PEFT's keys and values (peft_version: the config's own, see docs/usage.md)."""
    m, pm, _ = pair
    m.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    # PEFT keeps target_modules as a set: its saved order follows the process's string hashing
    ours["target_modules"], theirs["target_modules"] = sorted(ours["target_modules"]), sorted(theirs["target_modules"])
    differ = {k for k in theirs if ours[k] != theirs[k]}
    assert differ == {"peft_version"}, {k: (ours[k], theirs[k]) for k in differ}
    assert ours["peft_version"] is None


def test_save_pretrained_unsafe_serialization_writes_safetensors_and_says_so(pair, tmp_path, caplog):
    m, _, _ = pair
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    with caplog.at_level("WARNING", logger="vera_fx.surface"):
        m.save_pretrained(tmp_path, safe_serialization=False)
    warned = [r.getMessage() for r in caplog.records if "safe_serialization=False" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "adapter_model.safetensors") in warned[0]
    assert str(tmp_path / "other" / "adapter_model.safetensors") in warned[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # PEFT reads what was written
    caplog.clear()
    m.save_pretrained(tmp_path / "safe")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("only_trainable", [False, True])
@pytest.mark.parametrize("exclude_embeddings", [False, True])
def test_num_parameters_equals_peft_s(pair, only_trainable, exclude_embeddings):
    m, pm, _ = pair
    kw = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    assert m.num_parameters(**kw) == pm.num_parameters(**kw)
    assert m.num_parameters() == m.get_nb_trainable_parameters()[1]
    assert m.num_parameters(only_trainable=True) == m.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("case", ["gpt2", "bert"])
def test_num_parameters_with_tied_embeddings_and_modules_to_save_as_peft(case):
    """GPT-2 ties lm_head to wte (counted once, excluded with it); BERT has three embeddings and a classifier
    copy (modules_to_save: PEFT counts the original and the copy)."""
    from conftest import tiny_bert, tiny_gpt2

    factory, kw = {"gpt2": (tiny_gpt2, dict(target_modules=["c_attn"])),
                   "bert": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"]))}[case]
    x = text_inputs(factory(), labels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fan_in_fan_out notes
        m = vera_fx.transform(factory(), vera_fx.VeraConfig(r=4, **kw), example_inputs=x)
        pm = peft.get_peft_model(factory(), peft.VeraConfig(r=4, **kw))
    for flags in [(False, False), (False, True), (True, False), (True, True)]:
        assert m.num_parameters(*flags) == pm.num_parameters(*flags), flags


def test_embeddings_are_the_model_s_modules(pair):
    m, pm, x = pair
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert emb is m.base_model.model.embed_tokens and head is m.base_model.lm_head
    assert type(emb) is type(pm.get_input_embeddings()) and type(head) is type(pm.get_output_embeddings())
    assert torch.equal(emb.weight, pm.get_input_embeddings().weight)
    before = logits(m.eval(), x)
    with torch.no_grad():
        emb.weight.mul_(2)  # the graphs share the weight's storage
    assert not torch.allclose(logits(m, x), before)
    m.to(torch.float64)  # the graphs now hold converted copies; the model's module keeps its own tensors
    assert m.get_input_embeddings() is emb and emb.weight.dtype == torch.float32
    assert logits(m, x).dtype == torch.float64


def test_input_require_grads_is_a_no_op_and_training_is_unchanged(caplog):
    x = text_inputs(tiny_llama())
    steps = []
    for call in (False, True):
        m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS), example_inputs=x)
        m.train()
        if call:
            with caplog.at_level("DEBUG", logger="vera_fx.surface"):
                m.enable_input_require_grads()
            assert any("enable_input_require_grads" in r.getMessage() for r in caplog.records)
        m(**x).loss.backward()
        steps.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
        if call:
            m.disable_input_require_grads()
    assert all(torch.equal(a, b) for a, b in zip(*steps)) and len(steps[0]) == len(steps[1]) > 0
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS))
    pm.enable_input_require_grads()  # PEFT accepts both too
    pm.disable_input_require_grads()


def test_active_peft_config_like_peft(pair):
    m, pm, _ = pair
    assert m.active_peft_config is m.peft_config["default"]
    assert m.active_peft_config.r == pm.active_peft_config.r and m.active_peft_config.peft_type == "VERA"
    m.add_adapter("other", vera_fx.VeraConfig(r=4, target_modules=TARGETS))
    pm.add_adapter("other", peft.VeraConfig(r=4, target_modules=TARGETS))
    m.set_adapter("other")
    pm.set_adapter("other")
    assert m.active_peft_config.r == pm.active_peft_config.r == 4
    m.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="not one"):
        m.active_peft_config


def test_user_mistakes_get_named_errors(tmp_path, caplog):
    """A PEFT model given to transform, a save with no adapter left, and BERT's SEQ_CLS task type (PEFT adds
    'classifier' and 'score' to modules_to_save; BERT has no 'score': no warning, as PEFT)."""
    from conftest import tiny_bert

    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"PEFT model \(PeftModel\).*get_base_model\(\)"):
        vera_fx.transform(pm, vera_fx.VeraConfig(r=4))
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    m.delete_adapter("default")
    with pytest.raises(ValueError, match="has no adapter to save"):
        m.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with caplog.at_level("WARNING", logger="vera_fx"):
        b = vera_fx.transform(tiny_bert(), vera_fx.VeraConfig(r=4, task_type="SEQ_CLS", target_modules=["query"]))
    assert "classifier" in b.peft_config["default"].modules_to_save
    assert not [r for r in caplog.records if "modules_to_save" in r.getMessage()]
