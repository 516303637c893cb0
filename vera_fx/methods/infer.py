"""The inference form of the adapter tail: B stays the shared tensor and only vectors are scaled.

At inference (eval mode, ``no_grad``, ``inference_mode``) nothing is kept for backward, so the training paths'
trade-offs (what to save, what to recompute) do not apply; what counts is how often the shared ``B`` is read
and how many calls a site makes. The inference form of a site group (the sites that read one ``h = x @ A.T``
and one slice of ``B``: q/k/v, gate/up) is

- ``u = group_products(h, B, lambda_d_1, ..., lambda_d_n)``: ``Z = h * lambda_d_k`` for every site at once
  (one broadcast product over the stacked ``lambda_d``) and one ``mm`` of the ``n x tokens`` rows against
  ``B.T``, so ``B`` is read once per group, not once per site; nothing out x r is formed (the training paths'
  ``lambda_b * B * lambda_d`` would be, per call);
- per site ``y + u[k] * lambda_b_k`` (``site_add``: one ``addcmul``, in place into the base call's output
  where the lower pass allows it and the dtypes agree; otherwise the plain chain's own ops).

A site alone takes ``site_products(h, B, lambda_d)``; PVeRA hands its (sampled or mean) latent per site:
``latent_products(B, z)``. Both are plain torch ops, differentiable by autograd, so a graph in eval mode with gradients enabled
still has a backward (it keeps what the plain path keeps).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


def group_products(h: Tensor, b: Tensor, *lambda_d: Tensor) -> tuple[Tensor, ...]:
    """``(h * lambda_d_k) @ B.T`` for every ``k`` (each shaped ``(*h.shape[:-1], out)``): one broadcast product
    and one ``linear`` over the ``n x tokens`` rows, so ``B`` is read once; five torch calls for the group."""
    scales = torch.stack(lambda_d).view(len(lambda_d), *([1] * (h.dim() - 1)), h.shape[-1])
    return torch.nn.functional.linear(h * scales, b).unbind(0)


def site_products(h: Tensor, b: Tensor, lambda_d: Tensor) -> Tensor:
    """``(h * lambda_d) @ B.T`` for one site (VeRA)."""
    return torch.nn.functional.linear(h * lambda_d, b)


def latent_products(b: Tensor, z: Tensor) -> Tensor:
    """``z @ B.T`` for one site's latent (PVeRA's sample or mean)."""
    return torch.nn.functional.linear(z, b)


def site_add(y: Tensor, u: Union[Tensor, tuple[Tensor, ...]], k: Optional[int], lambda_b: Tensor,
             inplace: bool) -> Tensor:
    """``y + u[k] * lambda_b`` (``u`` itself when ``k`` is None): in place into ``y`` when ``inplace`` (the lower pass checked ``y`` has no other
    reader) and the sum keeps ``y``'s dtype and shape, else out of place with the plain chain's type promotion."""
    delta = u if k is None else u[k]
    if inplace and y.dtype == delta.dtype == lambda_b.dtype and y.shape == delta.shape and not (
            y.requires_grad and y.is_leaf):
        return y.addcmul_(delta, lambda_b)
    return y + delta * lambda_b
