"""The fused activation tail: a site's ``y + lambda_b * (z @ B.T)`` as one call with its own backward.

The plain path runs ``z = h * lambda_d``, ``u = z @ B.T``, ``v = u * lambda_b``, ``y + v``: two passes over a tokens
x out tensor in forward and two in backward. ``fused_site`` runs ``u = (h * lambda_d) @ B.T`` or ``h @ (B *
lambda_d).T``, whichever scales fewer values (PVeRA hands its sampled ``z``), and ``y += u * lambda_b``
(``addcmul_``, in place where the lower pass found no other reader and the tensor allows it); backward: ``d
lambda_b = sum_t g * u``, ``gz = g @ (lambda_b * B)`` (or ``(g * lambda_b) @ B``), VeRA ``d lambda_d = sum_t gz *
h``, ``d h = gz * lambda_d``, PVeRA ``d z = gz``. It keeps ``u`` and VeRA's ``h`` (the group's): what the plain
path keeps, with about half its elementwise work. Under torch.compile and autocast, and for mixed dtypes or
broadcasting, it is the plain chain's own ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lean import plain_tail, scale_smaller


class _FusedTail(torch.autograd.Function):
    """``y + lambda_b * (z @ B.T)`` (``z = h * lambda_d`` when ``lambda_d`` is given)."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, lambda_d: Optional[Tensor], b: Tensor, lambda_b: Tensor,  # noqa: ANN001
                inplace: bool) -> Tensor:
        out = b.shape[0]
        z2 = z.reshape(-1, z.shape[-1])
        z2, m = (z2, b) if lambda_d is None else scale_smaller(z2, b, lambda_d)
        u = z2 @ m.T  # (tokens, out)
        # PVeRA's z is not needed (d z = g @ (lambda_b * B)): only VeRA's h, which the group keeps anyway
        ctx.save_for_backward(z if lambda_d is not None else None, u, lambda_d, b, lambda_b)
        ctx.z_shape = z.shape
        if inplace:
            y.view(-1, out).addcmul_(u, lambda_b)
            ctx.mark_dirty(y)
            return y
        return torch.addcmul(y, u.view(y.shape), lambda_b)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        z, u, lambda_d, b, lambda_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(u.shape)
        grad_lambda_b = (g * u).sum(0) if need[4] else None
        grad_z = grad_lambda_d = None
        if need[1] or need[2]:
            # (tokens, r): d (h * lambda_d), or d z; lambda_b scales whichever of g and B is smaller
            gz = (g * lambda_b) @ b if g.numel() < b.numel() else g @ (lambda_b.unsqueeze(-1) * b)
            if lambda_d is None:
                grad_z = gz.view(ctx.z_shape)
            else:
                if need[2]:
                    grad_lambda_d = (gz * z.reshape(gz.shape)).sum(0)
                if need[1]:
                    grad_z = gz.mul_(lambda_d).view(z.shape)
        return grad if need[0] else None, grad_z, grad_lambda_d, None, grad_lambda_b, None


def fused_site(y: Tensor, z: Tensor, lambda_d: Optional[Tensor], b: Tensor, lambda_b: Tensor,
               inplace: bool = False) -> Tensor:
    """A fused site's graph node: ``y + lambda_b * ((z * lambda_d) @ B.T)`` (VeRA: ``z`` is the group's ``h``;
    PVeRA: the sampled latent, ``lambda_d`` None); ``inplace``: ``y`` has no other reader."""
    dtype = y.dtype
    same = z.dtype == dtype and b.dtype == dtype and lambda_b.dtype == dtype and (
        lambda_d is None or lambda_d.dtype == dtype)
    if (not same or torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type)
            or y.shape != (*z.shape[:-1], b.shape[0])):
        return plain_tail(y, z, lambda_d, b, lambda_b)
    inplace = inplace and y.is_contiguous() and y._base is None and not (y.is_leaf and y.requires_grad)
    return _FusedTail.apply(y, z, lambda_d, b, lambda_b, inplace)
