"""A site's tail ``y + lambda_b * (z @ B.T)`` in the forms the lowerings emit.

At inference: ``site_apply``, or ``group_products`` + ``site_add`` (plain ops, only vectors scaled; what counts
is how often ``B`` is read and how many calls a site makes). In training, custom backwards that keep less than
the plain chain: ``fused_site`` (keeps ``u`` and VeRA's ``h``, half the plain chain's elementwise passes),
``vera_fx::lean_add`` (one ``addmm`` against ``lambda_b * B``; keeps only ``h`` and PVeRA's noise, and recomputes
``M = g.T @ z`` (out x r) for ``d lambda_b`` in backward instead of keeping ``u``) and PVeRA's KL term
``vera_fx::pvera_kl`` (float32; keeps ``h`` and ``lambda_d``). The custom ops stay single nodes under
torch.compile(fullgraph=True); ``lean_site`` runs them as an autograd.Function in an eager step.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
from torch import Tensor


def group_products(h: Tensor, b: Tensor, *lambda_d: Tensor, stacked: bool = True) -> tuple[Tensor, ...]:
    """``(h * lambda_d_k) @ B.T`` for every ``k`` (each ``(*h.shape[:-1], out)``): ``stacked``, one broadcast
    product over the stacked ``lambda_d`` and one ``linear`` over the ``n x tokens`` rows (``B`` read once); else
    one ``linear`` per site, back to back, so ``B`` is read again while it is in cache."""
    if not stacked:
        return latent_products(b, *(h * d for d in lambda_d))
    scales = torch.stack(lambda_d).view(len(lambda_d), *([1] * (h.dim() - 1)), h.shape[-1])
    return torch.nn.functional.linear(h * scales, b).unbind(0)


def latent_products(b: Tensor, *z: Tensor) -> tuple[Tensor, ...]:
    """``z_k @ B.T`` for every PVeRA latent ``z_k`` of a group, back to back (``B`` read again from cache)."""
    return tuple(torch.nn.functional.linear(t, b) for t in z)


def site_apply(y: Tensor, h: Tensor, b: Tensor, lambda_d: Optional[Tensor], lambda_b: Tensor,
               inplace: bool) -> Tensor:
    """One site's whole tail as one call: ``y + ((h * lambda_d) @ B.T) * lambda_b`` (VeRA), or with
    ``lambda_d=None`` ``y + (h @ B.T) * lambda_b`` (PVeRA's sampled or mean latent ``h``); three torch ops. Not
    ``inplace``: the plain chain's own ops (where autocast or torch.compile should see them)."""
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


def scale_smaller(z: Tensor, m: Tensor, lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(z * lambda_d, m)`` or ``(z, m * lambda_d)``, whichever scales fewer values, for ``z @ m.T`` (tokens x r
    against out x r: at decode the tokens, at a long prefill B's rows)."""
    if z.numel() < m.numel():
        return z * lambda_d, m
    return z, m * lambda_d


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
        return site_apply(y, z, b, lambda_d, lambda_b, False)
    inplace = inplace and y.is_contiguous() and y._base is None and not (y.is_leaf and y.requires_grad)
    return _FusedTail.apply(y, z, lambda_d, b, lambda_b, inplace)


def vera_grads(g: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, b_scaled: Tensor, want_h: bool,
               want_d: bool, want_b: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """VeRA's ``(d h, d lambda_d, d lambda_b)`` from ``g`` and ``h`` (``b_scaled = lambda_b * B``): ``M = (g.T @ h)
    * B`` (out x r, one pass) gives both lambdas' gradients as matrix-vector products, ``d h`` is ``(g @ b_scaled) *
    lambda_d``: no other out x r pass (at r ~ tokens those cost what the token tensors' passes do)."""
    grad_h = grad_lambda_d = grad_lambda_b = None
    if want_b or want_d:
        m = _scaled(torch.mm(g.reshape(-1, g.shape[-1]).T, h.reshape(-1, h.shape[-1])), b)
        grad_lambda_b = torch.mv(m, lambda_d.to(m.dtype)) if want_b else None
        grad_lambda_d = torch.mv(m.T, lambda_b.to(m.dtype)) if want_d else None
    if want_h:
        grad_h = _scaled(g @ b_scaled, lambda_d)
    return grad_h, grad_lambda_d, grad_lambda_b


def _scaled(t: Tensor, by: Tensor) -> Tensor:
    """``t * by``, in place into ``t`` (a fresh product) where the result keeps ``t``'s dtype."""
    return t.mul_(by) if torch.promote_types(t.dtype, by.dtype) == t.dtype else t * by


def _pvera_latent(h: Tensor, lambda_d: Tensor, eps: Optional[Tensor], r: int,
                  again: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """PVeRA's ``z`` from the halves of ``h`` and ``es = eps * exp(lv / 2)`` (None without noise), without a 2r-wide
    ``h * lambda_d``. Backward passes ``again``: the operands swap (the same values bit for bit) so a traced
    graph's common-subexpression pass does not merge them with the forward's, which would save them."""
    h_mu, ld_mu, h_lv, ld_lv = h[..., :r], lambda_d[:r], h[..., r:], 0.5 * lambda_d[r:]
    z = ld_mu * h_mu if again else h_mu * ld_mu
    if eps is None:
        return z, None
    es = (torch.exp(ld_lv * h_lv) if again else torch.mul(h_lv, ld_lv).exp_()).mul_(eps)
    return z.add_(es), es


def _lean_forward(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor],
                  r: int, probabilistic: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The op's output and, for PVeRA with noise outside autocast, ``es = eps * exp(lv / 2)``."""
    if torch.is_autocast_enabled(h.device.type):  # the plain ops, so autocast casts them alike (out of place)
        if not probabilistic:
            return site_apply(y, h, b, lambda_d, lambda_b, False), None
        z = h[..., :r] * lambda_d[:r]
        if eps is not None:
            z = z + torch.exp(h[..., r:] * (0.5 * lambda_d[r:])) * eps
        return site_apply(y, z, b, None, lambda_b, False), None
    es = None
    m = b * lambda_b.unsqueeze(-1)  # (out, r): the scales fold into the small matrix, not the token tensors
    if probabilistic:
        z, es = _pvera_latent(h, lambda_d, eps, r)
    else:
        z, m = scale_smaller(h, m, lambda_d)
    out, lead = m.shape[0], z.shape[:-1]
    if y.dtype == z.dtype == m.dtype and y.shape == (*lead, out):
        return torch.addmm(y.reshape(-1, out), z.reshape(-1, z.shape[-1]), m.T).view(*lead, out), es
    return y + torch.nn.functional.linear(z.to(m.dtype), m), es


def _lean_value(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
                probabilistic: bool) -> Tensor:
    """``y + lambda_b * (z @ B.T)``, ``z`` from ``h * lambda_d`` (VeRA) or its reparametrised sample (PVeRA)."""
    return _lean_forward(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)[0]


lean_add = torch.library.custom_op("vera_fx::lean_add", mutates_args=())(_lean_value)
lean_add.register_fake(_lean_value)


def _lean_setup(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's context object)
    y, h, lambda_d, b, lambda_b, eps, r, probabilistic = inputs[:8]
    ctx.save_for_backward(h, lambda_d, b, lambda_b, eps)
    ctx.r, ctx.probabilistic, ctx.y_shape, ctx.y_dtype = r, probabilistic, y.shape, y.dtype
    ctx.scaled_noise = False  # the fifth saved tensor is eps (``_LeanAdd`` may keep eps * exp(lv / 2))


def _lean_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lambda_d, b, lambda_b, noise = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad.sum_to_size(ctx.y_shape).to(ctx.y_dtype) if need[0] else None
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (h, lambda_d, b, lambda_b)))  # autocast is off
    g = grad.to(dtype).sum_to_size((*h.shape[:-1], grad.shape[-1]))
    hc, lambda_dc, b, lambda_bc = h.to(dtype), lambda_d.to(dtype), b.to(dtype), lambda_b.to(dtype)
    b_scaled = lambda_bc.unsqueeze(-1) * b  # operands in the other order than the forward's (see _pvera_latent)
    if ctx.probabilistic:
        noise = None if noise is None else noise.to(dtype)
        grad_h, grad_lambda_d, grad_lambda_b = _pvera_grads(ctx, g, hc, lambda_dc, b, b_scaled, noise, need)
    else:
        grad_h, grad_lambda_d, grad_lambda_b = vera_grads(g, hc, lambda_dc, b, lambda_bc, b_scaled, need[1], need[2],
                                                              need[4])
    return (grad_y, None if grad_h is None else grad_h.to(h.dtype),
            None if grad_lambda_d is None else grad_lambda_d.to(lambda_d.dtype), None,
            None if grad_lambda_b is None else grad_lambda_b.to(lambda_b.dtype), None, None, None)


def _pvera_grads(ctx, g: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, b_scaled: Tensor,  # noqa: ANN001
                 noise: Optional[Tensor], need: tuple) -> tuple[Optional[Tensor], ...]:
    """PVeRA's ``(d h, d lambda_d, d lambda_b)``; ``noise`` is ``eps``, or ``es`` where the forward kept it."""
    r = ctx.r
    z, es = _pvera_latent(h, lambda_d, None if ctx.scaled_noise else noise, r, again=True)
    if ctx.scaled_noise and noise is not None:  # the forward's own eps * exp(lv / 2): z without an exp
        z, es = z.add_(noise), noise
    g2 = g.reshape(-1, g.shape[-1])
    grad_lambda_b = _scaled(g2.T @ z.reshape(-1, r), b).sum(1) if need[4] else None  # the one extra product
    del z
    if not (need[1] or need[2]):
        return None, None, grad_lambda_b
    if torch.compiler.is_compiling():  # traced: plain ops and a cat, which inductor fuses
        gz = g @ b_scaled
        ges = gz * es if es is not None else torch.zeros_like(gz)
        h_mu, h_lv = h[..., :r], h[..., r:]
        grad_lambda_d = torch.cat([(gz * h_mu).reshape(-1, r).sum(0),
                                   (ges * h_lv).reshape(-1, r).sum(0) * 0.5]) if need[2] else None
        grad_h = torch.cat([gz * lambda_d[:r], ges * (0.5 * lambda_d[r:])], -1) if need[1] else None
        return grad_h, grad_lambda_d, grad_lambda_b
    # eager: d hd = [gz, gz * es / 2] in one (tokens, 2r) buffer (gz written there by the product), then
    # d lambda_d = sum_t buf * h and d h = buf * lambda_d in place: one allocation where per-half products make six
    buf = torch.empty(g2.shape[0], 2 * r, dtype=g.dtype, device=g.device)
    gz = torch.mm(g2, b_scaled, out=buf[:, :r])
    if es is None:
        buf[:, r:].zero_()
    else:
        torch.mul(gz, es.reshape(-1, r), out=buf[:, r:]).mul_(0.5)
    grad_lambda_d = (buf * h.reshape(-1, 2 * r)).sum(0) if need[2] else None
    grad_h = buf.mul_(lambda_d).view(h.shape) if need[1] else None
    return grad_h, grad_lambda_d, grad_lambda_b


lean_add.register_autograd(_lean_backward, setup_context=_lean_setup)


class _LeanAdd(torch.autograd.Function):
    """``lean_add``'s forward and backward as an autograd.Function: in an eager step no custom-op dispatch, and
    ``scaled`` keeps PVeRA's ``es`` instead of ``eps``; under torch.compile dynamo traces both, so inductor fuses
    the backward's elementwise work while what backward reads stays the op's (not ``z @ B.T``)."""

    @staticmethod
    def forward(ctx, y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor,  # noqa: ANN001
                eps: Optional[Tensor], r: int, probabilistic: bool, scaled: bool) -> Tensor:
        out, es = _lean_forward(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)
        _lean_setup(ctx, (y, h, lambda_d, b, lambda_b, es if scaled else eps, r, probabilistic), None)
        ctx.scaled_noise = scaled
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return (*_lean_backward(ctx, grad), None)


def lean_site(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
              probabilistic: bool, traced_when_compiled: bool) -> Tensor:
    """A lean site's graph node: ``_LeanAdd`` in an eager differentiable call on plain tensors outside autocast,
    and traced under torch.compile for a site ``auto`` made lean (the opaque op's unfused backward made a compiled
    step slower than the plain chain's); the op elsewhere (export, DTensor, autocast, no grad, forced lean)."""
    if traced_when_compiled and torch.compiler.is_compiling():
        return _LeanAdd.apply(y, h, lambda_d, b, lambda_b, eps, r, probabilistic, False)
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(h.device.type)
            and all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in (y, h, lambda_d, b, lambda_b))):
        return _LeanAdd.apply(y, h, lambda_d, b, lambda_b, eps, r, probabilistic, True)
    return torch.ops.vera_fx.lean_add(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)


@torch.library.custom_op("vera_fx::pvera_kl", mutates_args=())
def pvera_kl(h: Tensor, lambda_d: Tensor, r: int) -> Tensor:
    """``mean(-0.5 * (1 + lv - mu^2 - exp(lv)))`` in float32 for ``mu, lv`` the halves of ``h * lambda_d``."""
    hd = h * lambda_d
    return kl_term(hd[..., :r].float(), hd[..., r:].float())


def kl_term(mu: Tensor, lv: Tensor) -> Tensor:
    """``-0.5 * mean(1 + lv - mu^2 - exp(lv))``: the KL term of N(mu, exp(lv)) against N(0, 1)."""
    return -0.5 * torch.mean(1.0 + lv - mu.pow(2) - lv.exp())


@pvera_kl.register_fake
def _pvera_kl_fake(h: Tensor, lambda_d: Tensor, r: int) -> Tensor:
    return h.new_empty((), dtype=torch.float32)


def _kl_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    h, lambda_d, ctx.r = inputs
    ctx.save_for_backward(h, lambda_d)


def _kl_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lambda_d = ctx.saved_tensors
    r = ctx.r
    h32, ld32 = h.float(), lambda_d.float()
    h_mu, h_lv, ld_mu, ld_lv = h32[..., :r], h32[..., r:], ld32[:r], ld32[r:]
    c = grad.float() / h_mu.numel()
    g_mu = (h_mu * ld_mu).mul_(c)  # d mu = g mu / N
    g_lv = torch.exp(h_lv * ld_lv).sub_(1.0).mul_(0.5 * c)  # d lv = -g (1 - exp(lv)) / (2 N)
    grad_lambda_d = grad_h = None
    if ctx.needs_input_grad[1]:
        grad_lambda_d = torch.cat([(g_mu * h_mu).reshape(-1, r).sum(0),
                                   (g_lv * h_lv).reshape(-1, r).sum(0)]).to(lambda_d.dtype)
    if ctx.needs_input_grad[0]:
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        torch.mul(g_mu, ld_mu, out=grad_h[..., :r])
        torch.mul(g_lv, ld_lv, out=grad_h[..., r:])
        grad_h = grad_h.to(h.dtype)
    return grad_h, grad_lambda_d, None


pvera_kl.register_autograd(_kl_backward, setup_context=_kl_setup)
