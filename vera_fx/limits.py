"""Checks that run before any work (each raises ValueError naming the field or key, the value and the fix):
r against the targeted layers and memory (before inject creates projections), a file's tensors against its
config (before capture) and a folder's fields against the adapter it is loaded into (before copying)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import torch

from .config import AdapterConfig
from .methods import method_for
from .sites import Site

# r above this many times the widest targeted layer is refused: the update's rank is at most min(in, out), so
# such an r only costs memory (VeRA uses r of 256 to 1024 on layers of 768 to 8192 features).
RANK_FACTOR = 64


def _fmt_bytes(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('KB', 'MB', 'GB', 'TB')[unit - 1]}" if unit else f"{int(n)} B"


def projection_bytes(config: AdapterConfig, sites: Sequence[Site], itemsize: int = 4) -> int:
    """Bytes an adapter of ``config`` takes on ``sites``: the shared A and B and every site's lambdas."""
    rows = method_for(config).latent_rows(config)
    in_max, out_max = max(s.in_features for s in sites), max(s.out_features for s in sites)
    return itemsize * (rows * in_max + out_max * config.r + sum(rows + s.out_features for s in sites))


def memory_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """The memory of ``device``: a GPU's total, else the machine's physical memory (None when unknown)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_rank(config: AdapterConfig, sites: Sequence[Site], device: Optional[torch.device] = None,
               itemsize: int = 4) -> None:
    """ValueError when ``config.r`` is more than the targeted layers can use (``RANK_FACTOR`` x their widest
    dimension) or when the adapter would take more than half of the device's memory."""
    if not sites:
        return
    widest = max(max(s.in_features, s.out_features) for s in sites)
    need, rank_cap = projection_bytes(config, sites, itemsize), min(min(s.in_features, s.out_features) for s in sites)
    if config.r > RANK_FACTOR * widest:
        raise ValueError(f"r={config.r} is more than the targeted layers can use: their update's rank is at most "
                         f"{rank_cap} and the widest has {widest} features, and the adapter would take "
                         f"{_fmt_bytes(need)} ({need} bytes). Choose r <= {RANK_FACTOR * widest} (VeRA usually "
                         "uses r=256 to 1024)")
    total = memory_bytes(device)
    if total is not None and need > total // 2:
        raise ValueError(f"r={config.r} needs {_fmt_bytes(need)} ({need} bytes) for the projections and lambdas "
                         f"of {len(sites)} targeted layers, more than half of the {_fmt_bytes(total)} this device "
                         "has. Choose a smaller r or target fewer layers")


def check_file_shapes(config: AdapterConfig, tensors: dict[str, Any], source: str) -> None:
    """ValueError when a file's lambdas or projections do not have the sizes its config's ``r`` gives."""
    method = method_for(config)
    rows, prefix = method.latent_rows(config), method.prefix
    want = {f"{prefix}_lambda_d": lambda s: s == (rows,), f"{prefix}_A": lambda s: len(s) == 2 and s[0] == rows,
            f"{prefix}_B": lambda s: len(s) == 2 and s[1] == config.r}
    for key, value in tensors.items():
        check = want.get(str(key).rpartition(".")[2])
        shape = tuple(getattr(value, "shape", ()))
        if check is not None and not check(shape):
            raise ValueError(f"{source}: {key} has shape {shape}, but the folder's config says r={config.r} "
                             f"({rows} latent rows); the config and the weights come from different adapters. "
                             "Save the adapter again")


def check_same_fields(have: AdapterConfig, config: AdapterConfig, source: str, adapter_name: str,
                      has_projections: bool) -> None:
    """ValueError naming every field of the folder's ``config`` that differs from adapter ``adapter_name``'s
    ``have`` and that loading tensors cannot apply: those built into the graph or projections (r, bias,
    dropout; the PRNG key when the folder has no projections to load)."""
    fields = ["r", "bias", have._dropout_field, *([] if has_projections else ["projection_prng_key"])]
    names = {f.name for f in dataclasses.fields(have)}
    diff = [f"{f}={getattr(config, f)!r} (the adapter has {getattr(have, f)!r})" for f in fields
            if f in names and getattr(config, f) != getattr(have, f)]
    if diff:
        raise ValueError(f"{source}: its config differs from adapter {adapter_name!r} in {', '.join(diff)}; "
                         "loading weights cannot change those. Load it under a new adapter_name "
                         "(vera_fx.load_adapter(m, folder, adapter_name='other')) or into a fresh model "
                         "(vera_fx.from_pretrained)")
