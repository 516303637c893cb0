"""vera_fx.generate against PEFT's generate: left padding, greedy tokens, eos, sampling, PVeRA, training, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import vera_fx
from vera_fx.capture import SOURCE_MODEL_KEY, SourceModel
from vera_fx.generation import DecodeGraphs, cache_bucket
from conftest import peft_pair, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt

peft = pytest.importorskip("peft")

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "opt": (tiny_opt, dict(target_modules="all-linear")),
}


def _pair(arch, r=8, seed=5):
    """A model, its vera_fx graph and a PEFT model with the same random (non-zero) lambdas, in eval mode."""
    build, kw = CASES[arch]
    model = build()
    gm, pm = peft_pair(model, kw, r=r, seed=seed)
    return model, gm.eval(), pm.eval()


@pytest.fixture(scope="module")
def pairs():
    """One (model, graph, PEFT model) per architecture, shared by the tests that leave them as they were."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = _pair(arch)
        return made[arch]

    return get


def _left_padded(batch=3, length=7, pad=1, seed=3):
    """Prompts of lengths 4, 6 and 7 (left padding with ``pad``)."""
    ids = torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, pad), mask


def _hf(m, ids, mask, n, **kw):
    return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("arch", list(CASES))
def test_greedy_left_padded_matches_peft(arch, pairs):
    model, gm, pm = pairs(arch)
    ids, mask = _left_padded()
    ours = vera_fx.generate(gm, ids, mask, max_new_tokens=10, pad_token_id=1)
    theirs = _hf(pm, ids, mask, 10, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, _hf(model, ids, mask, 10, pad_token_id=1))  # the adapter changes the tokens


def test_greedy_equals_merged_model_and_merged_graph(pairs):
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    ours = vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1)
    baked = copy.deepcopy(model)
    vera_fx.merge_into(baked, gm)
    assert torch.equal(ours, _hf(baked, ids, mask, 8, pad_token_id=1))
    graphs = len(gm.meta["vera_fx_decode_graphs"].entries)
    vera_fx.merge(gm)  # merged weights, no adapter nodes: the decode graph follows without re-capture
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1), ours)
    vera_fx.unmerge(gm)
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1), ours)
    assert len(gm.meta["vera_fx_decode_graphs"].entries) == graphs


def test_eos_stops_and_pads_like_peft(pairs):
    model, gm, pm = pairs("gpt2")
    ids, mask = _left_padded()
    free = vera_fx.generate(gm, ids, mask, max_new_tokens=10, eos_token_id=[], pad_token_id=1)
    eos = int(free[1, ids.shape[1] + 2])  # row 1's third new token ends it there
    ours = vera_fx.generate(gm, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    theirs = _hf(pm, ids, mask, 10, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert (ours[1, ids.shape[1] + 3:] == 1).all()
    # Every row finishing stops generation early, as in transformers.
    first = [int(free[i, ids.shape[1]]) for i in range(3)]
    short = vera_fx.generate(gm, ids, mask, max_new_tokens=10, eos_token_id=first, pad_token_id=1)
    assert torch.equal(short, _hf(pm, ids, mask, 10, eos_token_id=first, pad_token_id=1))
    assert short.shape[1] == ids.shape[1] + 1


def test_seeded_sampling_is_reproducible(pairs):
    model, gm, pm = pairs("opt")
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[])
    a = vera_fx.generate(gm, ids, mask, seed=0, **kw)
    b = vera_fx.generate(gm, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    c = vera_fx.generate(gm, ids, mask, seed=1, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(7)
    d = vera_fx.generate(gm, ids, mask, **kw)
    torch.manual_seed(7)
    assert torch.equal(d, vera_fx.generate(gm, ids, mask, **kw))  # torch's global generator without a seed
    assert torch.equal(a[:, : ids.shape[1]], ids)


def test_pvera_sampled_generation_is_reproducible_per_sequence():
    model = tiny_llama()
    cfg = vera_fx.PveraConfig(r=8, target_modules=["q_proj", "v_proj"], generator_seed=0, init_weights=False)
    gm = vera_fx.transform(model, cfg).eval()
    ids = torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # one prompt x 3
    mean = vera_fx.generate(gm, ids, max_new_tokens=10, eos_token_id=[])
    assert (mean == mean[0]).all()  # sampling off: the mean path, equal rows
    vera_fx.set_sample_at_inference(gm, True)
    vera_fx.sampling.reseed(gm)
    a = vera_fx.generate(gm, ids, max_new_tokens=10, eos_token_id=[])
    assert not all(torch.equal(a[0], a[i]) for i in (1, 2))  # each sequence draws its own noise
    assert not torch.equal(vera_fx.generate(gm, ids, max_new_tokens=10, eos_token_id=[]), a)  # streams go on
    vera_fx.sampling.reseed(gm)  # back to generator_seed's streams, as in a fresh transform
    assert torch.equal(vera_fx.generate(gm, ids, max_new_tokens=10, eos_token_id=[]), a)
    vera_fx.set_sample_at_inference(gm, False)
    assert torch.equal(vera_fx.generate(gm, ids, max_new_tokens=10, eos_token_id=[]), mean)


def test_generation_follows_a_training_step_and_several_active_adapters():
    model, gm, pm = _pair("llama")
    ids, mask = _left_padded()
    before = vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1)
    entry = next(iter(gm.meta["vera_fx_decode_graphs"].entries.values())).graph
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    for m in (gm, pm):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=5.0)
        m.train()
        m(**batch).loss.backward()
        opt.step()
        m.eval()
    after = vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1)
    assert not torch.equal(after, before)
    assert torch.equal(after, _hf(pm, ids, mask, 8, pad_token_id=1))
    assert next(iter(gm.meta["vera_fx_decode_graphs"].entries.values())).graph is entry  # not re-captured

    # Several active adapters add up (as the merged model's weights do); one active adapter again after.
    vera_fx.add_adapter(gm, "other", vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                        init_weights=False))
    vera_fx.set_adapter(gm, ["default", "other"])
    both = vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1)
    assert not torch.equal(both, after)
    baked = copy.deepcopy(model)
    vera_fx.merge_into(baked, gm)
    assert torch.equal(both, _hf(baked, ids, mask, 8, pad_token_id=1))
    vera_fx.set_adapter(gm, "default")
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1), after)


def test_disable_adapters_generates_the_base_model(pairs):
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    with vera_fx.disable_adapters(gm):
        assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1),
                           _hf(model, ids, mask, 8, pad_token_id=1))
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1),
                       _hf(pm, ids, mask, 8, pad_token_id=1))


def test_decode_graphs_are_cached_by_bucket(pairs):
    model, gm, _ = pairs("gpt2")
    ids, mask = _left_padded()
    vera_fx.generate(gm, ids, mask, max_new_tokens=3)
    vera_fx.generate(gm, ids, mask, max_new_tokens=20)  # 27 positions: the same 64-position bucket
    graphs: DecodeGraphs = gm.meta["vera_fx_decode_graphs"]
    assert len(graphs.entries) == 1
    assert [cache_bucket(n) for n in (27, 64, 65, 97, 129, 544)] == [64, 64, 96, 128, 192, 768]
    assert len(copy.deepcopy(gm).meta["vera_fx_decode_graphs"].entries) == 0  # copies capture their own


def test_compiled_decode_matches_eager(pairs):
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    eager = vera_fx.generate(gm, ids, mask, max_new_tokens=5, pad_token_id=1)
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=5, pad_token_id=1, compile=True), eager)


def test_errors_name_the_problem(pairs):
    model, gm, _ = pairs("gpt2")
    ids, mask = _left_padded()
    with pytest.raises(TypeError, match="num_beams.*supported: input_ids, attention_mask, max_new_tokens"):
        vera_fx.generate(gm, ids, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        vera_fx.generate(gm, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask must be a tensor shaped like input_ids"):
        vera_fx.generate(gm, ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        vera_fx.generate(gm, ids.float())
    with pytest.raises(ValueError, match="temperature=0"):
        vera_fx.generate(gm, ids, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        vera_fx.generate(gm, ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="generator= or seed="):
        vera_fx.generate(gm, ids, do_sample=True, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="eos_token_id=-1"):
        vera_fx.generate(gm, ids, eos_token_id=-1)
    assert pickle.loads(pickle.dumps(SourceModel(model))).model is None  # a pickled graph forgets the model
    orphan = copy.deepcopy(gm)
    del orphan.meta[SOURCE_MODEL_KEY]
    with pytest.raises(ValueError, match="model=<that model>"):
        vera_fx.generate(orphan, ids)
    with pytest.raises(TypeError, match="generate takes the model vera_fx.transform returns"):
        vera_fx.generate(model, ids)
    encoder = vera_fx.transform(tiny_bert(), vera_fx.VeraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="BertForSequenceClassification cannot generate text.*decoder-only"):
        vera_fx.generate(encoder, ids)
