"""The error paths of the object's call signatures (vera_fx/signatures.py) and its adapter-only state dict and
Trainer checkpoints (vera_fx/checkpoint.py): each refusal names the field and the fix, and changes nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vera_fx
from vera_fx.signatures import call_key, capture_example
from conftest import tiny_llama


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 16)
    return vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["0", "2"]), (x,)), x


def test_too_many_positional_arguments_are_refused(mlp):
    m, x = mlp
    with pytest.raises(TypeError, match=r"Sequential.forward takes 1 positional arguments \(\['input'\]\); 2 were"):
        m(x, x)


def test_an_input_that_is_no_tensor_or_constant_is_refused(mlp):
    m, x = mlp
    with pytest.raises(TypeError, match=r"input=dict cannot be an input of a captured graph: pass tensors"):
        m({"x": x})
    assert m.num_graphs == 1


def test_keys_and_capture_examples():
    call = {"b": torch.zeros(1, 1, 4), "a": True, "c": [1, 2]}
    key = call_key(call, (torch.float32, "cpu"))
    assert key[0] == (("a", "constant", True), ("b", "tensor", torch.float32, 3, "cpu"), ("c", "constant", (1, 2)))
    assert key[2] == (torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call_key(call, (torch.float32, "cpu"))[1] == (("cpu", torch.bfloat16),)
    assert capture_example(call)["b"].shape == (2, 2, 4)  # unit batch and sequence dims widened for export


def test_load_state_dict_refuses_a_dict_of_other_adapters_and_changes_nothing(mlp):
    m, _ = mlp
    sd = m.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    other = {k.replace("vera_fx.default.", "vera_fx.other."): v + 1 for k, v in sd.items() if k.startswith("vera_fx.")}
    with pytest.raises(ValueError, match=r"does not fit this model's adapters \['default'\]; missing: "
                                         r"\['vera_fx.default.\*'\], unexpected: \['vera_fx.other"):
        m.load_state_dict(other)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    result = m.load_state_dict(other, strict=False)  # not strict: reported, nothing loaded
    assert result.missing_keys == ["vera_fx.default.*"] and len(result.unexpected_keys) == len(other)


def test_a_checkpoint_without_adapters_or_with_an_unreadable_config_is_refused(tmp_path):
    (tmp_path / "none").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "none" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors holds no vera_fx adapter \(no vera_fx_config.\* entry\)"):
        vera_fx.from_pretrained(tiny_llama(), tmp_path / "none")
    (tmp_path / "bad").mkdir()
    save_file({"vera_fx_config.default": torch.tensor(list(b"{not json"), dtype=torch.uint8)},
              tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: the config of adapter 'default' is not valid JSON"):
        vera_fx.from_pretrained(tiny_llama(), tmp_path / "bad")
