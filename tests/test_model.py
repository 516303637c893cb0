"""The object transform returns (vera_fx/model.py): any call the model takes, one shared adapter state, mixed
precision, .to(), the model surface. PEFT is the oracle wherever it has the feature."""

from __future__ import annotations

import copy
import logging
import pickle
import warnings

import pytest
import torch

import vera_fx
from conftest import peft_pair, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

LLAMA_KW = dict(target_modules=["q_proj", "v_proj", "down_proj"])


def pair(model, kw, r=8, seed=5, max_graphs=8):
    """(ours, PEFT's) on ``model`` with the same random lambdas."""
    return peft_pair(model, kw, r=r, seed=seed, max_graphs=max_graphs)


@pytest.fixture(scope="module")
def llama_pair():
    model = tiny_llama()
    ours, pm = pair(model, LLAMA_KW, max_graphs=16)  # every keyword test below adds a signature
    return model, ours.eval(), pm.eval()


def _ids(batch=3, length=7, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


CALLS = {
    "labels": lambda ids: dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids),
    "labels=None": lambda ids: dict(input_ids=ids, labels=None),
    "input_ids only": lambda ids: dict(input_ids=ids),
    "positional": lambda ids: ids,
    "position_ids": lambda ids: dict(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids) + 3),
    "use_cache=True": lambda ids: dict(input_ids=ids, use_cache=True),
    "bool mask": lambda ids: dict(input_ids=ids, attention_mask=_padded(ids).bool()),
    "int32 mask": lambda ids: dict(input_ids=ids, attention_mask=_padded(ids).to(torch.int32)),
    "float mask": lambda ids: dict(input_ids=ids, attention_mask=_padded(ids).float()),
}


def _padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the first row
    return mask


@pytest.mark.parametrize("name", list(CALLS))
def test_calls_the_eager_model_takes_give_peft_outputs(llama_pair, name):
    model, ours, pm = llama_pair
    ids = _ids()
    call = CALLS[name](ids)
    with torch.no_grad():
        out = ours(call) if name == "positional" else ours(**call)
        ref = pm(call) if name == "positional" else pm(**call)
    _close(out.logits, ref.logits)
    if ref.loss is not None:
        _close(out.loss, ref.loss)
    else:
        assert out.loss is None
    if name == "use_cache=True":
        assert out.past_key_values is None  # no KV cache through the graph (said in the log)


def test_output_hidden_states_return_dict_and_inputs_embeds(llama_pair):
    model, ours, pm = llama_pair
    ids = _ids()
    with torch.no_grad():
        out = ours(input_ids=ids, output_hidden_states=True)
        ref = pm(input_ids=ids, output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for a, b in zip(out.hidden_states, ref.hidden_states):
            _close(a, b)
        tup = ours(input_ids=ids, labels=ids, return_dict=False)
        ref_tup = pm(input_ids=ids, labels=ids, return_dict=False)
        assert isinstance(tup, tuple)
        _close(tup[0], ref_tup[0])
        _close(tup[1], ref_tup[1])
        emb = model.get_input_embeddings()(ids)
        _close(ours(inputs_embeds=emb).logits, pm(inputs_embeds=emb).logits)


def test_a_signature_is_captured_once_and_logged(caplog):
    model = tiny_llama()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, **LLAMA_KW))
    assert ours.num_graphs == 1
    ids = _ids()
    with caplog.at_level(logging.INFO, logger="vera_fx.model"):
        ours(input_ids=ids)
        ours(input_ids=_ids(2, 5, seed=3))  # other sizes: same signature
        ours(input_ids=ids, labels=ids)  # the transform's own signature
    captures = [r.getMessage() for r in caplog.records if "capturing a graph" in r.getMessage()]
    assert len(captures) == 1 and "input_ids: int64[2d]" in captures[0] and "labels" not in captures[0]
    assert ours.num_graphs == 2 and len(ours.signatures()) == 2


def test_a_model_configured_without_cache_takes_calls_from_a_keyword_example():
    """config.use_cache=False: the example still gets use_cache=False, as every call of the object does (the
    graph refused each call with 'unexpected: use_cache' before)."""
    model = tiny_llama(use_cache=False)
    ids = _ids()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, **LLAMA_KW), example_inputs={"input_ids": ids})
    torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits)  # lambdas start at zero
    assert ours.num_graphs == 1


def test_every_graph_shares_the_adapter_state():
    model = tiny_llama()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, **LLAMA_KW)).train()
    ids = _ids()
    ours(input_ids=ids)  # a second graph (no labels)
    first, second = list(ours.graphs.values())
    assert first.vera_fx_adapters is second.vera_fx_adapters
    name = "model.layers.0.self_attn.q_proj.weight"
    assert first.get_parameter(name) is second.get_parameter(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in first.parameters())
    # A step through the no-labels graph changes what the labels graph computes.
    before = ours(input_ids=ids, labels=ids).loss.detach()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    ours(input_ids=ids).logits.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(ours(input_ids=ids, labels=ids).loss.detach(), before)


def test_switches_and_merge_apply_to_every_graph():
    model = tiny_llama()
    ours, pm = pair(model, LLAMA_KW)
    ours.eval()
    pm.eval()
    ids = _ids()
    with torch.no_grad():
        ref_labels, ref_plain = pm(input_ids=ids, labels=ids).logits, pm(input_ids=ids).logits
        _close(ours(input_ids=ids).logits, ref_plain)  # captures the second graph
        with vera_fx.disable_adapters(ours):
            _close(ours(input_ids=ids).logits, model(input_ids=ids).logits)
            _close(ours(input_ids=ids, labels=ids).logits, model(input_ids=ids).logits)
        _close(ours(input_ids=ids).logits, ref_plain)
        vera_fx.merge(ours)
        _close(ours(input_ids=ids).logits, ref_plain)
        _close(ours(input_ids=ids, labels=ids).logits, ref_labels)
        assert not any("vera_fx" in str(n.meta) for g in ours.graphs.values() for n in g.graph.nodes
                       if n.op == "call_function" and "lambda" in n.name)
        vera_fx.unmerge(ours)
        vera_fx.add_adapter(ours, "other", vera_fx.VeraConfig(r=4, **LLAMA_KW))
        vera_fx.set_adapter(ours, "other")  # zero lambda_b: the base model
        _close(ours(input_ids=ids).logits, model(input_ids=ids).logits)
        assert ours.num_graphs == 2  # switching rebuilt graphs, it did not capture


def test_max_graphs_bounds_the_cache():
    model = tiny_llama()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4, **LLAMA_KW), max_graphs=2)
    ids = _ids()
    with pytest.warns(UserWarning, match=r"max_graphs=2.*least recently used"):  # once, at the first eviction
        ours(input_ids=ids)
        ours(input_ids=ids, labels=ids)
        assert ours(input_ids=ids, output_hidden_states=True).hidden_states is not None
    assert ours.num_graphs == 2 and ours.graph_module in ours.graphs.values()  # the source and the last one
    assert any("output_hidden_states" in str(k) for k in ours.graphs)
    with pytest.raises(ValueError, match="max_graphs=0"):
        vera_fx.transform(model, vera_fx.VeraConfig(r=4), max_graphs=0)


def test_bad_calls_say_what_to_change(llama_pair):
    _, ours, _ = llama_pair
    ids = _ids()
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="past_key_values.*KV cache"):
        ours(input_ids=ids, past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        ours(ids, input_ids=ids)


def test_autocast_training_matches_peft():
    model = tiny_llama()
    ours, pm = pair(model, LLAMA_KW)
    ids = _ids()
    losses = {}
    for name, m in (("ours", ours), ("peft", pm)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0]
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["peft"]), atol=2e-2, rtol=1e-2)


def test_to_bfloat16_after_transform_matches_peft(llama_pair):
    model, ours, pm = llama_pair
    ours, pm16 = copy.deepcopy(ours), copy.deepcopy(pm)
    ours.to(torch.bfloat16)
    pm16.to(torch.bfloat16)
    ids = _ids()
    assert ours.dtype == torch.bfloat16 and model.dtype == torch.float32  # the user's model is not cast
    with torch.no_grad():
        out, ref = ours(input_ids=ids).logits, pm16(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    assert all("bfloat16" in s for s in ours.signatures())


def test_another_image_size_captures_for_it():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    model = Dinov2ForImageClassification(Dinov2Config(image_size=16, patch_size=4, hidden_size=32,
                                                      num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                                      num_labels=3)).eval()
    ours, pm = pair(model, dict(target_modules=["q_proj", "v_proj"]))
    ours.eval()
    pm.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in (16, 24, 16, 24):
            x = torch.randn(2, 3, size, size, generator=g)
            _close(ours(pixel_values=x).logits, pm(pixel_values=x).logits)
    assert ours.num_graphs == 3  # the transform's (with labels), and one per image size without labels


def test_model_surface(llama_pair, tmp_path, capsys):
    model, ours, pm = llama_pair
    assert ours.config is model.config
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    pm.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.strip().splitlines()
    assert mine == theirs
    assert ours.active_adapters == ["default"]
    assert "def forward" in ours.code and ours.graph is ours.graph_module.graph
    assert not ours.is_gradient_checkpointing
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(ours)
    twin = copy.deepcopy(ours)
    ids = _ids()
    with torch.no_grad():
        _close(twin(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_gradient_checkpointing_on_the_model_object():
    """m.gradient_checkpointing_enable checkpoints the blocks of every graph (also one captured later): fewer
    saved activations, the same gradients; disable undoes it; a model without blocks says so."""
    model = tiny_llama(num_hidden_layers=3)
    torch.manual_seed(0)
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=8, init_weights=False, **LLAMA_KW)).train()
    ids = _ids(batch=2, length=16)

    def step(**kw):
        with torch.no_grad():
            ours(input_ids=ids, labels=ids, **kw)  # a new signature is captured here, not under the hooks
        ours.zero_grad()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = ours(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        return sum(sizes), {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    plain, grads = step()
    pos = torch.arange(16).expand(2, 16)
    plain_other, grads_other = step(position_ids=pos)  # a second signature, captured now
    assert ours.num_graphs == 2 and not ours.is_gradient_checkpointing
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    for kw, base, ref in (({}, plain, grads), ({"position_ids": pos}, plain_other, grads_other)):
        saved, got = step(**kw)
        assert saved < 0.6 * base, (kw, saved, base)
        assert set(got) == set(ref)
        for k, g in ref.items():
            torch.testing.assert_close(got[k], g, atol=1e-6, rtol=1e-5)
    saved, _ = step(attention_mask=torch.ones_like(ids, dtype=torch.bool))  # captured while on: checkpointed too
    assert ours.num_graphs == 3 and saved < 0.6 * plain
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    assert step()[0] == plain
    flat = vera_fx.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), vera_fx.VeraConfig(r=2, target_modules=["0"]),
                             example_inputs=(torch.randn(2, 4),))
    with pytest.raises(ValueError, match="no blocks"):
        flat.gradient_checkpointing_enable()


def test_save_pretrained_loads_in_peft_and_merge_and_unload(llama_pair, tmp_path):
    model, ours, pm = llama_pair
    ours.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        ref = ours(input_ids=ids).logits
        _close(loaded(input_ids=ids).logits, ref)
        back = vera_fx.from_pretrained(model, tmp_path / "adapter")
        assert isinstance(back, vera_fx.VeraFxModel)
        _close(back.eval()(input_ids=ids).logits, ref)
        merged = copy.deepcopy(ours)
        base = copy.deepcopy(model)
        merged.__dict__["_base_model"] = base
        assert merged.merge_and_unload() is base
        _close(base(input_ids=ids).logits, ref)


def test_state_dict_holds_the_adapters_only(llama_pair):
    model, ours, pm = llama_pair
    sd = ours.state_dict()
    theirs = peft.get_peft_model_state_dict(pm)
    tensors = {k[len("vera_fx.default."):]: v for k, v in sd.items() if k.startswith("vera_fx.default.")}
    assert set(tensors) == set(theirs)
    assert set(sd) - {f"vera_fx.default.{k}" for k in theirs} == {"vera_fx_config.default"}
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.zero_()
    result = twin.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), sd.values()))
    with pytest.raises(ValueError, match="unexpected.*nope"):
        twin.load_state_dict({**sd, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        twin.load_state_dict({})


def test_deleting_the_active_adapter_activates_another(llama_pair):
    model = tiny_gpt2()
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=4))
    vera_fx.add_adapter(ours, "b", vera_fx.VeraConfig(r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4))
        pm.add_adapter("b", peft.VeraConfig(r=4))
        pm.delete_adapter("default")
    with pytest.warns(UserWarning, match="'default' was active.*now 'b'"):
        vera_fx.delete_adapter(ours, "default")
    assert ours.active_adapters == pm.active_adapters == ["b"]
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_transform_raises_our_errors_directly():
    with pytest.raises(ValueError) as info:
        vera_fx.transform(tiny_bert(), vera_fx.VeraConfig(r=4, modules_to_save=["scorer"]))
    assert type(info.value) is ValueError and info.value.__suppress_context__
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vera_fx.transform("gpt2", vera_fx.VeraConfig(r=4))  # type: ignore[arg-type]


def test_module_functions_take_the_object(llama_pair):
    _, ours, _ = llama_pair
    assert "q_proj" in vera_fx.summary(ours)
    assert vera_fx.trainable_parameters(ours) == ours.get_nb_trainable_parameters()
    assert set(vera_fx.adapter_state_dict(ours)) == set(vera_fx.adapter_state_dict(ours.graph_module))
    with pytest.raises(TypeError, match="vera_fx.transform returns.*GraphModule"):
        vera_fx.summary(torch.nn.Linear(2, 2))
