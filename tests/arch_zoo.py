"""Tiny transformers models of 30 architectures, built from their config classes, with an input for each.

Used by tests/test_architectures.py and benchmarks/architectures.py. Every model has 2 layers and a hidden
size of 32 (64 where an architecture needs more heads), and is seeded, so two builds are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers as tf

_DEC = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
_ENC = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3)
_QKV = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, its attention targets and the kind of input it takes."""

    name: str
    model: str  # transformers model class
    config: str  # transformers config class
    kwargs: dict
    targets: list
    inputs: str = "text"  # text | seq2seq | vision | speech | clip
    labels: bool = True
    tol: float = 1e-5
    extra: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = getattr(tf, self.config)(**self.kwargs)
        return getattr(tf, self.model)(cfg).eval()


ARCHS: list[Arch] = [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", _DEC, _QKV),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _DEC, _QKV),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", {**_DEC, "head_dim": 8}, _QKV),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
         {**_DEC, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}, _QKV),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", _DEC, _QKV),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config", {**_DEC, "head_dim": 8, "sliding_window": 16}, _QKV),
    Arch("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", {**_DEC, "head_dim": 8, "sliding_window": 16}, _QKV),
    Arch("olmo2", "Olmo2ForCausalLM", "Olmo2Config", _DEC, _QKV),
    Arch("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", _DEC, _QKV),
    Arch("phi", "PhiForCausalLM", "PhiConfig", _DEC, _QKV),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", {**_DEC, "pad_token_id": 0}, ["qkv_proj"]),
    Arch("mixtral", "MixtralForCausalLM", "MixtralConfig", {**_DEC, "num_local_experts": 4}, _QKV),
    Arch("falcon", "FalconForCausalLM", "FalconConfig",
         dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              new_decoder_architecture=False, bias=True), ["query_key_value", "dense"]),
    Arch("bloom", "BloomForCausalLM", "BloomConfig", dict(vocab_size=96, hidden_size=32, n_layer=2, n_head=4),
         ["query_key_value"]),
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=64), ["c_attn"]),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", {k: v for k, v in _DEC.items()
                                                              if k != "num_key_value_heads"}, ["query_key_value"]),
    Arch("gptj", "GPTJForCausalLM", "GPTJConfig", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=64, rotary_dim=4), _QKV),
    Arch("opt", "OPTForCausalLM", "OPTConfig", dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64,
                                                    word_embed_proj_dim=32), _QKV),
    Arch("bert", "BertForSequenceClassification", "BertConfig", _ENC, ["query", "value"]),
    Arch("roberta", "RobertaForSequenceClassification", "RobertaConfig", {**_ENC, "pad_token_id": 1},
         ["query", "value"]),
    Arch("albert", "AlbertForSequenceClassification", "AlbertConfig", {**_ENC, "embedding_size": 16},
         ["query", "value"]),
    Arch("modernbert", "ModernBertForSequenceClassification", "ModernBertConfig",
         {**_ENC, "global_attn_every_n_layers": 1, "pad_token_id": 0}, ["Wqkv"]),
    Arch("distilbert", "DistilBertForSequenceClassification", "DistilBertConfig",
         dict(vocab_size=96, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64,
              num_labels=3), ["q_lin", "v_lin"]),
    Arch("deberta_v2", "DebertaV2ForSequenceClassification", "DebertaV2Config", {**_ENC, "type_vocab_size": 0},
         ["query_proj", "value_proj"]),
    Arch("vit", "ViTForImageClassification", "ViTConfig",
         dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_labels=3), _QKV, "vision"),  # q_proj in transformers 5
    Arch("swin", "SwinForImageClassification", "SwinConfig",
         dict(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
              window_size=4, num_labels=3), _QKV, "vision"),  # q_proj in transformers 5
    Arch("t5", "T5ForConditionalGeneration", "T5Config",
         dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
         ["q", "v"], "seq2seq", tol=5e-5),
    Arch("bart", "BartForConditionalGeneration", "BartConfig",
         dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64),
         _QKV, "seq2seq"),
    Arch("whisper", "WhisperForConditionalGeneration", "WhisperConfig",
         dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
              max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0,
              suppress_tokens=None, begin_suppress_tokens=None), _QKV, "speech"),
    Arch("clip", "CLIPModel", "CLIPConfig",
         dict(text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=16),
              vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4), projection_dim=16),
         _QKV, "clip", labels=False),
]
BY_NAME = {a.name: a for a in ARCHS}


def make_inputs(arch: Arch, model: torch.nn.Module, batch: int = 2, length: int = 8, seed: int = 1) -> dict:
    """Keyword inputs for ``model`` (labels where the architecture computes a loss)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = lambda n: torch.randint(3, 96, (batch, n), generator=g)  # noqa: E731
    if arch.inputs == "vision":
        kw: dict[str, Any] = {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    elif arch.inputs == "clip":
        kw = {"input_ids": ids(length), "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    elif arch.inputs == "speech":
        kw = {"input_features": torch.randn(batch, 8, 16, generator=g), "decoder_input_ids": ids(length)}
    elif arch.inputs == "seq2seq":
        kw = {"input_ids": ids(length), "attention_mask": torch.ones(batch, length, dtype=torch.long),
              "decoder_input_ids": ids(length)}
    else:
        kw = {"input_ids": ids(length), "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if not arch.labels:
        return kw
    name = type(model).__name__
    if name.endswith(("ForSequenceClassification", "ForImageClassification")):
        kw["labels"] = torch.arange(batch) % int(cfg.num_labels)
    elif arch.inputs in ("seq2seq", "speech"):
        kw["labels"] = ids(length)
    else:
        kw["labels"] = kw["input_ids"].clone()
    return kw


def main_output(out: Any) -> torch.Tensor:
    """The output compared between implementations: logits, else the first tensor of the output."""
    for key in ("logits", "logits_per_image"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if isinstance(v, torch.Tensor))


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {a.name: a.build for a in ARCHS}


# --------------------------------------------------------------------------------------------- one sweep row

METHODS = ("vera", "pvera")
TARGETS = ("attention", "all-linear")
# step: one plain gradient step of both models (learning rate: the parameter of PEFT's largest gradient moves by
# 0.01); the outputs after it, relative (|a - b| / (1 + |b|)); moved: how
# far the step moved our outputs (a step that moves nothing would prove nothing). AdamW's first step divides each
# gradient by its own magnitude, so a lambda whose gradient is float noise (|g| near eps) moves by a different
# lr-sized amount in the two libraries: it compares the noise, not the gradients.
MEASURES = ("sites", "init", "effect", "forward", "shape", "counts", "step", "moved", "folder", "generate")


def configs(arch: Arch, method: str, targets: str, seed_free: bool = False) -> tuple[Any, Any]:
    """(PEFT's config, ours) for a row: r=4, random initial lambdas (init_weights=False)."""
    import peft

    import vera_fx

    tm = "all-linear" if targets == "all-linear" else list(arch.targets)
    kw = dict(r=4, target_modules=tm, init_weights=False)
    if method == "vera":
        return peft.VeraConfig(**kw), vera_fx.VeraConfig(**kw)
    return peft.PveraConfig(**kw), vera_fx.PveraConfig(**kw)


def _loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else main_output(out).pow(2).mean()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def generates(arch: Arch) -> bool:
    """Whether the sweep compares greedy generation: text decoders and text encoder-decoders (Whisper's
    generate needs its feature extractor's conventions: compared in tests/test_generate.py instead)."""
    return arch.model.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) \
        and arch.inputs in ("text", "seq2seq")


def _same_generation(ours: Any, pm: Any, kw: dict) -> bool:
    """Greedy tokens (6 new) of ours and PEFT's from the example's first 5 positions."""
    ids = kw["input_ids"][:, :5]
    gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    return bool(torch.equal(ours.generate(**gen), pm.generate(**gen)))


def run_row(arch: Arch, method: str, targets: str, folder: str, generate: bool = True) -> dict[str, Any]:
    """Our adapter against PEFT's on ``arch``: both built from the same seed (init_weights=False), in eval
    mode (PVeRA: the mean). Returns each measure: bools for equal site sets / counts / greedy tokens, max abs
    differences for the rest (``effect``: ours against the base model, which must not be 0); ``generate`` is
    None where not compared (``generates``, or ``generate=False``)."""
    import copy
    import warnings

    import peft

    import vera_fx

    model = arch.build()
    kw = make_inputs(arch, model)
    p_cfg, o_cfg = configs(arch, method, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(model), p_cfg).eval()
        torch.manual_seed(7)
        ours = vera_fx.transform(model, o_cfg, example_inputs=kw).eval()
    row: dict[str, Any] = {m: None for m in MEASURES}
    peft_sites = sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                        if hasattr(m, f"{method}_lambda_b") and hasattr(m, "base_layer"))
    row["sites"] = sorted(s.name for s in vera_fx.sites(ours)) == peft_sites
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if "lambda" in k}
    mine = {k: v for k, v in vera_fx.adapter_state_dict(ours).items() if "lambda" in k}
    row["init"] = max((_diff(mine[k], v) for k, v in theirs.items() if k in mine), default=float("nan")) \
        if set(mine) == set(theirs) else float("inf")
    out = main_output(ours(**kw))
    with torch.no_grad():
        row["effect"] = _diff(out, main_output(model(**kw)))  # the adapter changes the output
    row["forward"] = _diff(out, main_output(pm(**kw)))
    kw2 = make_inputs(arch, model, batch=3, length=5 if arch.inputs != "speech" else 6, seed=2)
    row["shape"] = _diff(main_output(ours(**kw2)), main_output(pm(**kw2)))
    trainable = lambda mod: sum(p.numel() for p in mod.parameters() if p.requires_grad)  # noqa: E731
    row["counts"] = trainable(ours) == trainable(pm)
    if generate and generates(arch):
        row["generate"] = _same_generation(ours, pm, kw)
    for mod in (ours, pm):
        _loss(mod(**kw)).backward()
    # one plain gradient step whose largest change is 0.01 (the same learning rate for both, from PEFT's gradients)
    lr = 0.01 / max(float(p.grad.abs().max()) for p in pm.parameters() if p.requires_grad and p.grad is not None)
    with torch.no_grad():
        for mod in (ours, pm):
            for p in mod.parameters():
                if p.requires_grad and p.grad is not None:
                    p -= lr * p.grad
    after, theirs_after = main_output(ours(**kw)), main_output(pm(**kw))
    row["step"] = float(((after - theirs_after).abs() / (1 + theirs_after.abs())).max().detach())
    row["moved"] = _diff(after, out)
    ours.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    row["folder"] = _diff(main_output(loaded(**kw)), main_output(ours(**kw)))
    return row


def _main(argv: list[str]) -> None:
    """``python tests/arch_zoo.py [arch ...]``: the sweep as a markdown table (every architecture by default)."""
    import tempfile
    import time

    names = argv or [a.name for a in ARCHS]
    print("| architecture | method | targets | " + " | ".join(MEASURES) + " | seconds |")
    print("|" + "---|" * (len(MEASURES) + 4))
    for name in names:
        for method in METHODS:
            for targets in TARGETS:
                start = time.perf_counter()
                try:
                    with tempfile.TemporaryDirectory() as folder:
                        row = run_row(BY_NAME[name], method, targets, folder)
                    cells = [f"{v:.1e}" if isinstance(v, float) else str(v) for v in row.values()]
                except Exception as e:  # a row that fails is a row of the table
                    cells = [f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"] + [""] * (len(MEASURES) - 1)
                print(f"| {name} | {method} | {targets} | " + " | ".join(cells)
                      + f" | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
