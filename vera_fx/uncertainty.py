"""Monte Carlo predictions from PVeRA's learned distribution, and Student-t confidence intervals.

``monte_carlo`` runs a few large forwards of the repeated inputs instead of many small ones (a small forward's
cost is mostly per-call overhead); with ``generator_seed`` the samples equal sequential sampled forwards.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .compat import pytree
from .methods.pvera import KL_RECORD, NOISE_GROUPS, SAMPLE_SWITCH
from .sampling import pvera_states
from .sites import as_graph_module

logger = logging.getLogger(__name__)


def _chunks(args: tuple, kwargs: dict, n_samples: Any, max_batch: Any) -> tuple[int, list[int]]:
    """(the inputs' batch size, samples per forward: all at once, or as many as ``max_batch`` rows hold)."""
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} is invalid: expected an int >= 1, e.g. n_samples=16")
    sizes = {pytree.keystr(path): leaf.shape[0] for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]
             if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1}
    if not sizes:
        raise ValueError("monte_carlo needs at least one tensor input with a batch dimension (dim 0)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"monte_carlo repeats every tensor input along dim 0, so all must share the batch size; "
                         f"got {sizes}")
    batch = next(iter(sizes.values()))
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < batch):
        raise ValueError(f"max_batch={max_batch!r} is invalid: one sample needs the input's {batch} rows, so "
                         f"max_batch must be an int >= {batch}")
    per_chunk = n_samples if max_batch is None else min(n_samples, max_batch // batch)
    return batch, [min(per_chunk, n_samples - i) for i in range(0, n_samples, per_chunk)]


def _stacked(outputs: list[list[Any]], n_samples: int, batch: int) -> list[Any]:
    """The flattened outputs of every forward joined per leaf, each tensor shaped (n_samples, batch, ...); a
    tensor without the batch dimension becomes None."""
    combined: list[Any] = []
    dropped = 0
    for i, (leaf, _) in enumerate(outputs[0]):
        parts = [chunk[i] for chunk in outputs]
        if not isinstance(leaf, torch.Tensor):
            combined.append(leaf)
        elif all(t.dim() >= 1 and t.shape[0] == k * batch for t, k in parts):
            cat = torch.cat([t for t, _ in parts]) if len(parts) > 1 else leaf
            combined.append(cat.reshape(n_samples, batch, *cat.shape[1:]))
        else:
            combined.append(None)
            dropped += 1
    if dropped:
        logger.warning("monte_carlo: %d output tensor(s) have no batch dimension (e.g. a mean loss) and are "
                       "returned as None; capture the model without labels to leave them out", dropped)
    return combined


def monte_carlo(gm: nn.Module, *args: Any, n_samples: int = 16, max_batch: Optional[int] = None,
                **kwargs: Any) -> Any:
    """``n_samples`` sampled predictions for one input, every output tensor stacked along a new first dimension.

    Runs in eval mode without gradients, in as few forwards as ``max_batch`` (rows per forward) allows. Sites whose
    ``sample_at_inference`` is on sample; when none is, every PVeRA site does."""
    batch, chunks = _chunks(args, kwargs, n_samples, max_batch)
    inner = as_graph_module(gm)
    states = pvera_states(inner)
    modes = {name: m.training for name, m in inner.named_modules()}
    switches = {(st, s): getattr(st.site_module(s), SAMPLE_SWITCH) for st in states.values() for s in st.site_names}
    records = {st: dict(getattr(st, KL_RECORD).values) for st in states.values()}
    sample_all = not any(switches.values())
    outputs: list[list[Any]] = []
    try:
        inner.eval()
        for st, s in switches:
            setattr(st.site_module(s), SAMPLE_SWITCH, switches[st, s] or sample_all)
        with torch.no_grad():
            for k in tqdm(chunks, desc="monte carlo", unit="forward", leave=False,
                          disable=True if len(chunks) < 2 else None):
                for st in states.values():
                    setattr(st, NOISE_GROUPS, k)
                rep_args, rep_kwargs = pytree.tree_map(lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if isinstance(
                    t, torch.Tensor) and t.dim() >= 1 and k > 1 else t, (args, kwargs))  # along dim 0
                leaves, spec = pytree.tree_flatten(gm(*rep_args, **rep_kwargs))
                outputs.append([(leaf, k) for leaf in leaves])
    finally:
        for name, m in inner.named_modules():
            m.training = modes[name]
        for (st, s), on in switches.items():
            setattr(st.site_module(s), SAMPLE_SWITCH, on)
        for st, values in records.items():
            setattr(st, NOISE_GROUPS, 1)
            getattr(st, KL_RECORD).values = values
    return pytree.tree_unflatten(_stacked(outputs, n_samples, batch), spec)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mode: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # Lentz's method on 1 / (1 + e1 / (1 + e2 / (1 + ...))): numerators 1, e1, e2, ...; every denominator 1.
    tiny = 1e-300
    frac, c, d = tiny, tiny, 0.0
    for j in range(1, 5000):
        m = (j - 1) // 2
        if j == 1:
            num = 1.0
        elif j % 2 == 0:  # e_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # e_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / (1.0 + num * d if abs(1.0 + num * d) > tiny else tiny)
        c = 1.0 + num / c if abs(1.0 + num / c) > tiny else tiny
        frac *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * frac / a


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (relative error ~1e-12), by bisection:
    torch.distributions.StudentT has no icdf."""
    if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} is invalid: expected a probability strictly between 0 and 1")
    if not isinstance(df, (int, float)) or not df > 0:
        raise ValueError(f"df={df!r} is invalid: expected degrees of freedom > 0")
    if p <= 0.5:
        return 0.0 if p == 0.5 else -student_t_quantile(1.0 - p, df)
    if df in (1, 2):
        return math.tan(math.pi * (p - 0.5)) if df == 1 else (2 * p - 1) / math.sqrt(2 * p * (1.0 - p))
    if p <= 0.75:  # bisect on the accurate side: the central mass P(0 < T < t) near the centre, the tail beyond
        beyond = (lambda t: 0.5 * _betainc(0.5, df / 2.0, t * t / (df + t * t)) < p - 0.5)
    else:
        beyond = (lambda t: 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t)) > 1.0 - p)
    lo, hi = 0.0, 1.0
    while beyond(hi):
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if beyond(mid) else (lo, mid)
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def confidence_interval(samples: torch.Tensor, level: float = 0.95, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The Student-t confidence interval ``(low, high)`` of the mean along ``dim``."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor (e.g. one field of monte_carlo's output), got "
                        f"{type(samples).__name__}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} is invalid: expected a probability strictly between 0 and 1, e.g. 0.95")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -samples.dim() <= dim < max(samples.dim(), 1):
        raise ValueError(f"dim={dim!r} is invalid for samples of shape {tuple(samples.shape)}")
    n = samples.shape[dim] if samples.dim() else 1
    if n < 2:
        raise ValueError(f"samples has {n} entry along dim={dim}; an interval needs at least 2 samples: use "
                         "monte_carlo(..., n_samples=16) or more")
    x = samples if samples.is_floating_point() else samples.to(torch.get_default_dtype())
    mean, sem = x.mean(dim), x.std(dim, correction=1) / math.sqrt(n)
    half = sem * student_t_quantile((1.0 + float(level)) / 2.0, n - 1)
    return mean - half, mean + half
