"""vera_fx.export: ExportedPrograms of adapted, merged and mixed-adapter graphs; save / load round trips;
running one where only torch and vera_fx/runtime.py are importable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vera_fx
from vera_fx.sites import graph_modules
from conftest import adapter_parameters, text_inputs, tiny_llama

RUNTIME = Path(vera_fx.__file__).parent / "runtime.py"


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def graph():
    model = tiny_llama()
    example = text_inputs(model, labels=False)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           example_inputs=example, adapter_name="a")
    vera_fx.add_adapter(gm, "b", vera_fx.VeraConfig(r=4, target_modules=["q_proj"]))
    randomise(gm.vera_fx_adapters.a.sites, 1)
    randomise(gm.vera_fx_adapters.b.sites, 2)
    return gm.eval(), example, text_inputs(model, batch=4, length=5, labels=False)


def round_trip(ep, path):
    torch.export.save(ep, path)
    return torch.export.load(path).module()


def test_adapted_merged_and_mixed_round_trip(graph, tmp_path):
    gm, example, x = graph
    paths = lambda: sorted(str((n.meta.get("vera_fx") or {}).get("path")) for g in graph_modules(gm.graph_module)
                           for n in g.graph.nodes if (n.meta.get("vera_fx") or {}).get("path"))
    before = paths()
    assert "weight" in before  # the training graph's own lowering ...
    with torch.no_grad():
        want = gm(**x).logits
        ep = vera_fx.export(gm, example)
        # ... is left out of the program (plain nodes: torch + runtime)
        assert not any(k in str(ep.graph) for k in ("lean_add", "weight_site", "weight_fold", "FoldedLinear"))
        assert paths() == before  # and restored on the graph
        loaded = round_trip(ep, tmp_path / "adapted.pt2")
        torch.testing.assert_close(loaded(**x)["logits"], want, atol=1e-5, rtol=0)  # other batch and length

        names = ["b", "__base__", "a", "b"]
        mixed_want = vera_fx.mixed_adapter_forward(gm, names, **x).logits
        ep = vera_fx.export(gm, example, adapter_names=["a", "b", "__base__"])
        loaded = round_trip(ep, tmp_path / "mixed.pt2")
        got = loaded(**x, vera_fx_adapter_index=vera_fx.adapter_index(gm, names))["logits"]
        torch.testing.assert_close(got, mixed_want, atol=1e-5, rtol=0)

        vera_fx.merge(gm)
        try:
            ep = vera_fx.export(gm, example)
            assert not [n for n in ep.graph.nodes if n.op == "placeholder" and "lambda" in n.name and n.users]
            loaded = round_trip(ep, tmp_path / "merged.pt2")
            torch.testing.assert_close(loaded(**x)["logits"], want, atol=1e-4, rtol=0)
        finally:
            vera_fx.unmerge(gm)


def test_export_errors(graph):
    gm, example, _ = graph
    with pytest.raises(TypeError, match="example_inputs must be a dict"):
        vera_fx.export(gm, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="has 2 names but the example batch has 3 rows"):
        vera_fx.export(gm, example, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match=r"not loaded: \['c'\]"):
        vera_fx.export(gm, example, adapter_names=["a", "c", "a"])


def test_pvera_sampling_program_runs_with_torch_and_runtime_only(tmp_path):
    """A seeded PVeRA graph sampling in eval, exported, runs in a process where vera_fx (but runtime.py),
    transformers, safetensors and peft cannot be imported, and draws the same noise as the graph."""
    model = tiny_llama()
    example = text_inputs(model, labels=False)
    gm = vera_fx.transform(model, vera_fx.PveraConfig(r=4, target_modules=["q_proj"], generator_seed=5),
                           example_inputs=example).eval()
    randomise(gm.vera_fx_adapters.default.sites, 3)
    vera_fx.set_sample_at_inference(gm, True)
    with torch.no_grad():
        first = gm(**example).logits
        assert not torch.allclose(first, gm(**example).logits)  # it samples
    vera_fx.sampling.reseed(gm)
    ep = vera_fx.export(gm, example)
    torch.export.save(ep, tmp_path / "pvera.pt2")
    torch.save({"inputs": example, "want": first}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("vera_fx", "transformers", "safetensors", "peft"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        spec = importlib.util.spec_from_file_location("vera_fx_runtime", {str(RUNTIME)!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        program = torch.export.load({str(tmp_path / "pvera.pt2")!r}).module()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = program(**io["inputs"])["logits"]
        torch.testing.assert_close(got, io["want"], atol=1e-5, rtol=0)
        assert not any(m.split(".")[0] in ("vera_fx", "transformers") for m in sys.modules)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
