"""``is_trainable`` of ``vera_fx.from_pretrained`` and ``VeraFxModel.load_adapter`` against PEFT's
``PeftModel.from_pretrained`` / ``load_adapter``: every adapter parameter's ``requires_grad``, the trainable and
total counts, the train / eval flag and the configs' ``inference_mode``, after each step of one flow."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import vera_fx
from conftest import text_inputs, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
OURS = re.compile(r"^(?P<pre>.*?)vera_fx_adapters\.(?P<adapter>[^.]+)\.sites\.(?P<site>.+)\.(?P<kind>vera_lambda_[bd])$")
PEFTS = re.compile(r"^base_model\.model\.(?P<site>.+)\.(?P<kind>vera_lambda_[bd])\.(?P<adapter>[^.]+)$")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two adapters saved by PEFT."""
    root = tmp_path_factory.mktemp("trainable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(("a", "b")):
            torch.manual_seed(10 + i)
            pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS))
            pm.save_pretrained(str(root / name))
    return {name: str(root / name) for name in ("a", "b")}


def _flags(model: torch.nn.Module, pattern: re.Pattern) -> dict[tuple[str, str, str], bool]:
    """(adapter, site, lambda) -> requires_grad of every adapter parameter."""
    out = {}
    for name, p in model.named_parameters():
        hit = pattern.match(name)
        if hit:
            site = hit.groupdict().get("pre", "") + hit["site"]
            out[(hit["adapter"], site, hit["kind"])] = p.requires_grad
    return out


def _same_as_peft(m: vera_fx.VeraFxModel, pm) -> None:
    ours, theirs = _flags(m, OURS), _flags(pm, PEFTS)
    assert ours == theirs and ours
    assert m.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert m.training == pm.training
    assert {k: c.inference_mode for k, c in m.peft_config.items()} == \
        {k: c.inference_mode for k, c in pm.peft_config.items()}
    assert m.active_adapters == pm.active_adapters


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_and_load_adapter_freeze_as_peft(folders, is_trainable):
    x = text_inputs(tiny_llama(), labels=False)
    # the base models come in training mode, so eval() by the loaders shows
    m = vera_fx.from_pretrained(tiny_llama().train(), folders["a"], example_inputs=x, is_trainable=is_trainable)
    pm = peft.PeftModel.from_pretrained(tiny_llama().train(), folders["a"], is_trainable=is_trainable)
    _same_as_peft(m, pm)
    assert m.get_nb_trainable_parameters()[0] == (128 if is_trainable else 0)
    for model in (m, pm):
        model.load_adapter(folders["b"], "task_b", is_trainable=is_trainable)
    _same_as_peft(m, pm)
    for model in (m, pm):  # the opposite setting for a third adapter: the others keep theirs
        model.load_adapter(folders["b"], "task_c", is_trainable=not is_trainable)
    _same_as_peft(m, pm)
    for model in (m, pm):  # set_adapter trains the active adapter only, as in PEFT
        model.set_adapter("task_b")
    _same_as_peft(m, pm)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(**x).logits, pm.eval()(**x).logits, atol=1e-5, rtol=0)


def test_load_adapter_on_a_fresh_model_as_peft(folders):
    for is_trainable in (False, True):
        m = vera_fx.transform(tiny_llama().train(), vera_fx.VeraConfig(r=8, target_modules=TARGETS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(tiny_llama().train(), peft.VeraConfig(r=8, target_modules=TARGETS))
        for model in (m, pm):
            model.load_adapter(folders["b"], "task_b", is_trainable=is_trainable)
        _same_as_peft(m, pm)


def test_trainer_checkpoint_loads_frozen_unless_trainable(tmp_path):
    from safetensors.torch import save_file

    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    m.add_adapter("other", vera_fx.VeraConfig(r=8, target_modules=["q_proj"]))
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    frozen = vera_fx.from_pretrained(tiny_llama().train(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    assert all(c.inference_mode for c in frozen.peft_config.values())
    trained = vera_fx.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert set(_flags(trained, OURS).values()) == {True} and trained.training
    assert not any(c.inference_mode for c in trained.peft_config.values())


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_is_trainable_must_be_a_bool(folders, bad):
    with pytest.raises(TypeError, match=r"is_trainable=.* must be True or False"):
        vera_fx.from_pretrained(tiny_llama(), folders["a"], is_trainable=bad)
    m = vera_fx.transform(tiny_llama().train(), vera_fx.VeraConfig(r=8, target_modules=TARGETS))
    with pytest.raises(TypeError, match=r"is_trainable=.* must be True or False"):
        m.load_adapter(folders["b"], "task_b", is_trainable=bad)
    assert list(m.peft_config) == ["default"] and m.training  # nothing loaded, mode unchanged


def test_set_requires_grad_as_peft(folders):
    m = vera_fx.from_pretrained(tiny_llama(), folders["a"])
    pm = peft.PeftModel.from_pretrained(tiny_llama(), folders["a"])
    for model in (m, pm):
        model.load_adapter(folders["b"], "task_b")
        model.set_requires_grad(["default", "task_b"])
    _same_as_peft(m, pm)
    for model in (m, pm):
        model.set_requires_grad("task_b", requires_grad=False)
    _same_as_peft(m, pm)
    with pytest.raises(ValueError, match=r"\['nope'\] are not adapters of this model"):
        m.set_requires_grad(["default", "nope"])
    with pytest.raises(TypeError, match="requires_grad=1 must be True or False"):
        m.set_requires_grad("default", 1)
    _same_as_peft(m, pm)  # nothing changed by the refused calls
