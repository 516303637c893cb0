"""The inference form of the adapter tail (vera_fx/passes/infer.py emits it): B stays the shared tensor and only
vectors are scaled. Nothing is kept for backward, so what counts is how often ``B`` is read and how many calls
a site makes. Plain torch ops: a graph in eval mode with gradients enabled still has a backward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .pvera import KLRecord, LazyKL, pvera_record_kl, pvera_reparametrize


def group_products(h: Tensor, b: Tensor, *lambda_d: Tensor) -> tuple[Tensor, ...]:
    """``(h * lambda_d_k) @ B.T`` for every ``k`` (each ``(*h.shape[:-1], out)``): one broadcast product over the
    stacked ``lambda_d`` and one ``linear`` over the ``n x tokens`` rows, so ``B`` is read once."""
    scales = torch.stack(lambda_d).view(len(lambda_d), *([1] * (h.dim() - 1)), h.shape[-1])
    return torch.nn.functional.linear(h * scales, b).unbind(0)


def site_apply(y: Tensor, h: Tensor, b: Tensor, lambda_d: Optional[Tensor], lambda_b: Tensor,
               inplace: bool) -> Tensor:
    """One site's whole tail as one call: ``y + ((h * lambda_d) @ B.T) * lambda_b`` (VeRA), or with
    ``lambda_d=None`` ``y + (h @ B.T) * lambda_b`` (PVeRA's sampled or mean latent ``h``); three torch ops."""
    u = torch.nn.functional.linear(h if lambda_d is None else h * lambda_d, b)
    return site_add(y, u, None, lambda_b, inplace)


def site_add(y: Tensor, u: Union[Tensor, tuple[Tensor, ...]], k: Optional[int], lambda_b: Tensor,
             inplace: bool) -> Tensor:
    """``y + u[k] * lambda_b`` (``u`` itself when ``k`` is None): one ``addcmul_`` into ``y`` when ``inplace`` (no
    other reader of ``y``) and the sum keeps its dtype and shape, else the plain chain's ops."""
    delta = u if k is None else u[k]
    if inplace and y.dtype == delta.dtype == lambda_b.dtype and y.shape == delta.shape and not (
            y.requires_grad and y.is_leaf):
        return y.addcmul_(delta, lambda_b)
    return y + delta * lambda_b


def pvera_group_h(x: Tensor, a: Tensor, r: int, training: bool, *samples: bool) -> Tensor:
    """``h`` of the PVeRA sites reading one ``x``: the mean's rows only, ``x @ A[:r, :in].T``, when none of them
    samples (eval mode, every ``sample_at_inference`` switch off, read now), else all 2r rows."""
    return torch.nn.functional.linear(x, a if training or any(samples) else a[:r])


def pvera_latent(h: Tensor, lambda_d: Tensor, r: int, training: bool, sample: bool, generator_state: Optional[Tensor],
                 groups: int, record: Optional[KLRecord], key: str, x: Tensor, a: Tensor) -> Tensor:
    """One PVeRA site's latent at inference from its group's ``h``: the mean ``h * lambda_d[:r]`` when ``h`` holds
    the mean's rows only (its KL term recorded from ``x``, computed when read: ``LazyKL``), else the plain
    chain's ``mu + eps * exp(logvar / 2)`` or ``mu`` and its KL term (none with ``record=None``: generation)."""
    if h.shape[-1] == r:
        if record is not None:
            record.values[key] = LazyKL(None, lambda_d.clone(), r, x, a)
        return h * lambda_d[:r]
    hd = h * lambda_d
    mu, logvar = hd[..., :r], hd[..., r:]
    z = pvera_reparametrize(mu, logvar, training, sample, generator_state, groups)
    if record is not None:
        pvera_record_kl(mu, logvar, record, key)
    return z
