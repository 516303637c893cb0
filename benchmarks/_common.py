"""Shared helpers for the benchmark scripts: timing, saved-activation memory, table printing."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def median_time(fn: Callable[[], object], warmup: int = 2, repeat: int = 8) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_activation_bytes(fn: Callable[[], torch.Tensor], model: Optional[torch.nn.Module] = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs its forward.

    This is the training memory that grows with batch and sequence (weights excluded), counted exactly
    rather than read from a noisy process RSS. Weights are excluded also when saved as views (a linear's
    backward keeps ``W.t()``): with ``model``, any tensor on the storage of one of its parameters or buffers.
    """
    seen: dict[int, int] = {}
    weights = set()
    if model is not None:
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and not (t.requires_grad and t.is_leaf):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def llama_like(hidden: int, layers: int, vocab: int):
    """A Llama-like causal LM from a config (intermediate 2.6875 x hidden, 8 heads), seeded, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def peft_with_random_lambdas(model: torch.nn.Module, method: str, targets, r: int) -> tuple:
    """(PEFT config, vera_fx config, PEFT's model on a copy of ``model`` with lambdas drawn N(0, 0.2) from seed 1
    in eval mode, its adapter state dict): the adapter state every row of a case loads."""
    import copy

    import peft
    import vera_fx

    peft_cfg = (peft.VeraConfig if method == "vera" else peft.PveraConfig)(r=r, target_modules=targets)
    ours_cfg = (vera_fx.VeraConfig if method == "vera" else vera_fx.PveraConfig)(r=r, target_modules=targets)
    pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lambda" in name:
                p.normal_(0, 0.2)
    return peft_cfg, ours_cfg, pm, peft.get_peft_model_state_dict(pm)
