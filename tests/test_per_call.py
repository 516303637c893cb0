"""The per-call cache (vera_fx/variants.py ``_ready_graph``, the lock's version in vera_fx/versions.py): a call with
nothing changed reuses the graph the last call chose; every mutation path makes the next call choose again, and
that call computes the new state (compared with PEFT doing the same, or with the expected outputs)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import vera_fx
import vera_fx.state
from conftest import tiny_llama
from vera_fx.variants import INFERENCE_KEY, state_stamp
from vera_fx.versions import StateLock

peft = pytest.importorskip("peft")

QV = dict(r=8, target_modules=["q_proj", "v_proj"])


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.normal_(0, 0.5)


@pytest.fixture
def pair():
    """(ours, PEFT's): adapters ``default`` and ``other`` (q / v, r=8) with the same random lambdas; eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(**QV))
        pm.add_adapter("other", peft.VeraConfig(**QV))
    _randomise(pm, 5)
    ours = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(**QV))
    ours.add_adapter("other", vera_fx.VeraConfig(**QV))
    for name in ("default", "other"):
        vera_fx.load_adapter_state_dict(ours, peft.get_peft_model_state_dict(pm, adapter_name=name), name)
    return ours.eval(), pm.eval()


IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))


def _logits(m: torch.nn.Module) -> torch.Tensor:
    kw = {} if isinstance(m, vera_fx.VeraFxModel) else {"use_cache": False}
    return m(input_ids=IDS, **kw).logits


def _entries(ours: vera_fx.VeraFxModel) -> list[tuple]:
    """The per-call cache's entries: (state stamp, graph, graph run); a new choice is a new entry."""
    return list(ours._ready.values())


def _check_recomputed(ours, pm, change, grad: bool = False) -> None:
    """Warm the cache, apply ``change(ours, pm)``, call again: the call chose again (a new entry, made by the
    full check) and equals PEFT's output."""
    with torch.set_grad_enabled(grad):
        _logits(ours)
        before = _entries(ours)
        _logits(ours)
        assert len(before) == 1 and _entries(ours)[0] is before[0]  # nothing changed: the same choice
        change(ours, pm)
        got, want = _logits(ours), _logits(pm)
    assert not any(e is before[0] for e in _entries(ours))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _load_new_lambdas(ours, pm):
    _randomise(pm, 11)
    vera_fx.load_adapter_state_dict(ours, peft.get_peft_model_state_dict(pm, adapter_name="default"), "default")


def _delete_default(ours, pm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.delete_adapter("default")
    pm.set_adapter("other")  # what is left: ``other`` alone


def _merge(ours, pm):
    vera_fx.merge(ours)


def _merge_unmerge_switch(ours, pm):
    vera_fx.merge(ours)
    vera_fx.unmerge(ours)
    ours.set_adapter("other")
    pm.set_adapter("other")


def _add_then_set(ours, pm):
    cfg = dict(QV, target_modules=["q_proj"])
    ours.add_adapter("third", vera_fx.VeraConfig(**cfg))
    pm.add_adapter("third", peft.VeraConfig(**cfg))
    _randomise(pm, 13)
    for name in ("default", "other", "third"):
        vera_fx.load_adapter_state_dict(ours, peft.get_peft_model_state_dict(pm, adapter_name=name), name)
    ours.set_adapter("third")
    pm.set_adapter("third")


def _disable(ours, pm):
    ours.disable_adapter_layers()
    pm.disable_adapter_layers()


def _to_float64(ours, pm):
    ours.to(torch.float64)
    pm.to(torch.float64)


def _lowering(ours, pm):
    vera_fx.set_lowering(ours, "activation")


MUTATIONS = {"set_adapter": lambda o, p: (o.set_adapter("other"), p.set_adapter("other")),
             "load_adapter_state_dict": _load_new_lambdas, "delete_adapter": _delete_default, "merge": _merge,
             "merge, unmerge, set_adapter": _merge_unmerge_switch, "add_adapter, set_adapter": _add_then_set,
             "disable_adapter_layers": _disable, "to(float64)": _to_float64, "set_lowering": _lowering}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutation_invalidates_the_per_call_choice(pair, name):
    ours, pm = pair
    _check_recomputed(ours, pm, MUTATIONS[name])


def test_disable_adapter_context_invalidates_on_entry_and_exit(pair):
    ours, pm = pair
    with torch.no_grad():
        adapted = _logits(ours)
        with ours.disable_adapter():
            torch.testing.assert_close(_logits(ours), ours.base_model(input_ids=IDS).logits)
        torch.testing.assert_close(_logits(ours), adapted)
    assert len(ours._ready) == 1


def test_modes_choose_the_graph_again(pair):
    """train / eval, the adapters' own flag and grad mode choose between the training graph and the twin."""
    ours, pm = pair
    with torch.no_grad():
        _logits(ours)
    twin = ours._ready[next(iter(ours._ready))][2]
    assert INFERENCE_KEY in twin.meta
    ours.train()
    pm.train()
    torch.testing.assert_close(_logits(ours), _logits(pm), atol=1e-5, rtol=1e-5)  # with grad: the training graph
    gm = ours._ready[next(iter(ours._ready))][2]
    assert INFERENCE_KEY not in gm.meta and gm is ours._graphs[next(iter(ours._ready))][0]
    ours.eval()
    vera_fx.state.set_adapters_training(ours, True)  # PEFT's recipe: a model left in eval trains its adapters
    _logits(ours)
    assert ours._ready[next(iter(ours._ready))][2] is gm
    vera_fx.state.set_adapters_training(ours, False)
    _logits(ours)
    assert ours._ready[next(iter(ours._ready))][2] is twin
    with torch.no_grad():
        ours.train()
        pm.train()
        torch.testing.assert_close(_logits(ours), _logits(pm), atol=1e-5, rtol=1e-5)
    assert ours._ready[next(iter(ours._ready))][2] is twin  # no gradients: the twin in train mode too


def test_inference_form_change_builds_the_other_twin(pair):
    ours, pm = pair
    with torch.no_grad():
        _logits(ours)
        ours.inference_form = "batched"
        torch.testing.assert_close(_logits(ours), _logits(pm), atol=1e-5, rtol=1e-5)
    assert ours._ready[next(iter(ours._ready))][2].meta[INFERENCE_KEY] == "batched"


def test_pvera_sampling_switch_reaches_the_cached_graph():
    kw = dict(r=8, target_modules=["q_proj", "v_proj"])
    ours = vera_fx.transform(tiny_llama(), vera_fx.PveraConfig(**kw, generator_seed=3)).eval()
    _randomise(ours, 2)
    with torch.no_grad():
        mean = _logits(ours)
        torch.testing.assert_close(_logits(ours), mean)
        vera_fx.set_sample_at_inference(ours, True)
        assert not torch.allclose(_logits(ours), mean)
        vera_fx.set_sample_at_inference(ours, False)
        torch.testing.assert_close(_logits(ours), mean)


def test_lock_version_counts_finished_writes_only():
    lock = StateLock()
    with lock.read():
        with lock.read():
            pass
    assert lock.version == 0
    with lock.write():
        with lock.write(), lock.read():
            pass
        assert lock.version == 0  # still writing
    assert lock.version == 1
    with pytest.raises(RuntimeError, match="cannot change inside a forward"):
        with lock.read(), lock.write():
            pass
    assert lock.version == 1


def test_a_writer_waits_for_readers_and_bumps_the_stamp(pair):
    """A set_adapter from another thread waits for a running forward's read side, then the next call sees it."""
    ours, pm = pair
    lock = vera_fx.state.state_lock(ours)
    stamp = state_stamp(ours.graph_module)
    done = threading.Event()
    with lock.read():
        t = threading.Thread(target=lambda: (ours.set_adapter("other"), done.set()))
        t.start()
        assert not done.wait(0.2)  # blocked by this reader
    t.join(10)
    assert done.is_set() and state_stamp(ours.graph_module) != stamp
    pm.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours), _logits(pm), atol=1e-5, rtol=1e-5)
