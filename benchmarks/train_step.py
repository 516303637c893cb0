"""Training step: frozen base model vs peft vs vera_fx (VeRA and PVeRA), measured side by side in one run.

Shapes: today's Llama-like (hidden 512, 4 layers, batch 4 x 128, r=256) and a realistic one (hidden 2048,
intermediate 5632, 2 layers, batch 2 x 512, r=256 and r=1024). For each: the median step time (forward +
backward + AdamW), timed interleaved (one step of every row per round) so machine load hits all rows alike;
the saved activations (bytes autograd keeps for backward, weights and buffers excluded also when kept as
views) in total and minus the frozen base's (whose gradient flows from layer 0's input norm, so at q/v it
keeps some layer-0 tensors an adapted model does not: the difference can then go negative, and the totals
are the robust comparison); and the arithmetic floor: counted multiply-adds of exact VeRA with shared projections (frozen base forward and input
gradient, ``x·Aᵀ`` and its input gradient once per shared input, ``z·Bᵀ`` and its gradient per site), shown as
"floor ms" = the frozen base's measured time scaled by floor / base multiply-adds.

vera_fx rows (``--lowerings``, all by default): ``lowering="auto"`` (the lower pass's choice: within PEFT's
arithmetic, the most values kept off the saved tensors that the share pass's saving pays for), ``"fast"`` (per
group the least work: fused tails, folding calls that keep W'), ``"fused"`` (every site a fused tail: the plain
path's products and memory, fewer passes), ``"lean"`` (every site lean: the least memory), ``"weight"`` (VeRA:
every site a folding call, lean where it cannot fold) and ``"activation"`` (the plain nodes). Where folding
costs less than the plain adapter (VeRA, tokens at least in) the floor counts the cheaper fold (W' kept or
folded again). ``--compile`` adds torch.compile rows (all-linear, today's shape: the frozen base, peft and the
vera_fx rows but weight compiled, their saved tensors measured as well).
Step times: "x peft" is the median (and quartiles) of the per-round ratios, the steadier measure on a machine
whose speed drifts.
Run: python benchmarks/train_step.py [--quick] [--shapes today,realistic] [--methods vera,pvera]
[--lowerings auto,fast,...] [--ranks 1024] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table, saved_activation_bytes  # noqa: E402

import vera_fx  # noqa: E402
from vera_fx.sites import graph_modules, read_graph_sites  # noqa: E402
from vera_fx.passes.lower import GroupShape, extra_products, path_costs  # noqa: E402

# name: (hidden, intermediate, layers, batch, seq, ranks)
SHAPES = {
    "today": (512, 1376, 4, 4, 128, (256,)),
    "realistic": (2048, 5632, 2, 2, 512, (256, 1024)),
    "quick": (128, 344, 2, 2, 32, (64,)),
    "quick-realistic": (256, 704, 2, 2, 64, (32, 128)),
}
VOCAB = 4096
LOWERINGS = ("auto", "fast", "fused", "lean", "weight", "activation")  # the vera_fx rows ("weight": VeRA only)
TARGETS = {"q/v": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def build(hidden: int, inter: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).train()


def step_fn(model: Callable, inputs: dict, params: list) -> Callable[[], object]:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each function, one per round (every function once per round). Each turn runs two
    steps and times the second: a step right after another model's pays for that model's memory (page faults,
    caches), while training runs one model's steps back to back. The garbage collector runs between rounds
    only."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()  # as timeit does: a collection of the graphs' many Python objects lands on a random row
    try:
        for _ in range(repeat):
            for k, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            gc.collect()
    finally:
        gc.enable()
    return times


def ratio(times: list[float], ref: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``times[i] / ref[i]``: rows timed in one round share the
    machine's state of the moment (this machine's speed drifts by more than the effects measured), so the
    ratio within a round is steadier than the ratio of two medians."""
    rs = sorted(a / b for a, b in zip(times, ref))
    return statistics.median(rs), rs[len(rs) // 4], rs[(3 * len(rs)) // 4]


def site_shapes(hidden: int, inter: int, targets) -> list[tuple[str, int, list[int]]]:
    """Per layer: (input, in_features, [out_features of the targeted sites reading it])."""
    groups = [("x", hidden, {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden}),
              ("attn", hidden, {"o_proj": hidden}),
              ("x2", hidden, {"gate_proj": inter, "up_proj": inter}),
              ("mlp", inter, {"down_proj": hidden})]
    out = []
    for name, fan_in, sites in groups:
        outs = [o for s, o in sites.items() if targets == "all-linear" or s in targets]
        if outs:
            out.append((name, fan_in, outs))
    return out


def base_macs(hidden: int, inter: int, layers: int, batch: int, seq: int) -> int:
    """Frozen base step: linear layers and LM head forward + input gradient, attention forward + backward."""
    t = batch * seq
    linear = t * (4 * hidden * hidden + 3 * hidden * inter)
    attn = 2 * batch * seq * seq * hidden
    return layers * (2 * linear + 3 * attn) + 2 * t * hidden * VOCAB


def adapter_macs(hidden: int, inter: int, layers: int, tokens: int, r: int, rows: int, targets,
                 shared: bool, lean: bool = False) -> int:
    """Adapter multiply-adds of a step: 2 T in rows per input (per site when not shared) + 2 T r out per site
    (+ T r out per site for the lean path's recomputed product)."""
    total = 0
    for _, fan_in, outs in site_shapes(hidden, inter, targets):
        proj = 2 * tokens * fan_in * rows
        total += proj * (1 if shared else len(outs)) + sum((3 if lean else 2) * tokens * r * o for o in outs)
    return layers * total


def fold_saving(hidden: int, inter: int, layers: int, tokens: int, r: int, targets) -> int:
    """What folding (W' folded again in backward, or kept) saves against the activation path where it is cheaper
    (VeRA; <= 0): the floor's part."""
    return layers * sum(min(0, c["weight"] - c["activation"], c["kept"] - c["activation"]) for c in (
        path_costs(GroupShape(tokens, fan_in, r, r, tuple(outs)))
        for _, fan_in, outs in site_shapes(hidden, inter, targets)))


def _adapter_calls(model) -> list:
    """The adapter output nodes of every graph of the model's tree (the root graph and its blocks)."""
    inner = getattr(model, "_orig_mod", model)
    if not (hasattr(inner, "graph") or hasattr(inner, "graph_module")):
        return []  # peft or the eager base
    return [n for g in graph_modules(inner) for n in g.graph.nodes
            if (n.meta.get("vera_fx") or {}).get("role") == "output"]


def _path(node) -> str:
    """A site output's lowering path ("kept": the weight path keeping W')."""
    tag = node.meta["vera_fx"]
    return "kept" if tag.get("keep") else tag.get("path") or "activation"


def paths(model) -> str:
    """How the lower pass computed each site: counts per path."""
    calls = _adapter_calls(model)
    if not calls:
        return "-"
    counts: dict[str, int] = {}
    for n in calls:
        p = _path(n)
        counts[p] = counts.get(p, 0) + 1
    return " ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def path_extra(model, tokens: int, r: int) -> int:
    """Multiply-adds the lowered paths add to the activation path's (negative where they save some): per lean
    site the tokens x r x out product; per weight-path call that folds (tokens >= in) the two out x r x in folds
    and gᵀ·h instead of z·Bᵀ and its gradient, and for an input whose every site folds no d h @ A (the lean
    product when it does not fold)."""
    inner = getattr(model, "_orig_mod", model)
    total = 0
    for g in graph_modules(inner):  # node names repeat across block graphs: look each site up in its own graph
        sites = {s.base.name: s for s in read_graph_sites(g)}
        for n in g.graph.nodes:
            tag = n.meta.get("vera_fx") or {}
            if tag.get("role") != "output" or tag.get("path") not in ("lean", "weight"):
                continue
            s = sites[tag["base"]]
            folds = tag["path"] == "weight" and tokens >= s.in_features
            o, i = s.out_features, s.in_features
            total += extra_products(GroupShape(tokens, i, r, r, (o,)), o, _path(n))
            h = n.args[1] if tag["path"] == "weight" else None
            if folds and h is not None and n is next(iter(h.users)) and all(
                    (u.meta.get("vera_fx") or {}).get("path") == "weight" for u in h.users):
                total -= tokens * i * r  # counted once per input, at its first fold
    return total


def run_shape(name: str, methods: list[str], targets_shown: list[str], repeat: int, compile_rows: bool,
              lowerings: tuple[str, ...] = LOWERINGS, only_ranks: tuple[int, ...] = ()) -> None:
    import peft

    hidden, inter, layers, batch, seq, ranks = SHAPES[name]
    ranks = tuple(r for r in ranks if r in only_ranks) if only_ranks else ranks
    base = build(hidden, inter, layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    tokens = batch * seq
    print(f"\n== {name}: Llama-like hidden {hidden}, intermediate {inter}, {layers} layers, batch {batch} x {seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # The frozen base: only the first layer's input norm trains, so backward runs through every layer (and the
    # base saves what its input gradients need) as with adapters.
    frozen = copy.deepcopy(base)
    for n, p in frozen.named_parameters():
        p.requires_grad_(n == "model.layers.0.input_layernorm.weight")
    b_macs = base_macs(hidden, inter, layers, batch, seq)
    for r in ranks:
        for method in methods:
            peft_cfg = peft.VeraConfig if method == "vera" else peft.PveraConfig
            our_cfg = vera_fx.VeraConfig if method == "vera" else vera_fx.PveraConfig
            rows_a = r if method == "vera" else 2 * r
            for label, targets in TARGETS.items():
                if label not in targets_shown:
                    continue
                models: dict[str, tuple[Callable, list]] = {"frozen base": (frozen, [p for p in frozen.parameters()
                                                                                     if p.requires_grad])}
                pm = peft.get_peft_model(copy.deepcopy(base), peft_cfg(r=r, target_modules=targets)).train()
                models["peft"] = (pm, [p for p in pm.parameters() if p.requires_grad])
                for lowering in [m for m in lowerings if method == "vera" or m != "weight"]:
                    gm = vera_fx.transform(base, our_cfg(r=r, target_modules=targets), lowering=lowering,
                                           tokens=tokens).train()
                    models[f"vera_fx {lowering}"] = (gm, [p for p in gm.parameters() if p.requires_grad])
                if compile_rows and label == "all-linear":
                    for key in [k for k in ("frozen base", "peft", "vera_fx auto", "vera_fx fast", "vera_fx fused",
                                            "vera_fx lean", "vera_fx activation") if k in models]:
                        mod, params = models[key]
                        models[f"{key} compiled"] = (torch.compile(mod), params)
                steps = {k: step_fn(m, inputs, params) for k, (m, params) in models.items()}
                times = interleaved(steps, repeat) if repeat > 0 else {k: [float("nan")] for k in models}
                # saved tensors of compiled rows too: a compiled graph keeps its partitioner's choice
                mems = {k: saved_activation_bytes(lambda m=m: m(**inputs).loss, getattr(m, "_orig_mod", m))
                        for k, (m, _) in models.items()}
                plain = b_macs + adapter_macs(hidden, inter, layers, tokens, r, rows_a, targets, shared=True)
                floor = plain + fold_saving(hidden, inter, layers, tokens, r, targets) * (method == "vera")
                t_base = statistics.median(times["frozen base"])
                floor_ms = t_base * floor / b_macs * 1e3
                rows = []
                for k in models:
                    compiled = "compiled" in k
                    t = statistics.median(times[k])
                    ref_key = "peft compiled" if compiled else "peft"
                    base_key = "frozen base compiled" if compiled else "frozen base"
                    med, q1, q3 = ratio(times[k], times[ref_key])
                    mem = mems[k] - mems[base_key]
                    macs = {"frozen base": b_macs,
                            "peft": b_macs + adapter_macs(hidden, inter, layers, tokens, r, rows_a, targets, False),
                            }.get(k.replace(" compiled", ""), plain if k.startswith("vera_fx") else None)
                    if k.startswith("vera_fx"):
                        macs += path_extra(models[k][0], tokens, r)
                    adapted = k != base_key
                    rows.append([k, paths(models[k][0]), f"{t * 1e3:.0f}",
                                 f"{med:.2f} ({q1:.2f}-{q3:.2f})" if adapted else "-",
                                 f"{macs / 1e9:.1f}" if macs else "-", f"{t * 1e3 / floor_ms:.2f}",
                                 f"{mems[k] / 2**20:.1f}", f"{mem / 2**20:.2f}" if adapted else "-",
                                 f"{mem / (mems[ref_key] - mems[base_key]):.2f}" if adapted else "-"])
                print_table(f"{method} r={r} {label} ({repeat} rounds, interleaved; x peft: median (quartiles) of the "
                            f"per-round ratios, compiled rows against compiled peft and base; floor "
                            f"{floor / 1e9:.1f} GMAC = {floor_ms:.0f} ms at the base's rate; base saves "
                            f"{mems['frozen base'] / 2**20:.1f} MiB)",
                            ["model", "paths", "step ms", "x peft", "GMAC", "x floor", "saved MiB", "minus base MiB",
                             "x peft"], rows)
                del models, steps, pm, gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--shapes", default="today,realistic")
    parser.add_argument("--methods", default="vera,pvera")
    parser.add_argument("--targets", default="q/v,all-linear")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds; 0: saved activations only")
    parser.add_argument("--lowerings", default=",".join(LOWERINGS), help="the vera_fx rows")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (today's shape only)")
    parser.add_argument("--ranks", default="", help="only these of each shape's ranks, e.g. 1024")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    shapes = args.shapes.split(",")
    if args.quick:
        shapes = ["quick" if s == "today" else "quick-realistic" for s in shapes]
    repeat = min(2, args.repeat) if args.quick else args.repeat
    for s in shapes:
        run_shape(s, args.methods.split(","), args.targets.split(","), repeat, args.compile and s in ("today", "quick"),
                  tuple(args.lowerings.split(",")), tuple(int(r) for r in args.ranks.split(",") if r))


if __name__ == "__main__":
    main()
