"""vera_fx.generate against PEFT's generate: left padding, greedy tokens, eos, sampling, PVeRA, training, errors."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import vera_fx
from vera_fx.capture import SOURCE_MODEL_KEY, SourceModel
from vera_fx.generation import cache_bucket, decode_graphs
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
    graphs = len(decode_graphs(gm))
    vera_fx.merge(gm)  # merged weights, no adapter nodes: the decode graph follows without re-capture
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1), ours)
    vera_fx.unmerge(gm)
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1), ours)
    assert len(decode_graphs(gm)) == graphs


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


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=6),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=8),
    dict(min_new_tokens=5, max_new_tokens=7, eos_token_id=3),
    dict(max_length=12),
    dict(return_dict_in_generate=True, output_scores=True, max_new_tokens=4),
], ids=["beams", "penalties", "min_new_tokens", "max_length", "dict_output"])
def test_any_transformers_option_runs_its_loop_with_the_adapters(pairs, options):
    """Options the decode loop does not take run transformers' own loop with the adapters hooked: PEFT's tokens."""
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    ours = gm.generate(input_ids=ids, attention_mask=mask, pad_token_id=1, **options)
    theirs = pm.generate(input_ids=ids, attention_mask=mask, pad_token_id=1, **options)
    base = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=1, **options)
    if options.get("return_dict_in_generate"):
        assert type(ours) is type(theirs) and len(ours.scores) == len(theirs.scores) == 4
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours.scores, theirs.scores))
        ours, theirs, base = ours.sequences, theirs.sequences, base.sequences
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, base)  # the adapter changes the tokens: the hooks ran


def test_generation_config_sets_what_is_left_unset(pairs):
    """As in transformers: a ``generation_config`` passed or the model's own fills what the call leaves unset
    (the length: ``max_new_tokens``, ``max_length`` less the prompt, else 20 new tokens)."""
    from transformers import GenerationConfig

    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    for kw in (dict(generation_config=GenerationConfig(max_new_tokens=3, pad_token_id=1)), {}):
        ours, theirs = gm.generate(input_ids=ids, attention_mask=mask, **kw), pm.generate(input_ids=ids,
                                                                                          attention_mask=mask, **kw)
        assert torch.equal(ours, theirs), kw
    assert ours.shape[1] == ids.shape[1] + 20
    own = model.generation_config
    try:
        for field, value, new in (("max_new_tokens", 4, 4), ("max_length", 11, 4)):
            model.generation_config = pm.get_base_model().generation_config = GenerationConfig(
                **{field: value}, pad_token_id=1, eos_token_id=[])
            ours = vera_fx.generate(gm, ids, mask)  # the decode graph's loop, its length from the model's config
            assert ours.shape[1] == ids.shape[1] + new
            assert torch.equal(ours, pm.generate(input_ids=ids, attention_mask=mask))
    finally:
        model.generation_config = pm.get_base_model().generation_config = own


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


def test_generation_records_no_kl_term():
    """The KL term is the last forward's: generating (whose decode graph is in the inference form, mean or
    sampled) leaves it as it was, whichever PVeRA path the decode graph takes."""
    cfg = vera_fx.PveraConfig(r=8, target_modules=["q_proj", "v_proj"], generator_seed=0, init_weights=False)
    gm = vera_fx.transform(tiny_llama(), cfg).eval()
    ids = torch.randint(2, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gm(input_ids=ids)
    kl = vera_fx.kl_divergence(gm).clone()
    for sample in (False, True):
        vera_fx.set_sample_at_inference(gm, sample)
        vera_fx.generate(gm, ids[:, :3], max_new_tokens=4, eos_token_id=[])
        torch.testing.assert_close(vera_fx.kl_divergence(gm), kl, atol=0, rtol=0)


def test_generation_follows_a_training_step_and_several_active_adapters():
    model, gm, pm = _pair("llama")
    ids, mask = _left_padded()
    before = vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1)
    entry = decode_graphs(gm)[0]
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
    assert decode_graphs(gm)[0] is entry  # not re-captured
    emitted = (entry.graph, type(entry).forward)  # the decode graph's nodes and code for "default"

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
    assert (entry.graph, type(entry).forward) == emitted  # switching back puts the built version back


def test_disable_adapters_generates_the_base_model(pairs):
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    with vera_fx.disable_adapters(gm):
        assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1),
                           _hf(model, ids, mask, 8, pad_token_id=1))
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=8, pad_token_id=1),
                       _hf(pm, ids, mask, 8, pad_token_id=1))


def test_generate_after_to_dtype_runs_in_the_objects_dtype():
    """``m.to(torch.float64)`` converts the object's tensors only: the decode graph is captured in float64 (the
    user's model stays float32) and generates what PEFT's float64 model does."""
    model, gm, pm = _pair("llama")
    ids, mask = _left_padded()
    gm.to(torch.float64)
    pm.to(torch.float64)
    assert next(model.parameters()).dtype == torch.float32
    ours = vera_fx.generate(gm, ids, mask, max_new_tokens=6, pad_token_id=1)
    assert torch.equal(ours, _hf(pm, ids, mask, 6, pad_token_id=1))
    assert next(model.parameters()).dtype == torch.float32


def test_decode_graphs_are_cached_by_bucket(pairs):
    model, gm, _ = pairs("gpt2")
    ids, mask = _left_padded()
    vera_fx.generate(gm, ids, mask, max_new_tokens=3)
    vera_fx.generate(gm, ids, mask, max_new_tokens=20)  # 27 positions: the same 64-position bucket
    assert len(decode_graphs(gm)) == 1
    assert [cache_bucket(n) for n in (27, 64, 65, 97, 129, 544)] == [64, 64, 96, 128, 192, 768]
    assert len(decode_graphs(copy.deepcopy(gm))) == 0  # copies capture their own


def test_compiled_decode_matches_eager(pairs):
    model, gm, pm = pairs("llama")
    ids, mask = _left_padded()
    eager = vera_fx.generate(gm, ids, mask, max_new_tokens=5, pad_token_id=1)
    assert torch.equal(vera_fx.generate(gm, ids, mask, max_new_tokens=5, pad_token_id=1, compile=True), eager)


def test_errors_name_the_problem(pairs):
    model, gm, _ = pairs("gpt2")
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match="not_an_option"):  # transformers' own check names it
        vera_fx.generate(gm, ids, not_an_option=2)
    with pytest.raises(ValueError, match="transformers' own loop .*num_beams.*generator= is not supported"):
        vera_fx.generate(gm, ids, num_beams=2, generator=torch.Generator())
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
    with pytest.raises(ValueError, match="BertForSequenceClassification cannot generate text.*causal LMs"):
        vera_fx.generate(encoder, ids)


# ------------------------------------------------ transformers' loop with hooked sites (generation.py)

def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1)).eval()


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        eos_token_id=95, forced_eos_token_id=None, forced_bos_token_id=None, init_std=0.2)).eval()


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None)).eval()


def _features(batch=2):
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))


SEQ2SEQ = {"t5": (tiny_t5, ["q", "v"]), "bart": (tiny_bart, ["q_proj", "v_proj", "fc1"]),
           "whisper": (tiny_whisper, ["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def seq2seq():
    made = {}

    def get(arch):
        if arch not in made:
            build, targets = SEQ2SEQ[arch]
            example = None
            if arch == "whisper":
                example = {"input_features": _features(), "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]])}
            model = build()
            gm, pm = peft_pair(model, dict(target_modules=targets), r=4, example_inputs=example)
            made[arch] = model, gm.eval(), pm.eval()
        return made[arch]

    return get


def _seq2seq_inputs(arch):
    if arch == "whisper":
        return (_features(),), {"input_features": _features()}
    ids, mask = _left_padded()
    return (ids, mask), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_encoder_decoder_greedy_matches_peft(arch, seq2seq):
    model, gm, pm = seq2seq(arch)
    args, hf_inputs = _seq2seq_inputs(arch)
    ours = vera_fx.generate(gm, *args, max_new_tokens=6)
    theirs = pm.generate(**hf_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, model.generate(**hf_inputs, max_new_tokens=6, do_sample=False))


def test_encoder_runs_once_and_cross_attention_keys_are_cached(seq2seq):
    model, gm, _ = seq2seq("t5")
    args, _ = _seq2seq_inputs("t5")
    calls = {"encoder": 0, "cross_k": 0, "decoder": 0}
    hooks = [model.get_encoder().register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             model.get_submodule("decoder.block.1.layer.1.EncDecAttention.k").register_forward_hook(
                 lambda *a: calls.__setitem__("cross_k", calls["cross_k"] + 1)),
             model.get_decoder().register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))]
    try:
        vera_fx.generate(gm, *args, max_new_tokens=6)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"encoder": 1, "cross_k": 1, "decoder": 6}


def test_hooked_generation_follows_the_adapter_state_and_restores_the_model(seq2seq):
    model, gm, pm = seq2seq("bart")
    args, hf_inputs = _seq2seq_inputs("bart")
    params = dict(model.named_parameters())
    adapted = vera_fx.generate(gm, *args, max_new_tokens=6)
    with vera_fx.disable_adapters(gm):
        assert torch.equal(vera_fx.generate(gm, *args, max_new_tokens=6),
                           model.generate(**hf_inputs, max_new_tokens=6, do_sample=False))
    assert all(p is params[n] for n, p in model.named_parameters())  # the graph's weights were bound, then put back
    assert not any(m._forward_hooks for m in model.modules())
    assert not model.training or model.training == pm.training
    merged = copy.deepcopy(gm)
    vera_fx.merge(merged)  # merged sites carry no hook: the merged weights are bound instead
    assert torch.equal(vera_fx.generate(merged, *args, max_new_tokens=6), adapted)
    assert torch.equal(vera_fx.generate(gm, *args, max_new_tokens=6), adapted)  # the model itself is unmerged


def test_hooked_generation_errors_name_the_problem(seq2seq):
    _, gm, _ = seq2seq("bart")
    args, _ = _seq2seq_inputs("bart")
    with pytest.raises(ValueError, match=r"transformers' own loop.*\(an encoder-decoder model\): compile=True"):
        vera_fx.generate(gm, *args, compile=True)
    with pytest.raises(ValueError, match="generator= is not supported there; pass seed="):
        vera_fx.generate(gm, *args, do_sample=True, generator=torch.Generator())
    _, whisper, _ = seq2seq("whisper")
    with pytest.raises(ValueError, match=r"generates from input_features \(batch, channels, frames\)"):
        vera_fx.generate(whisper, args[0])
    sampled = vera_fx.generate(gm, *args, max_new_tokens=4, do_sample=True, seed=3)
    assert torch.equal(vera_fx.generate(gm, *args, max_new_tokens=4, do_sample=True, seed=3), sampled)


def test_hooks_refuse_a_functional_site():
    from vera_fx.generation import adapter_hooks
    from vera_fx.sites import as_graph_module

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight) * 2

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Scaled()

        def forward(self, x):
            return self.inner(x)

    toy = Toy()
    gm = vera_fx.transform(toy, vera_fx.VeraConfig(r=2, target_modules=["inner"]),
                           example_inputs=(torch.randn(2, 3, 8),))
    with pytest.raises(ValueError, match="site 'inner' is a Scaled, not a linear layer of Toy"):
        with adapter_hooks(as_graph_module(gm), toy):
            pass


def test_both_paths_read_a_modules_to_save_copy():
    """The decode graph and transformers' hooked loop both compute the head with the adapter's trained copy
    (the hooked loop once swapped in the copy's parameter holder, which has no forward, and raised)."""
    from vera_fx.generation import generate_eager, model_inputs
    from vera_fx.sites import as_graph_module

    torch.manual_seed(0)
    model = tiny_llama()
    m = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"])).eval()
    inner = as_graph_module(m)
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    ids = torch.randint(2, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    head = model.lm_head.weight
    decoded = vera_fx.generate(m, ids, max_new_tokens=4)
    with torch.no_grad():
        assert torch.equal(decoded[:, 5], m(input_ids=ids).logits[:, -1].argmax(-1))  # the copy's head
    hooked = generate_eager(inner, model, model_inputs(model, ids, None), max_new_tokens=4, do_sample=False)
    assert torch.equal(hooked, decoded)
    assert model.lm_head.weight is head  # the model's own head is back
    # merged: the adapter has no nodes left, but its copy of the head is still what the model computes with
    vera_fx.merge(m)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits[:, -1].argmax(-1), decoded[:, 5])
    assert torch.equal(vera_fx.generate(m, ids, max_new_tokens=4), decoded)
    assert torch.equal(generate_eager(inner, model, model_inputs(model, ids, None), max_new_tokens=4,
                                      do_sample=False), decoded)


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3}], ids=["decode-graph", "hooked-loop"])
def test_generations_in_several_threads_equal_one_at_a_time(pairs, options):
    """Four threads generating at once through one decode graph (its KV cache is its buffers) or through the hooked
    loop (which binds and hooks the user's model) get what each gets alone."""
    import threading

    model, gm, pm = pairs("llama")
    prompts = [_left_padded(seed=s) for s in range(4)]
    alone = [gm.generate(input_ids=i, attention_mask=k, max_new_tokens=6, pad_token_id=1, **options)
             for i, k in prompts]
    together: list = [None] * 4
    errors: list = []

    def run(j):
        try:
            i, k = prompts[j]
            together[j] = gm.generate(input_ids=i, attention_mask=k, max_new_tokens=6, pad_token_id=1, **options)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_sliding_window_past_the_window_matches_peft():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])).eval()
    gm, pm = peft_pair(model, dict(target_modules=["q_proj", "v_proj"]), r=4)
    ids, mask = _left_padded()
    ours = vera_fx.generate(gm.eval(), ids, mask, max_new_tokens=8, pad_token_id=1)  # 15 positions, window 4
    theirs = _hf(pm.eval(), ids, mask, 8, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, _hf(model, ids, mask, 8, pad_token_id=1))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_greedy_matches_peft(kind, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    qc = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32))

    def load():
        m = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu").eval()
        for layer in m.modules():  # bnb's CPU packing (bf16 scales) is off in vera_fx's generate: off for PEFT too
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load(), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.5)
    model = load()
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    ids, mask = _left_padded()
    ours = vera_fx.generate(gm.eval(), ids, mask, max_new_tokens=6, pad_token_id=1)
    theirs = _hf(pm.eval(), ids, mask, 6, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, _hf(model, ids, mask, 6, pad_token_id=1))
