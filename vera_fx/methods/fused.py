"""The fused activation tail: a site's ``y + lambda_b * (z @ B.T)`` as one call with its own backward.

The plain (activation) path of a site runs ``z = h * lambda_d``, ``u = z @ B.T``, ``v = u * lambda_b`` and ``y +
v`` as four nodes: two passes over a tokens x out tensor in forward (each a fresh allocation) and two more in
backward (``g * lambda_b`` and ``g * u``), and it keeps ``z`` (r values per token) and ``u`` (out values per
token) per site. ``fused_site`` computes the same sum with one product and one pass, in place in the base call's
output:

- forward: ``u = h @ (B * lambda_d).T`` (VeRA: the scale folds into the small out x r matrix, so ``z`` is never
  formed; PVeRA hands the sampled ``z`` and ``B``), then ``y += u * lambda_b`` (``addcmul_``);
- backward (``g = d loss / d y``): ``d lambda_b = sum_t g * u``, ``gz = g @ (lambda_b * B)`` (the plain path's
  product with the scale folded in), VeRA: ``d lambda_d = sum_t gz * h``, ``d h = gz * lambda_d``; PVeRA: ``d z
  = gz``. ``y``'s gradient is the output's.

It keeps ``u`` and, for VeRA, ``h`` (the group's shared tensor, stored once): what the plain path keeps, with
its multiply-adds and about half its elementwise work. (For PVeRA the lower pass also records the site's KL
term from ``h``, computed when read, as on the lean path.) The lean op
(methods/lean.py) keeps less and computes one more product; which a site gets is the lower pass's choice.

The call falls back to the plain chain's own ops wherever those are the better form: under torch.compile
(inductor fuses them itself and its partitioner chooses what to keep), under autocast (the ops' dtypes are
autocast's), when the operands' dtypes or shapes differ (casts, broadcasting). It adds in place only where the
lower pass said the base output has no other reader and the tensor allows it (contiguous, not a view, not a
leaf that trains); elsewhere ``addcmul`` out of place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _plain(y: Tensor, z: Tensor, lambda_d: Optional[Tensor], b: Tensor, lambda_b: Tensor) -> Tensor:
    """The activation path's own ops (what the emitter's nodes compute)."""
    if lambda_d is not None:
        z = z * lambda_d
    return y + torch.nn.functional.linear(z, b) * lambda_b


class _FusedTail(torch.autograd.Function):
    """``y + lambda_b * (z @ B.T)`` (``z = h * lambda_d`` when ``lambda_d`` is given); see the module docstring."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, lambda_d: Optional[Tensor], b: Tensor, lambda_b: Tensor,  # noqa: ANN001
                inplace: bool) -> Tensor:
        out = b.shape[0]
        m = b if lambda_d is None else b * lambda_d  # (out, r)
        u = z.reshape(-1, z.shape[-1]) @ m.T  # (tokens, out)
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
            gz = g @ (lambda_b.unsqueeze(-1) * b)  # (tokens, r): d (h * lambda_d), or d z
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
    PVeRA: the sampled latent, ``lambda_d`` None). ``inplace``: the lower pass found ``y`` read by this call
    only, so the sum may be written into it."""
    dtype = y.dtype
    same = z.dtype == dtype and b.dtype == dtype and lambda_b.dtype == dtype and (
        lambda_d is None or lambda_d.dtype == dtype)
    if (not same or torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type)
            or y.shape != (*z.shape[:-1], b.shape[0])):
        return _plain(y, z, lambda_d, b, lambda_b)
    inplace = inplace and y.is_contiguous() and y._base is None and not (y.is_leaf and y.requires_grad)
    return _FusedTail.apply(y, z, lambda_d, b, lambda_b, inplace)
