"""capture(): dynamic shapes, output types, train/eval, aliasing, shared storage, signature errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_fx
from conftest import text_inputs, tiny_bert, tiny_llama, tree_code


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_graph(llama):
    return vera_fx.capture(llama)


@pytest.mark.parametrize("batch, length", [(1, 1), (1, 5), (4, 3), (3, 17)])
def test_dynamic_shapes_and_output_type(llama, llama_graph, batch, length):
    kw = text_inputs(llama, batch, length)
    out = llama_graph(**kw)
    ref = llama(**kw)
    assert type(out) is type(ref)
    assert out.logits.shape == (batch, length, llama.config.vocab_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    if length > 1:
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_parameters_shared_but_model_untouched(llama, llama_graph):
    w_model = llama.model.layers[0].self_attn.q_proj.weight
    w_graph = llama_graph.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert w_graph.data_ptr() == w_model.data_ptr()  # no copy of the weights
    assert w_graph is not w_model and not w_graph.requires_grad
    assert all(p.requires_grad for p in llama.parameters())  # the user's model keeps its flags
    assert not llama.training


def test_tied_weights_stay_tied():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                   tie_word_embeddings=True)).eval()
    gm = vera_fx.capture(m)
    params = dict(gm.named_parameters(remove_duplicate=False))
    if "lm_head.weight" in params:
        assert params["lm_head.weight"] is params["transformer.wte.weight"]
    kw = text_inputs(m, 2, 5)
    torch.testing.assert_close(gm(**kw).logits, m(**kw).logits)


def test_train_eval_follow_model_semantics():
    bert = tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    gm = vera_fx.capture(bert)
    kw = text_inputs(bert, 3, 6)
    graph_before = gm.graph
    gm.eval()
    torch.testing.assert_close(gm(**kw).logits, bert(**kw).logits)
    gm.train()
    bert.train()
    torch.manual_seed(3)
    a = gm(**kw).logits
    torch.manual_seed(3)
    b = bert(**kw).logits
    torch.testing.assert_close(a, b)  # same seed, same dropout masks as eager
    assert not torch.allclose(gm(**kw).logits, a)  # dropout is live
    gm.eval()
    torch.testing.assert_close(gm(**kw).logits, gm(**kw).logits)
    assert gm.graph is graph_before  # no re-capture on switching
    code = tree_code(gm)
    # dropout in blocks is export's training-IR op, in a flat graph the decomposed native_dropout
    assert "self.training" in code and ("native_dropout" in code or "dropout.default" in code) and "train_only" in code


def test_labels_aliasing_input_ids_is_cloned():
    m = tiny_llama()
    ids = torch.randint(0, 96, (2, 6))
    gm = vera_fx.capture(m, {"input_ids": ids, "labels": ids})  # the same tensor object twice
    ids2 = torch.randint(0, 96, (2, 6))
    labels2 = torch.randint(0, 96, (2, 6))
    out = gm(input_ids=ids2, labels=labels2)
    ref = m(input_ids=ids2, labels=labels2, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)


def test_signature_errors_and_constant_fill(llama, llama_graph):
    kw = text_inputs(llama, 2, 4)
    with pytest.raises(TypeError) as err:
        llama_graph(input_ids=kw["input_ids"])
    msg = str(err.value)
    assert "attention_mask" in msg and "labels" in msg and "example_inputs" in msg
    with pytest.raises(TypeError, match="unexpected.*token_type_ids"):
        llama_graph(**kw, token_type_ids=kw["input_ids"])
    llama_graph(**kw, use_cache=False)  # the captured constant may also be passed explicitly
    assert llama_graph.meta["vera_fx_signature"].constants == (("use_cache", False),)


class TwoLayer(nn.Module):
    """A model that calls F.linear itself, with no nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.w_out = nn.Parameter(torch.randn(4, 16) * 0.3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return F.linear(self.drop(torch.relu(F.linear(x, self.w_in))), self.w_out)


def test_positional_plain_module():
    m = TwoLayer().eval()
    gm = vera_fx.capture(m, (torch.randn(3, 5, 8),))
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(gm(x), m(x))
    gm.train()
    assert not torch.allclose(gm(x), gm(x))


def test_capture_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        vera_fx.capture(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_inputs"):
        vera_fx.capture(TwoLayer())
    with pytest.raises(TypeError, match="example_inputs"):
        vera_fx.capture(TwoLayer(), example_inputs=3)  # type: ignore[arg-type]

    class Bad(nn.Module):
        def forward(self, x):
            return x.nonzero().sum() if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(vera_fx.CaptureError, match="Bad"):
        vera_fx.capture(Bad(), (torch.randn(2, 3),))


def test_default_example_needs_transformers_model():
    from vera_fx.signatures import default_example_inputs

    kw = default_example_inputs(tiny_bert())
    assert set(kw) == {"input_ids", "attention_mask", "token_type_ids", "labels"} and kw["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        default_example_inputs(TwoLayer())


def test_deepcopy_keeps_keyword_handling(llama, llama_graph):
    import copy

    twin = copy.deepcopy(llama_graph)
    kw = text_inputs(llama, 2, 4)  # no use_cache: filled in on the copy too
    torch.testing.assert_close(twin(**kw).logits, llama(**kw).logits)
    with pytest.raises(TypeError, match="expected|missing"):
        twin(input_ids=kw["input_ids"])


def test_inputs_the_model_fills_itself_may_be_left_out():
    """Tokenizer output (with token_type_ids) and a bare input_ids call both work on a BERT graph."""
    bert = tiny_bert()
    gm = vera_fx.capture(bert)
    sig = gm.meta["vera_fx_signature"]
    assert {n for n, _, _ in sig.defaults} == {"attention_mask", "token_type_ids"}
    kw = text_inputs(bert, 2, 5)
    for call in ({"input_ids": kw["input_ids"], "labels": kw["labels"]},
                 {**kw, "token_type_ids": torch.zeros_like(kw["input_ids"])},
                 {**kw, "token_type_ids": torch.ones_like(kw["input_ids"])}):
        torch.testing.assert_close(gm(**call).logits, bert(**call).logits)
    with pytest.raises(TypeError, match="missing: \\['labels'\\]"):
        gm(input_ids=kw["input_ids"])


def test_dtype_or_device_change_is_a_clear_error():
    m = tiny_llama()
    gm = vera_fx.capture(m).to(torch.float64)
    with pytest.raises(TypeError, match="torch.float32 weights on cpu and now holds torch.float64.*transform"):
        gm(**text_inputs(m, 2, 4))
    half = vera_fx.capture(tiny_llama().to(torch.bfloat16))  # captured in bf16: runs in bf16
    assert half(**text_inputs(m, 2, 4)).logits.dtype == torch.bfloat16


def test_attention_dropout_follows_mode_and_matches_eager():
    """scaled_dot_product_attention's dropout_p reads the mode: same seed, same outputs as eager in train."""
    m = tiny_llama(attention_dropout=0.3)
    gm = vera_fx.capture(m)
    kw = text_inputs(m, 2, 6)
    m.train()
    gm.train()
    torch.manual_seed(4)
    a = gm(**kw).logits
    torch.manual_seed(4)
    torch.testing.assert_close(a, m(**kw).logits)
    gm.eval()
    m.eval()
    assert (a - gm(**kw).logits).abs().max() > 1e-3
    torch.testing.assert_close(gm(**kw).logits, m(**kw).logits)
