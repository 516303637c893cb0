"""The adapters' own train / eval flag: in training mode from the start (as PEFT's new adapter layers), whatever
the model's mode, and following every ``.train()`` / ``.eval()`` of the object afterwards."""

from __future__ import annotations

import pytest
import torch

import vera_fx
from vera_fx.state import ADAPTER_MODE, adapters_training, set_adapters_training

from conftest import tiny_bert

peft = pytest.importorskip("peft")

CFG = dict(r=8, target_modules=["query", "value"])


def bert():
    """A tiny BERT classifier with dropout, in eval mode as ``from_pretrained`` leaves a model."""
    return tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}


def recipe_losses(model: torch.nn.Module, steps: int = 3) -> list[float]:
    """PEFT's PVeRA recipe as written: no ``.train()`` call before the loop."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.manual_seed(123)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_pvera_recipe_without_train_call_gives_peft_losses():
    pm = peft.get_peft_model(bert(), peft.PveraConfig(**CFG))
    m = vera_fx.transform(bert(), vera_fx.PveraConfig(**CFG), example_inputs=batch())
    vera_fx.load_adapter_state_dict(m, peft.get_peft_model_state_dict(pm))
    ours, theirs = recipe_losses(m), recipe_losses(pm)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert len({round(v, 6) for v in ours}) == 3  # the variance and mean do learn: the losses move


def test_flags_start_as_peft_and_follow_train_eval():
    pm = peft.get_peft_model(bert(), peft.PveraConfig(**CFG))
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.training and not layer.base_layer.training  # PEFT: new adapter layers train, the base does not
    m = vera_fx.transform(bert(), vera_fx.PveraConfig(**CFG), example_inputs=batch())
    assert adapters_training(m) is True and m.training is False
    assert all(g._modules[ADAPTER_MODE].training for g in m.graph_module.modules()
               if isinstance(g, torch.fx.GraphModule) and ADAPTER_MODE in g._modules)
    # A graph captured later for another keyword set gets the same split.
    m(input_ids=batch()["input_ids"])
    assert m.num_graphs == 2
    for g in m.graphs.values():
        assert g.training is False and adapters_training(g) is True
    m.eval()
    assert not adapters_training(m) and all(not adapters_training(g) for g in m.graphs.values())
    m.train()
    assert adapters_training(m) and m.training and all(g.training and adapters_training(g) for g in m.graphs.values())
    m.eval()
    m.train(False)
    assert not adapters_training(m)


def test_base_dropout_follows_model_mode_adapter_dropout_follows_adapter_flag():
    """Right after transform of an eval model: the base model's dropout is off (outputs repeat once the
    adapter is off), the adapter's dropout is on (outputs vary)."""
    m = vera_fx.transform(bert(), vera_fx.VeraConfig(vera_dropout=0.5, **CFG), example_inputs=batch())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.5)
        a, b = m(**batch()).logits, m(**batch()).logits
        assert not torch.allclose(a, b)  # adapter dropout samples
        set_adapters_training(m, False)
        a, b = m(**batch()).logits, m(**batch()).logits
        assert torch.equal(a, b)  # and the base model's dropout is off


def test_merge_and_delete_leave_no_mode_node():
    m = vera_fx.transform(bert(), vera_fx.VeraConfig(**CFG), example_inputs=batch())
    target = f"{ADAPTER_MODE}.training"
    reads = [n for g in m.graph_module.modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes
             if n.op == "get_attr" and n.target == target]
    assert reads
    vera_fx.merge(m)
    reads = [n for g in m.graph_module.modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes
             if n.op == "get_attr" and n.target == target]
    assert reads == []


def test_set_adapters_training_rejects_non_bool():
    m = vera_fx.transform(bert(), vera_fx.VeraConfig(**CFG), example_inputs=batch())
    with pytest.raises(TypeError, match="training=1"):
        set_adapters_training(m, 1)
