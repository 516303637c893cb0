"""VeraConfig / PveraConfig: PEFT's fields and defaults, validation errors, dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import vera_fx
from vera_fx.config import as_config, config_from_dict, config_to_dict
from vera_fx.methods import method_for


def _peft_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


@pytest.mark.parametrize("ours, theirs", [("VeraConfig", "VeraConfig"), ("PveraConfig", "PveraConfig")])
def test_fields_and_defaults_match_peft(ours, theirs):
    peft = pytest.importorskip("peft")
    ref = _peft_defaults(getattr(peft, theirs))
    mine = _peft_defaults(getattr(vera_fx, ours))
    method_fields = {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "pvera_dropout",
                     "d_initial", "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform",
                     "layers_pattern", "sample_at_inference", "generator_seed"}
    expected = {k: v for k, v in ref.items() if k in method_fields}
    assert expected, "peft's config lost its fields"
    for name, value in expected.items():
        assert name in mine, f"missing field {name}"
        assert mine[name] == value, f"{name}: ours {mine[name]!r}, peft {value!r}"
    assert vera_fx.VeraConfig().r == 256 and vera_fx.VeraConfig().d_initial == 0.1


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": -4}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
    ({"vera_dropout": 1.0}, "vera_dropout"), ({"vera_dropout": -0.1}, "vera_dropout"),
    ({"bias": "some"}, "bias"), ({"bias": "pvera_only"}, "bias"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": [""]}, "target_modules"),
    ({"target_modules": "q_proj("}, "target_modules"), ({"target_modules": 3}, "target_modules"),
    ({"projection_prng_key": "seed"}, "projection_prng_key"), ({"d_initial": "big"}, "d_initial"),
    ({"save_projection": "yes"}, "save_projection"), ({"init_weights": 1}, "init_weights"),
    ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"layers_to_transform": -1}, "layers_to_transform"), ({"layers_to_transform": [0, "1"]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"layers_pattern": 5, "layers_to_transform": 0}, "layers_pattern"),
])
def test_vera_config_errors_name_field_and_value(kwargs, field):
    with pytest.raises(ValueError) as err:
        vera_fx.VeraConfig(**kwargs)
    msg = str(err.value)
    assert field in msg
    assert repr(kwargs[field])[:10] in msg or str(kwargs[field])[:10] in msg


@pytest.mark.parametrize("kwargs, field", [
    ({"pvera_dropout": 1.5}, "pvera_dropout"), ({"bias": "vera_only"}, "bias"),
    ({"sample_at_inference": "yes"}, "sample_at_inference"), ({"sample_at_inference": {"a": 1}}, "sample_at_inference"),
    ({"generator_seed": 1.5}, "generator_seed"),
])
def test_pvera_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        vera_fx.PveraConfig(**kwargs)


def test_bias_error_lists_allowed_values():
    with pytest.raises(ValueError, match="'none', 'all', 'vera_only'"):
        vera_fx.VeraConfig(bias="lora_only")


def test_sets_are_normalised_and_dict_round_trip():
    cfg = vera_fx.VeraConfig(r=8, target_modules={"v_proj", "q_proj"}, layers_to_transform=(0, 1))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.layers_to_transform == [0, 1]
    data = config_to_dict(cfg)
    assert data["peft_type"] == "VERA" and data["r"] == 8
    assert config_from_dict(data) == cfg
    p = vera_fx.PveraConfig(r=4, sample_at_inference={"a.b": True}, generator_seed=3)
    assert config_from_dict(config_to_dict(p)) == p


def test_from_dict_errors():
    data = config_to_dict(vera_fx.VeraConfig(r=8))
    with pytest.raises(ValueError, match="unknown fields.*lora_alpha"):
        config_from_dict({**data, "lora_alpha": 16})
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        config_from_dict({**data, "peft_type": "LORA"})
    with pytest.raises(ValueError, match="JSON object"):
        config_from_dict([1, 2])
    with pytest.raises(ValueError, match="newer"):
        config_from_dict({**data, "vera_fx_version": 99})
    with pytest.raises(ValueError, match="exclude_modules"):
        config_from_dict({**data, "exclude_modules": ["lm_head"]})
    assert config_from_dict({**data, "exclude_modules": None, "target_parameters": []}).r == 8
    with pytest.raises(ValueError, match="r=0"):
        config_from_dict({**data, "r": 0})


# --- PEFT's PeftConfig fields and PEFT config objects -----------------------------------------------------------

def test_peft_fields_accepted_kept_and_keyword_only():
    cfg = vera_fx.VeraConfig(task_type="SEQ_CLS", inference_mode=False, base_model_name_or_path="org/model",
                             revision="v1", auto_mapping=None, peft_version="0.21.2")
    assert (cfg.task_type, cfg.inference_mode, cfg.base_model_name_or_path, cfg.revision, cfg.peft_version) == \
        ("SEQ_CLS", False, "org/model", "v1", "0.21.2")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # keyword-only: the method's own fields keep their positions
    assert vera_fx.VeraConfig(256, None, 0, True, 0.1, False, "none", None, True, None, None, 0.3).vera_dropout == 0.3


@pytest.mark.parametrize("field, value, words", [
    ("task_type", "SEQ_CLASSIFICATION", "task_type='SEQ_CLASSIFICATION' is invalid: expected None or one of"),
    ("inference_mode", "no", "inference_mode='no' is invalid"),
    ("revision", 3, "revision=3 is invalid: expected None or a string"),
    ("auto_mapping", ["x"], "auto_mapping=\\['x'\\] is invalid"),
])
def test_peft_fields_invalid(field, value, words):
    with pytest.raises(ValueError, match=words):
        vera_fx.PveraConfig(**{field: value})


def test_task_type_adds_its_heads_to_modules_to_save_as_peft():
    peft = pytest.importorskip("peft")
    from conftest import tiny_bert

    pm = peft.get_peft_model(tiny_bert(), peft.VeraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                          modules_to_save=["pooler"]))
    ours = vera_fx.VeraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", modules_to_save=["pooler"])
    assert ours.modules_to_save == list(pm.peft_config["default"].modules_to_save) == ["pooler", "classifier", "score"]
    assert vera_fx.VeraConfig(task_type="QUESTION_ANS").modules_to_save == ["qa_outputs"]
    assert vera_fx.VeraConfig(task_type="CAUSAL_LM").modules_to_save is None


def test_peft_config_object_is_converted_and_saved_as_peft_saves_it(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import text_inputs, tiny_bert

    kw = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", revision="main")
    x = text_inputs(tiny_bert(), labels=False)
    m = vera_fx.transform(tiny_bert(), peft.VeraConfig(**kw), example_inputs=x)
    assert isinstance(m.peft_config["default"], vera_fx.VeraConfig)
    pm = peft.get_peft_model(tiny_bert(), peft.VeraConfig(**kw))
    vera_fx.load_adapter_state_dict(m, peft.get_peft_model_state_dict(pm))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(**x).logits, pm.eval()(**x).logits, atol=1e-5, rtol=0)
    m.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT keeps target_modules as a set: its saved order follows the process's string hashing
    ours["target_modules"], theirs["target_modules"] = sorted(ours["target_modules"]), sorted(theirs["target_modules"])
    assert ours == theirs  # peft_version included: the PEFT config's own value is kept


def test_as_config_refuses_other_objects_by_name():
    peft = pytest.importorskip("peft")
    with pytest.raises(TypeError, match="peft.tuners.lora.config.LoraConfig \\(peft_type='LORA'\\): vera_fx adds VeRA "
                                        "and PVeRA adapters only; pass vera_fx.VeraConfig"):
        as_config(peft.LoraConfig())
    with pytest.raises(TypeError, match="config must be a vera_fx.VeraConfig .* got builtins.dict"):
        as_config({"r": 4})
    with pytest.raises(TypeError, match="a PEFT config is converted by vera_fx.transform"):
        method_for(peft.VeraConfig())
    cfg = vera_fx.PveraConfig(r=4)
    assert as_config(cfg) is cfg
    converted = as_config(peft.PveraConfig(r=4, target_modules={"b", "a"}, sample_at_inference=True))
    assert isinstance(converted, vera_fx.PveraConfig) and converted.target_modules == ["a", "b"]
    assert converted.sample_at_inference is True
