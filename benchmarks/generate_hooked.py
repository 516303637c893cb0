"""Generation through transformers' loop with hooked sites (vera_fx/generation.py) vs PEFT and the base.

The hooked path serves encoder-decoder, bitsandbytes and past-the-window sliding models. Two models with the
same random adapter state in vera_fx and PEFT (VeRA on q/v, greedy, N new tokens, batch 2, prompt 32):
- a Llama-like decoder: the decode graph (vera_fx.generate's default there), the hooked path forced on it
  (``generate_eager``), PEFT's generate and the base model's;
- a BART-like encoder-decoder (hooked path: what vera_fx.generate runs), PEFT and the base.
Per case the variants are interleaved and the median of the rounds is reported, as ms per generate call and
as a ratio to PEFT's time.
Run: python benchmarks/generate_hooked.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, print_table  # noqa: E402

import vera_fx  # noqa: E402
from vera_fx.generation import generate_eager  # noqa: E402
from vera_fx.sites import as_graph_module  # noqa: E402


def _pair(model: torch.nn.Module, targets: list[str], r: int) -> tuple:
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, target_modules=targets)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.5)
    gm = vera_fx.transform(model, vera_fx.VeraConfig(r=r, target_modules=targets)).eval()
    vera_fx.load_adapter_state_dict(gm, peft.get_peft_model_state_dict(pm))
    return gm, pm


def _bart(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        max_position_embeddings=256, eos_token_id=None, forced_eos_token_id=None, forced_bos_token_id=None)).eval()


def _time(variants: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, float]:
    for fn in variants.values():
        fn()  # warm-up (captures the decode graph, builds the site graphs)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hidden, layers, vocab, r = (128, 2, 1024, 32) if args.quick else (512, 4, 8192, 256)
    rounds, new = (2, 8) if args.quick else (args.rounds, args.new_tokens)
    ids = torch.randint(3, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    rows = []

    llama = llama_like(hidden, layers, vocab).eval()
    llama.generation_config.eos_token_id = None
    gm, pm = _pair(llama, ["q_proj", "v_proj"], r)
    inputs = {"input_ids": ids, "attention_mask": mask}
    t = _time({"decode graph": lambda: vera_fx.generate(gm, ids, mask, max_new_tokens=new, pad_token_id=0),
               "hooked": lambda: generate_eager(as_graph_module(gm), llama, inputs, **kw),
               "peft": lambda: pm.generate(**inputs, **kw), "base": lambda: llama.generate(**inputs, **kw)}, rounds)
    rows += [["llama-like", k, f"{v * 1e3:.1f}", f"{v / t['peft']:.2f}"] for k, v in t.items()]

    bart = _bart(hidden, layers, vocab)
    gm, pm = _pair(bart, ["q_proj", "v_proj"], r)
    t = _time({"hooked (vera_fx.generate)": lambda: vera_fx.generate(gm, ids, mask, max_new_tokens=new,
                                                                     pad_token_id=0),
               "peft": lambda: pm.generate(**inputs, **kw), "base": lambda: bart.generate(**inputs, **kw)}, rounds)
    rows += [["bart-like", k, f"{v * 1e3:.1f}", f"{v / t['peft']:.2f}"] for k, v in t.items()]
    print_table(f"generate, batch 2, prompt 32, {new} new tokens, hidden {hidden}, {layers} layers, r={r}",
                ["model", "variant", "ms / call", "x PEFT"], rows)


if __name__ == "__main__":
    main()
