"""Serve many VeRA adapters from one model: one forward, one adapter per row, and an exported program.

    python examples/serve_many_adapters.py            # 32 adapters on a 4-layer Llama built from a config
    python examples/serve_many_adapters.py --quick    # 4 adapters on 2 layers: a smoke test

Adapters are saved to folders (as users' fine-tunes would be), loaded at once with ``vera_fx.load_adapters``
(all checked, all or nothing, no graph rewrite per adapter), and a batch whose rows name different adapters
runs as one forward (``m(**batch, adapter_names=[...])``, PEFT's call). Each row is checked against that row run
alone with its adapter active. ``vera_fx.export`` then writes the mixed graph as an ExportedProgram that needs
only torch, with the rows' adapters given as an index tensor (``vera_fx.adapter_index``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

import torch


def check(name: str, difference: float, tolerance: float = 1e-5) -> None:
    print(f"{name}: max difference {difference:.1e}")
    if difference > tolerance:
        raise RuntimeError(f"{name}: max difference {difference:.2e} > {tolerance:.0e}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer adapters")
    parser.add_argument("--adapters", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    import vera_fx
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, count = (64, 2, 4) if args.quick else (256, 4, args.adapters)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    cfg = vera_fx.VeraConfig(r=32, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, config.vocab_size, (count + 1, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = [f"user_{i}" for i in range(count)]

    with tempfile.TemporaryDirectory() as root:
        folders = {}
        for name in names:  # stand-ins for users' fine-tunes: random lambdas, saved as PEFT does
            trained = vera_fx.transform(model, cfg, example_inputs=batch)
            with torch.no_grad():
                for p in trained.parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.5)
            trained.save_pretrained(Path(root) / name)
            folders[name] = Path(root) / name

        m = vera_fx.transform(model, cfg, example_inputs=batch)  # the inputs the server will take
        vera_fx.load_adapters(m, folders, progress=False)
        m.eval()
        rows = [*names, "__base__"]  # one adapter per row; PEFT's name for the base model
        with torch.no_grad():
            mixed = m(**batch, adapter_names=rows).logits
            for i, name in enumerate(rows):  # each row equals that row run alone with its adapter
                if name == "__base__":
                    alone = model(**{k: v[i:i + 1] for k, v in batch.items()}).logits
                else:
                    m.set_adapter(name)
                    alone = m(**{k: v[i:i + 1] for k, v in batch.items()}).logits
                check(f"row {i} ({name})", (mixed[i:i + 1] - alone).abs().max().item())

        program = vera_fx.export(m, batch, adapter_names=rows)
        path = Path(root) / "mixed.pt2"
        torch.export.save(program, path)
        served = torch.export.load(path).module()
        with torch.no_grad():
            out = served(**batch, vera_fx_adapter_index=vera_fx.adapter_index(m, rows))["logits"]
        check("exported program vs the mixed forward", (out - mixed).abs().max().item())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
