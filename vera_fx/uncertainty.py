"""Monte Carlo predictions from PVeRA's learned distribution, and Student-t confidence intervals.

``monte_carlo`` repeats the inputs along the batch and runs a few large forwards instead of many small
ones: on CPU and GPU alike most of the cost of a small forward is per-call overhead, which batching pays
once. With ``generator_seed`` every sample's noise is drawn as its own block from each site's stream, so
the samples equal those of ``n_samples`` sampled forwards one after the other and do not depend on
``max_batch``.
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


def _batch_size(args: tuple, kwargs: dict) -> int:
    sizes = {}
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            sizes[pytree.keystr(path)] = leaf.shape[0]
    if not sizes:
        raise ValueError("monte_carlo needs at least one tensor input with a batch dimension (dim 0)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"monte_carlo repeats every tensor input along dim 0, so all must share the batch size; "
                         f"got {sizes}")
    return next(iter(sizes.values()))


def _repeat(obj: Any, k: int) -> Any:
    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and k > 1:
            return t.repeat(k, *([1] * (t.dim() - 1)))
        return t

    return pytree.tree_map(rep, obj)


def _chunks(n_samples: int, max_batch: Optional[int], batch: int) -> list[int]:
    """Samples per forward: all at once, or as many as ``max_batch`` rows hold."""
    if max_batch is None:
        per_chunk = n_samples
    elif not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < batch:
        raise ValueError(f"max_batch={max_batch!r} is invalid: one sample needs the input's {batch} rows, so "
                         f"max_batch must be an int >= {batch}")
    else:
        per_chunk = min(n_samples, max_batch // batch)
    return [min(per_chunk, n_samples - i) for i in range(0, n_samples, per_chunk)]


def _stacked(outputs: list[list[Any]], n_samples: int, batch: int) -> list[Any]:
    """The flattened outputs of every forward joined per leaf, each tensor reshaped to (n_samples, batch,
    ...); a tensor without the batch dimension becomes None (with a warning)."""
    combined: list[Any] = []
    dropped = []
    for i, first in enumerate(outputs[0]):
        leaf = first[0]
        if not isinstance(leaf, torch.Tensor):
            combined.append(leaf)
            continue
        parts = [chunk[i] for chunk in outputs]
        if all(t.dim() >= 1 and t.shape[0] == k * batch for t, k in parts):
            cat = torch.cat([t for t, _ in parts]) if len(parts) > 1 else leaf
            combined.append(cat.reshape(n_samples, batch, *cat.shape[1:]))
        else:
            combined.append(None)
            dropped.append(i)
    if dropped:
        logger.warning("monte_carlo: %d output tensor(s) have no batch dimension (e.g. a mean loss) and are "
                       "returned as None; capture the model without labels to leave them out", len(dropped))
    return combined


def monte_carlo(gm: nn.Module, *args: Any, n_samples: int = 16, max_batch: Optional[int] = None,
                **kwargs: Any) -> Any:
    """``n_samples`` sampled predictions for one input, in the model's output structure with every tensor
    stacked along a new first dimension of size ``n_samples``.

    The inputs are repeated along dim 0 and run in as few forwards as ``max_batch`` (rows per forward)
    allows, in eval mode without gradients. Sites whose ``sample_at_inference`` is on sample; when none is
    on, every PVeRA site does. The model's modes, switches and KL records are restored afterwards, on error
    too. Outputs without the batch dimension (a scalar ``loss``) cannot be split per sample: they come back
    as None (capture without ``labels`` to avoid them).
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} is invalid: expected an int >= 1, e.g. n_samples=16")
    inner = as_graph_module(gm)
    states = pvera_states(inner)
    batch = _batch_size(args, kwargs)
    chunks = _chunks(n_samples, max_batch, batch)

    modes = {name: m.training for name, m in inner.named_modules()}
    switches = {name: {s: getattr(st.site_module(s), SAMPLE_SWITCH) for s in st.site_names}
                for name, st in states.items()}
    records = {name: dict(getattr(st, KL_RECORD).values) for name, st in states.items()}
    if not any(any(sw.values()) for sw in switches.values()):
        for st in states.values():
            for s in st.site_names:
                setattr(st.site_module(s), SAMPLE_SWITCH, True)
    outputs: list[list[Any]] = []
    spec = None
    try:
        inner.eval()
        with torch.no_grad():
            for k in tqdm(chunks, desc="monte carlo", unit="forward", leave=False,
                          disable=True if len(chunks) < 2 else None):
                for st in states.values():
                    setattr(st, NOISE_GROUPS, k)
                out = gm(*_repeat(args, k), **_repeat(kwargs, k))
                leaves, spec = pytree.tree_flatten(out)
                outputs.append([(leaf, k) for leaf in leaves])
    finally:
        for name, m in inner.named_modules():
            m.training = modes[name]
        for name, st in states.items():
            setattr(st, NOISE_GROUPS, 1)
            for s, on in switches[name].items():
                setattr(st.site_module(s), SAMPLE_SWITCH, on)
            getattr(st, KL_RECORD).values = records[name]
    combined = _stacked(outputs, n_samples, batch)
    return pytree.tree_unflatten(combined, spec)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mode: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # Lentz's method on 1 / (1 + e1 / (1 + e2 / (1 + ...))): numerators 1, e1, e2, ...; every denominator 1.
    tiny = 1e-300
    frac, c, d = tiny, tiny, 0.0
    for j in range(1, 5000):
        m, odd = divmod(j - 1, 2)
        if j == 1:
            num = 1.0
        elif odd:  # e_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # e_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        frac *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * frac / a


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0 under Student's t with ``df`` degrees of freedom."""
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def _t_central(t: float, df: float) -> float:
    """P(0 < T < t) for t >= 0 (accurate where the tail form loses digits, near the centre)."""
    return 0.5 * _betainc(0.5, df / 2.0, t * t / (df + t * t))


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (float64, relative error ~1e-12).

    torch.distributions.StudentT has no icdf: this brackets the upper tail and bisects it, with closed
    forms for df = 1 and 2.
    """
    if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} is invalid: expected a probability strictly between 0 and 1")
    if not isinstance(df, (int, float)) or not df > 0:
        raise ValueError(f"df={df!r} is invalid: expected degrees of freedom > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    q = 1.0 - p
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * q)
    # Bisect on whichever side is accurate: the central mass P(0 < T < t) near the centre, the tail beyond.
    if p <= 0.75:
        beyond = (lambda t: _t_central(t, df) < p - 0.5)
    else:
        beyond = (lambda t: _t_upper_tail(t, df) > q)
    lo, hi = 0.0, 1.0
    while beyond(hi):
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if beyond(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def confidence_interval(samples: torch.Tensor, level: float = 0.95, dim: int = 0) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """The Student-t confidence interval of the mean along ``dim``: ``mean -+ sem * t((1 + level) / 2, n - 1)``
    with ``sem = std / sqrt(n)`` (unbiased std). Returns ``(low, high)`` without ``dim``."""
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
    mean = x.mean(dim)
    sem = x.std(dim, correction=1) / math.sqrt(n)
    half = sem * student_t_quantile((1.0 + float(level)) / 2.0, n - 1)
    return mean - half, mean + half
