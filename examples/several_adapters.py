"""Two VeRA adapters on one model, as in PEFT: train each, switch, disable, save both, load them back.

    python examples/several_adapters.py            # a 4-layer Llama built from a config, 40 steps per task
    python examples/several_adapters.py --quick    # 2 layers, 4 steps: a smoke test

``default`` learns to count up, ``down`` to count down. Both share one pair of frozen projections; only the
active adapter's lambdas train. ``save_pretrained`` writes PEFT's layout (``default`` in the folder, ``down`` in
a subfolder), which ``vera_fx.from_pretrained`` + ``load_adapter`` (or PEFT's ``PeftModel``) read back.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

import torch


def counting_batch(vocab: int, batch: int, length: int, step: int, generator: torch.Generator) -> dict:
    """Sequences that count by ``step`` (1: up, -1: down) modulo ``vocab`` from a random start."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    ids = (start + step * torch.arange(length)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(m: torch.nn.Module, vocab: int, step: int, steps: int, generator: torch.Generator) -> float:
    """A few AdamW steps on the trainable (the active adapter's) parameters; returns the last loss."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    m.train()
    for _ in range(steps):
        loss = m(**counting_batch(vocab, 8, 16, step, generator)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return loss.item()


def check(name: str, difference: float, tolerance: float = 1e-5) -> None:
    print(f"{name}: max difference {difference:.1e}")
    if difference > tolerance:
        raise RuntimeError(f"{name}: max difference {difference:.2e} > {tolerance:.0e}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and a few steps")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    import vera_fx
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, steps = (64, 2, 4) if args.quick else (256, 4, args.steps)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)

    m = vera_fx.transform(model, vera_fx.VeraConfig(r=32, target_modules=["q_proj", "v_proj"]))
    print(f"default (count up): loss {train(m, config.vocab_size, 1, steps, gen):.4f}")
    m.add_adapter("down", vera_fx.VeraConfig(r=32, target_modules=["q_proj", "v_proj"]))  # inactive, as in PEFT
    m.set_adapter("down")  # only down's lambdas train now
    print(f"down (count down): loss {train(m, config.vocab_size, -1, steps, gen):.4f}")
    m.print_trainable_parameters()

    probe = counting_batch(config.vocab_size, 4, 16, 1, gen)
    with torch.no_grad():
        outputs = {}
        for name in ("default", "down"):
            m.set_adapter(name)
            outputs[name] = m(**probe).logits
        with m.disable_adapter():  # exactly the base model
            check("disable_adapter vs the base model", (m(**probe).logits - model(**probe).logits).abs().max().item())

    with tempfile.TemporaryDirectory() as folder:
        m.save_pretrained(folder)  # default in folder, down in folder/down (PEFT's layout)
        print(f"saved: {sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob('*.*'))}")
        loaded = vera_fx.from_pretrained(model, folder)
        loaded.load_adapter(str(Path(folder) / "down"), adapter_name="down")
    with torch.no_grad():
        for name in ("default", "down"):
            loaded.set_adapter(name)
            check(f"{name} reloaded", (loaded(**probe).logits - outputs[name]).abs().max().item())
    loaded.set_adapter("default")
    loaded.delete_adapter("down")
    print(f"after delete_adapter: {loaded.active_adapters}, peft_config keys {sorted(loaded.peft_config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
