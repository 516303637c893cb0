"""vera_fx/compat.py on the running torch: the tested-range check (faked versions, and `import vera_fx` on a
torch newer than the range) and every private torch / bitsandbytes name it wraps still meaning what the library
relies on. scripts/test-torch.sh VERSION runs this file on each supported release."""

from __future__ import annotations

import copy
import importlib
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, symbolic_trace

from vera_fx import compat

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- versions

@pytest.mark.parametrize("version, release", [("2.15.0+cu130", (2, 15)), ("2.13.0+cpu", (2, 13)),
                                              ("2.16.0.dev20260101", (2, 16)), ("10.0", (10, 0))])
def test_torch_release_reads_major_minor(version: str, release: tuple[int, int]) -> None:
    assert compat.torch_release(version) == release


def test_torch_release_refuses_a_string_without_major_minor() -> None:
    with pytest.raises(ValueError, match=r"torch version 'nightly' does not start with MAJOR.MINOR.*torch.__version__"):
        compat.torch_release("nightly")


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.14.1", "2.15.0+cu130"])
def test_tested_releases_need_no_warning(version: str) -> None:
    assert compat.untested_torch_message(version) is None


@pytest.mark.parametrize("version, side", [("2.16.0+cu130", "newer"), ("3.0.0", "newer"), ("2.12.1", "older")])
def test_untested_release_message_names_the_range_and_the_script(version: str, side: str) -> None:
    message = compat.untested_torch_message(version)
    assert message is not None
    assert "tested on torch 2.13 to 2.15" in message and f"torch {version} is {side}" in message
    assert f"scripts/test-torch.sh {version.split('+')[0]} " in message


def test_warn_if_untested_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vera_fx.compat"):
        assert compat.warn_if_untested("2.16.0") is True
        assert compat.warn_if_untested("2.15.0") is False
    assert [(r.levelno, "2.16.0 is newer" in r.getMessage()) for r in caplog.records] == [(logging.WARNING, True)]


def test_running_torch_is_in_the_tested_range() -> None:
    """The suite passing on a release is what puts it in the range: update TESTED_TORCH and the pin together."""
    assert compat.untested_torch_message(torch.__version__) is None, (
        f"torch {torch.__version__} runs this suite but is outside compat.TESTED_TORCH {compat.TESTED_TORCH}")


def test_tested_range_is_pyproject_pin() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"torch\s*[<>=]", d))
    low = re.search(r">=\s*(\d+)\.(\d+)", pin)
    high = re.search(r"<\s*(\d+)\.(\d+)", pin)
    assert low and high, f"the torch pin {pin!r} should be '>=A.B,<C.D'"
    assert (int(low[1]), int(low[2])) == compat.TESTED_TORCH[0]
    assert (int(high[1]), int(high[2]) - 1) == compat.TESTED_TORCH[1]


def _import_vera_fx(version_line: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    # the warning comes when the library first loads (vera_fx.transform), not at the torch-free import
    code = f"import torch\n{version_line}\nimport vera_fx\nvera_fx.transform\nprint(vera_fx.VeraConfig(r=4).r)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_import_on_a_newer_torch_works_and_warns_once() -> None:
    done = _import_vera_fx("torch.__version__ = '2.99.0+cu130'")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
    warnings = [line for line in done.stderr.splitlines() if "tested on torch" in line]
    assert len(warnings) == 1 and "torch 2.99.0+cu130 is newer" in warnings[0], done.stderr


def test_import_on_the_running_torch_does_not_warn() -> None:
    done = _import_vera_fx("")
    assert done.returncode == 0, done.stderr
    assert "tested on torch" not in done.stderr


# --------------------------------------------------------------------------------------------- torch.fx

class _KeywordNet(nn.Module):
    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x * scale


def test_pytree_is_the_module_export_flattens_with() -> None:
    ep = torch.export.export(_KeywordNet(), (torch.ones(2),), {"scale": torch.ones(2)}, strict=False)
    spec = ep.call_spec.in_spec
    assert isinstance(spec, compat.pytree.TreeSpec)
    args, kwargs = compat.pytree.tree_unflatten([1, 2], spec)
    assert args == (1,) and kwargs == {"scale": 2}


def test_copy_codegen_and_add_keyword_input_extend_an_exported_signature() -> None:
    """The mixed-adapter graph's recipe: copy an exported graph, add a keyword placeholder, call with it."""
    gm = torch.export.export(_KeywordNet(), (torch.ones(2),), {"scale": torch.ones(2)}, strict=False).module()
    graph = torch.fx.Graph()
    compat.copy_codegen(gm.graph, graph)
    env: dict = {}
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    extra = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out = graph.call_function(torch.add, (env[n.args[0][0]], extra))
            graph.output([out])
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n is last:
            extra = graph.placeholder("offset")
    compat.add_keyword_input(graph, "offset")
    new = GraphModule(gm, graph)
    out = new(torch.full((2,), 3.0), scale=torch.full((2,), 2.0), offset=torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 7.0))
    assert gm.graph._codegen is not graph._codegen  # a copy: the source graph's signature is unchanged
    with pytest.raises((TypeError, ValueError), match="offset"):  # the source's signature does not take it
        gm(torch.ones(2), scale=torch.ones(2), offset=torch.ones(2))


def test_add_keyword_input_leaves_a_positional_graph_alone() -> None:
    gm = symbolic_trace(nn.Linear(2, 2))
    before = gm.graph.python_code("self").src
    compat.add_keyword_input(gm.graph, "offset")
    assert gm.graph.python_code("self").src == before


def test_register_deepcopy_hook_runs_on_each_copy() -> None:
    gm = symbolic_trace(nn.Linear(2, 2))
    seen: list[GraphModule] = []
    compat.register_deepcopy_hook(gm, seen.append)
    twin = copy.deepcopy(gm)
    assert len(seen) == 1 and seen[0] is twin


def test_operator_classes() -> None:
    assert isinstance(torch.ops.aten.add.Tensor, compat.OpOverload)
    assert isinstance(torch.ops.aten.add, compat.OpOverloadPacket)
    assert isinstance(torch.ops.higher_order.cond, compat.HigherOrderOperator)


def test_export_notes_logger_is_a_torch_module() -> None:
    """The logger blocks.py quietens is named after its module: it must still exist."""
    assert importlib.import_module(compat.EXPORT_NOTES_LOGGER).__name__ == compat.EXPORT_NOTES_LOGGER


# --------------------------------------------------------------------------------------------- autograd

def test_saved_tensors_hooks_active_only_inside_hooks() -> None:
    assert compat.saved_tensors_hooks_active() is False
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert compat.saved_tensors_hooks_active() is True
    assert compat.saved_tensors_hooks_active() is False


def test_backward_running_only_inside_backward() -> None:
    x = torch.ones(2, requires_grad=True)
    seen: list[bool] = []
    y = x * 2
    y.register_hook(lambda g: seen.append(compat.backward_running()))
    y.sum().backward()
    assert seen == [True] and compat.backward_running() is False


# --------------------------------------------------------------------------------------------- nn.Module

def test_copy_forward_hook_keeps_kwargs_and_always_call() -> None:
    source, target = nn.Linear(2, 2), nn.Linear(2, 2)
    calls: list[tuple] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        calls.append((module, sorted(kwargs)))

    handle = source.register_forward_hook(hook, with_kwargs=True, always_call=True)
    compat.copy_forward_hook(source, target, handle.id)
    target(input=torch.ones(2))
    assert calls == [(target, ["input"])]
    with pytest.raises(RuntimeError):  # always_call: the hook runs also when the forward fails
        target(input=torch.ones(3))
    assert calls[1:] == [(target, ["input"])]


def test_set_compiled_call_routes_calls_and_call_impl_bypasses_it() -> None:
    layer = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    calls: list[nn.Module] = []

    def shared(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        calls.append(module)
        return compat.call_impl(module, *args)

    compat.set_compiled_call(layer, shared)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert calls == [layer]


def test_incompatible_keys_is_what_load_state_dict_returns() -> None:
    result = nn.Linear(2, 2).load_state_dict(nn.Linear(2, 2).state_dict())
    assert type(result) is compat.IncompatibleKeys
    assert compat.IncompatibleKeys(["a"], []).missing_keys == ["a"]


# --------------------------------------------------------------------------------------------- bitsandbytes

def _packed_4bit_layer():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(nn.Linear(64, 64, bias=False).state_dict())
    layer = layer.to("cpu").eval()
    data, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True  # bnb's default on a CPU with AVX512-BF16
    with torch.no_grad():
        layer(torch.randn(2, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not pack 4-bit weights here")
    return layer, data, state


def test_unpack_cpu_4bit_restores_the_canonical_weight() -> None:
    layer, data, state = _packed_4bit_layer()
    unpacked, restored = compat.unpack_cpu_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(unpacked.reshape(data.shape), data)
    assert tuple(restored.shape) == tuple(state.shape)


def test_unpack_cpu_4bit_without_bnb_inverse_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    monkeypatch.delattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse")
    with pytest.raises(TypeError, match="no _convert_weight_packed_for_cpu_inverse.*cannot be unpacked"):
        compat.unpack_cpu_4bit(torch.zeros(2, dtype=torch.uint8), None)
