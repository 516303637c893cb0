"""The memory-lean adapter tail: custom ops with their own backward, used by the lower pass.

The plain (activation) path of a site is ``z = f(h * lambda_d)``, ``u = z @ B.T``, ``delta = u * lambda_b`` with
``h = x @ A.T`` shared by the sites that read ``x``; autograd keeps ``h * lambda_d`` and ``z`` (r or 2r values per
token) and ``u`` (out values per token) for every site. ``vera_fx::lean_delta`` computes the same ``delta`` in
one node and keeps only what it was given: ``h`` (one tensor for the whole group of sites reading ``x``, so it
is stored once) and, for PVeRA, the noise ``eps`` it was handed (so backward uses exactly the forward's draw).

Backward (``g = d loss / d delta``, sums over every leading (token) dimension, ``hd = h * lambda_d``):

- VeRA: ``z = hd``. PVeRA: ``mu, lv = hd[..., :r], hd[..., r:]``, ``s = exp(lv / 2)``, ``z = mu + eps * s``
  (``z = mu`` without noise);
- ``d lambda_b[o] = sum_t g[t, o] * u[t, o] = sum_k B[o, k] * M[o, k]`` with ``M = g.T @ z`` (out x r): one extra
  token x r x out product instead of keeping ``u``;
- ``gz = (g * lambda_b) @ B`` (token x r), as in the plain path;
- ``d hd = gz`` (VeRA); ``d mu = gz``, ``d lv = gz * eps * s / 2`` (PVeRA; zero without noise);
- ``d lambda_d = sum_t d hd * h``, ``d h = d hd * lambda_d`` (autograd carries ``d h`` on into ``x @ A.T``).

``vera_fx::pvera_kl`` is PVeRA's KL term from the same ``h`` and ``lambda_d`` (float32, as the plain path):
``kl = -0.5 * mean(1 + lv - mu^2 - exp(lv))``, so ``d mu = g * mu / N`` and ``d lv = -0.5 * g * (1 - exp(lv)) / N``
with ``N = mu.numel()``; it keeps ``h`` and ``lambda_d`` only, where the plain path keeps ``hd`` and ``exp(lv)``.

Both are ``torch.library`` custom ops with ``register_autograd``, so torch.compile(fullgraph=True) traces them
as single nodes and their backward as ordinary aten ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.node import has_side_effect

__all__ = ["lean_delta", "pvera_kl", "pvera_lean_noise"]


def _latent(hd: Tensor, eps: Optional[Tensor], r: int, probabilistic: bool) -> tuple[Tensor, Optional[Tensor]]:
    """z from ``hd = h * lambda_d``, and ``s = exp(lv / 2)`` when noise was drawn."""
    if not probabilistic:
        return hd, None
    mu = hd[..., :r]
    if eps is None:
        return mu, None
    std = torch.exp(0.5 * hd[..., r:])
    return mu + eps * std, std


@torch.library.custom_op("vera_fx::lean_delta", mutates_args=())
def lean_delta(h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
               probabilistic: bool) -> Tensor:
    """``lambda_b * (z @ B.T)`` with ``z`` from ``h * lambda_d`` (VeRA) or its reparametrised sample (PVeRA)."""
    z, _ = _latent(h * lambda_d, eps, r, probabilistic)
    return torch.nn.functional.linear(z, b) * lambda_b


@lean_delta.register_fake
def _lean_delta_fake(h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
                     probabilistic: bool) -> Tensor:
    return h.new_empty((*h.shape[:-1], b.shape[0]), dtype=torch.result_type(h, lambda_b))


def _lean_setup(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's context object)
    h, lambda_d, b, lambda_b, eps, r, probabilistic = inputs
    ctx.save_for_backward(h, lambda_d, b, lambda_b, eps)
    ctx.r, ctx.probabilistic = r, probabilistic


def _lean_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lambda_d, b, lambda_b, eps = ctx.saved_tensors
    r, probabilistic = ctx.r, ctx.probabilistic
    hd = h * lambda_d
    z, std = _latent(hd, eps, r, probabilistic)
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_lambda_b = None
    if ctx.needs_input_grad[3]:
        m = g2.T @ z.reshape(-1, z.shape[-1])  # (out, r)
        grad_lambda_b = (m * b).sum(1).to(lambda_b.dtype)
    gz = torch.nn.functional.linear(grad * lambda_b, b.T)  # (..., r)
    if probabilistic:
        glv = gz * eps * std * 0.5 if std is not None else torch.zeros_like(gz)
        ghd = torch.cat([gz, glv], dim=-1)
    else:
        ghd = gz
    grad_lambda_d = (ghd * h).reshape(-1, h.shape[-1]).sum(0).to(lambda_d.dtype) if ctx.needs_input_grad[1] else None
    grad_h = ghd * lambda_d if ctx.needs_input_grad[0] else None
    return grad_h, grad_lambda_d, None, grad_lambda_b, None, None, None


lean_delta.register_autograd(_lean_backward, setup_context=_lean_setup)


@torch.library.custom_op("vera_fx::pvera_kl", mutates_args=())
def pvera_kl(h: Tensor, lambda_d: Tensor, r: int) -> Tensor:
    """``mean(-0.5 * (1 + lv - mu^2 - exp(lv)))`` in float32 for ``mu, lv`` the halves of ``h * lambda_d``."""
    hd = h * lambda_d
    mu, lv = hd[..., :r].float(), hd[..., r:].float()
    return -0.5 * torch.mean(1.0 + lv - mu.pow(2) - lv.exp())


@pvera_kl.register_fake
def _pvera_kl_fake(h: Tensor, lambda_d: Tensor, r: int) -> Tensor:
    return h.new_empty((), dtype=torch.float32)


def _kl_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    h, lambda_d, r = inputs
    ctx.save_for_backward(h, lambda_d)
    ctx.r = r


def _kl_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lambda_d = ctx.saved_tensors
    r = ctx.r
    hd = h * lambda_d
    mu, lv = hd[..., :r].float(), hd[..., r:].float()
    n = mu.numel()
    ghd = torch.cat([grad * mu / n, -0.5 * grad * (1.0 - lv.exp()) / n], dim=-1).to(h.dtype)
    grad_lambda_d = (ghd * h).reshape(-1, h.shape[-1]).sum(0).to(lambda_d.dtype) if ctx.needs_input_grad[1] else None
    grad_h = ghd * lambda_d if ctx.needs_input_grad[0] else None
    return grad_h, grad_lambda_d, None


pvera_kl.register_autograd(_kl_backward, setup_context=_kl_setup)


@has_side_effect
def pvera_lean_noise(h: Tensor, r: int, training: bool, sample: bool, generator_state: Optional[Tensor],
                     groups: int) -> Optional[Tensor]:
    """The noise ``pvera_reparametrize`` would draw at this site (same stream, shape and dtype), or None when
    the site uses the mean."""
    if not (training or sample):
        return None
    shape = (*h.shape[:-1], r)
    if generator_state is None:
        return torch.randn(shape, dtype=h.dtype, device=h.device)
    return torch.ops.vera_fx.pvera_noise(generator_state, shape, groups, h.dtype).to(h.device)
