"""Training step: frozen base model vs peft VeRA vs vera_fx, measured side by side in one run.

A Llama-like model (hidden 512, 4 layers, batch 4, sequence 128, r=256), targets q/v and all-linear.
Prints the median step time (forward + backward + AdamW step) and the saved-activation memory, with ratios.
Run: python benchmarks/train_step.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import llama_like, median_time, print_table, saved_activation_bytes  # noqa: E402

import vera_fx  # noqa: E402


def build(hidden: int, layers: int, vocab: int):
    return llama_like(hidden, layers, vocab)


def step_fn(model, inputs, params):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()
    hidden, layers, batch, seq, r = (128, 2, 2, 32, 64) if args.quick else (512, 4, 4, 128, 256)
    repeat = 2 if args.quick else args.repeat
    warnings.filterwarnings("ignore")
    import peft

    base = build(hidden, layers, vocab=4096)
    base.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    print(f"Llama-like: hidden {hidden}, {layers} layers, batch {batch}, sequence {seq}, r={r}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # The frozen base: only the final norm trains, so backward runs through every layer as with adapters.
    frozen = copy.deepcopy(base)
    for n, p in frozen.named_parameters():
        p.requires_grad_(n == "model.norm.weight")
    base_params = [p for p in frozen.parameters() if p.requires_grad]
    t_base = median_time(step_fn(frozen, inputs, base_params), repeat=repeat)
    m_base = saved_activation_bytes(lambda: frozen(**inputs).loss)

    rows = [["frozen base", "-", f"{t_base * 1e3:.1f}", "1.00", f"{m_base / 2**20:.1f}", "1.00", "-", "-"]]
    for label, targets in (("q/v", ["q_proj", "v_proj"]), ("all-linear", "all-linear")):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=r, target_modules=targets))
        pm.train()
        t_peft = median_time(step_fn(pm, inputs, [p for p in pm.parameters() if p.requires_grad]), repeat=repeat)
        m_peft = saved_activation_bytes(lambda: pm(**inputs).loss)
        gm = vera_fx.transform(base, vera_fx.VeraConfig(r=r, target_modules=targets))
        gm.train()
        t_ours = median_time(step_fn(gm, inputs, [p for p in gm.parameters() if p.requires_grad]), repeat=repeat)
        m_ours = saved_activation_bytes(lambda: gm(**inputs).loss)
        rows.append([f"peft VeRA", label, f"{t_peft * 1e3:.1f}", f"{t_peft / t_base:.2f}",
                     f"{m_peft / 2**20:.1f}", f"{m_peft / m_base:.2f}", "1.00", "1.00"])
        rows.append([f"vera_fx", label, f"{t_ours * 1e3:.1f}", f"{t_ours / t_base:.2f}",
                     f"{m_ours / 2**20:.1f}", f"{m_ours / m_base:.2f}", f"{t_ours / t_peft:.2f}",
                     f"{m_ours / m_peft:.2f}"])
        del pm, gm
    print_table("training step (median of %d)" % repeat,
                ["model", "targets", "step ms", "x base", "saved act. MiB", "x base", "time x peft", "mem x peft"],
                rows)


if __name__ == "__main__":
    main()
