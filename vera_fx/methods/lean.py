"""The memory-lean adapter tail: custom ops with their own backward, used by the lower pass.

The plain (activation) path of a site is ``z = f(h * lambda_d)``, ``u = z @ B.T``, ``y + u * lambda_b`` with
``h = x @ A.T`` shared by the sites that read ``x``; autograd keeps ``h * lambda_d`` and ``z`` (r or 2r values per
token) and ``u`` (out values per token) for every site. ``vera_fx::lean_add`` computes the same ``y + delta`` in
one node (one ``addmm`` against ``lambda_b * B``, ``* lambda_d`` too for VeRA: no pass over a token x out
tensor besides the product) and keeps only what it was given: ``h`` (one tensor for the whole group of sites
reading ``x``, so it is stored once) and, for PVeRA, the noise ``eps`` it was handed (so backward uses exactly
the forward's draw). Not ``y``: its gradient is the output's.

Backward (``g = d loss / d output``, sums over every leading (token) dimension, ``hd = h * lambda_d``):

- VeRA: ``z = hd``. PVeRA: ``mu, lv = hd[..., :r], hd[..., r:]``, ``s = exp(lv / 2)``, ``z = mu + eps * s``
  (``z = mu`` without noise);
- ``d lambda_b[o] = sum_t g[t, o] * u[t, o] = sum_k B[o, k] * M[o, k]`` with ``M = g.T @ z`` (out x r): one extra
  token x r x out product instead of keeping ``u`` (VeRA: ``M = g.T @ h`` against ``B * lambda_d``);
- ``gz = g @ (lambda_b * B)`` (token x r), the plain path's product with the scale folded in;
- ``d hd = gz`` (VeRA); ``d mu = gz``, ``d lv = gz * eps * s / 2`` (PVeRA; zero without noise);
- ``d lambda_d = sum_t d hd * h``, ``d h = d hd * lambda_d`` (autograd carries ``d h`` on into ``x @ A.T``).
  For VeRA ``M = g.T @ h`` gives ``d lambda_d = sum_o (lambda_b * B) * M`` as well, and ``d h`` is one product
  ``g @ (lambda_b * B * lambda_d)``: no pass over a tokens x r tensor besides the products.

``vera_fx::pvera_kl`` is PVeRA's KL term from the same ``h`` and ``lambda_d`` (float32, as the plain path):
``kl = -0.5 * mean(1 + lv - mu^2 - exp(lv))``, so ``d mu = g * mu / N`` and ``d lv = -0.5 * g * (1 - exp(lv)) / N``
with ``N = mu.numel()``; it keeps ``h`` and ``lambda_d`` only, where the plain path keeps ``hd`` and ``exp(lv)``.

Both are ``torch.library`` custom ops with ``register_autograd``, so torch.compile(fullgraph=True) traces them
as single nodes and their backward as ordinary aten ops. An eager training step runs the lean op's forward
and backward as an autograd.Function instead (``lean_site``): no custom-op dispatch per call, and PVeRA keeps
``es = eps * exp(lv / 2)`` (eps's size) rather than ``eps``, so backward forms ``z`` with one add, no exp; its
backward builds ``d (h * lambda_d)`` in one (tokens, 2r) buffer that becomes ``d h`` in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.node import has_side_effect


def _pvera_latent(h: Tensor, lambda_d: Tensor, eps: Optional[Tensor], r: int,
                  again: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """PVeRA's ``z`` from the halves of ``h``: ``mu = h[..., :r] * lambda_d[:r]``, plus ``es = eps * exp(lv / 2)``
    when noise was drawn (returned too: backward needs it). Forward and backward both call this, so backward
    sees the forward's values bit for bit, without a 2r-wide ``h * lambda_d``. Backward passes ``again``: the
    products' operands swap (bit for bit the same values), so that a traced graph's common-subexpression pass
    does not merge them with the forward's, which would make them saved tensors instead of recomputed ones."""
    h_mu, ld_mu, h_lv, ld_lv = h[..., :r], lambda_d[:r], h[..., r:], 0.5 * lambda_d[r:]
    z = ld_mu * h_mu if again else h_mu * ld_mu
    if eps is None:
        return z, None
    es = (torch.exp(ld_lv * h_lv) if again else torch.mul(h_lv, ld_lv).exp_()).mul_(eps)
    return z.add_(es), es


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _lean_add_impl(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor],
                   r: int, probabilistic: bool) -> Tensor:
    return _lean_forward(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)[0]


def _lean_forward(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor],
                  r: int, probabilistic: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The op's output and, for PVeRA with noise outside autocast, the scaled noise ``eps * exp(lv / 2)``."""
    es = None
    if torch.is_autocast_enabled(h.device.type):  # the plain chain's own ops, so autocast casts them alike
        if not probabilistic:  # (out of place: an in-place exp would keep its dtype where the plain one promotes)
            z = h * lambda_d
        else:
            z = h[..., :r] * lambda_d[:r]
            if eps is not None:
                z = z + torch.exp(h[..., r:] * (0.5 * lambda_d[r:])) * eps
        return y + torch.nn.functional.linear(z, b) * lambda_b, None
    m = b * lambda_b.unsqueeze(-1)  # (out, r): the scales fold into the small matrix, not the token tensors
    if probabilistic:
        z, es = _pvera_latent(h, lambda_d, eps, r)
    else:
        z, m = h, m * lambda_d
    out = m.shape[0]
    lead = z.shape[:-1]
    if y.dtype == z.dtype == m.dtype and y.shape == (*lead, out):
        return torch.addmm(y.reshape(-1, out), z.reshape(-1, z.shape[-1]), m.T).view(*lead, out), es
    return y + torch.nn.functional.linear(z.to(m.dtype), m), es


@torch.library.custom_op("vera_fx::lean_add", mutates_args=())
def lean_add(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
             probabilistic: bool) -> Tensor:
    """``y + lambda_b * (z @ B.T)`` with ``z`` from ``h * lambda_d`` (VeRA) or its reparametrised sample (PVeRA),
    as one ``addmm`` against ``lambda_b * B`` (``* lambda_d`` too for VeRA, so ``h`` is read as it is); under
    autocast the plain chain's ops, so the result has the plain path's dtype."""
    return _lean_add_impl(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)


@lean_add.register_fake
def _lean_add_fake(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor],
                   r: int, probabilistic: bool) -> Tensor:
    return _lean_add_impl(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)  # on fake tensors: shape, dtype


def _lean_setup(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's context object)
    y, h, lambda_d, b, lambda_b, eps, r, probabilistic = inputs
    ctx.save_for_backward(h, lambda_d, b, lambda_b, eps)
    ctx.r, ctx.probabilistic, ctx.y_shape, ctx.y_dtype = r, probabilistic, y.shape, y.dtype
    ctx.scaled_noise = False  # the fifth saved tensor is eps (``_EagerLeanAdd`` keeps eps * exp(lv / 2))


def _lean_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lambda_d, b, lambda_b, noise = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad.sum_to_size(ctx.y_shape).to(ctx.y_dtype) if need[0] else None
    dtype = _compute_dtype(h, lambda_d, b, lambda_b)  # in backward autocast is off: one dtype for all
    g = grad.to(dtype).sum_to_size((*h.shape[:-1], grad.shape[-1]))
    hc, lambda_dc, b, lambda_bc = h.to(dtype), lambda_d.to(dtype), b.to(dtype), lambda_b.to(dtype)
    # lambda_b * B, (out, r); operands in the other order than the forward's (see _pvera_latent's ``again``)
    b_scaled = lambda_bc.unsqueeze(-1) * b
    if ctx.probabilistic:
        noise = None if noise is None else noise.to(dtype)
        grad_h, grad_lambda_d, grad_lambda_b = _pvera_grads(ctx, g, hc, lambda_dc, b, b_scaled, noise, need)
    else:
        grad_h, grad_lambda_d, grad_lambda_b = _vera_grads(g, hc, lambda_dc, b, b_scaled, need)
    return (grad_y, None if grad_h is None else grad_h.to(h.dtype),
            None if grad_lambda_d is None else grad_lambda_d.to(lambda_d.dtype), None,
            None if grad_lambda_b is None else grad_lambda_b.to(lambda_b.dtype), None, None, None)


def _vera_grads(g: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, b_scaled: Tensor,
                need: tuple) -> tuple[Optional[Tensor], ...]:
    """VeRA (``z = h * lambda_d``): ``M = g.T @ h`` (out x r, the one extra product instead of keeping ``z @ B.T``)
    gives ``d lambda_b = sum_k (lambda_d B) * M`` and ``d lambda_d = sum_o (lambda_b B) * M``; ``d h`` is one
    product against ``lambda_b B lambda_d``: no tokens x r pass besides the products."""
    m = g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1]) if need[4] or need[2] else None
    grad_lambda_b = (m * (lambda_d * b)).sum(1) if need[4] else None
    grad_lambda_d = (m * b_scaled).sum(0) if need[2] else None
    grad_h = g @ (lambda_d * b_scaled) if need[1] else None
    return grad_h, grad_lambda_d, grad_lambda_b


def _pvera_grads(ctx, g: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, b_scaled: Tensor,  # noqa: ANN001
                 noise: Optional[Tensor], need: tuple) -> tuple[Optional[Tensor], ...]:
    """PVeRA: ``d lambda_b = sum_k B * (g.T @ z)``, ``gz = g @ (lambda_b B)``, ``d mu = gz``, ``d lv = gz * es / 2``
    (``es = eps * exp(lv / 2)``; zero without noise), then ``d lambda_d`` and ``d h`` per half. ``noise``: ``eps``,
    or ``es`` itself where the forward kept it (``ctx.scaled_noise``)."""
    r = ctx.r
    if ctx.scaled_noise:  # the forward's own eps * exp(lv / 2): z without an exp
        es = noise
        z, _ = _pvera_latent(h, lambda_d, None, r, again=True)
        z = z if es is None else z.add_(es)
    else:
        z, es = _pvera_latent(h, lambda_d, noise, r, again=True)
    g2 = g.reshape(-1, g.shape[-1])
    # (out, r): the one extra product, instead of keeping z @ B.T
    grad_lambda_b = (g2.T @ z.reshape(-1, r) * b).sum(1) if need[4] else None
    del z
    if not (need[1] or need[2]):
        return None, None, grad_lambda_b
    if torch.compiler.is_compiling():  # traced (_TracedLeanAdd): plain ops and a cat, which inductor fuses
        gz = g @ b_scaled
        ges = gz * es if es is not None else torch.zeros_like(gz)
        h_mu, h_lv = h[..., :r], h[..., r:]
        grad_lambda_d = torch.cat([(gz * h_mu).reshape(-1, r).sum(0),
                                   (ges * h_lv).reshape(-1, r).sum(0) * 0.5]) if need[2] else None
        grad_h = torch.cat([gz * lambda_d[:r], ges * (0.5 * lambda_d[r:])], -1) if need[1] else None
        return grad_h, grad_lambda_d, grad_lambda_b
    # eager: d (h * lambda_d) = [gz, gz * es / 2] built in one (tokens, 2r) buffer (gz written there by the
    # product itself), then d lambda_d = sum_t buf * h and d h = buf * lambda_d in place: one allocation of
    # d h's size and one temporary, where per-half products allocate six
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


class _TracedLeanAdd(torch.autograd.Function):
    """``vera_fx::lean_add``'s forward and backward as an autograd.Function, for torch.compile: dynamo traces
    both into the graph, so inductor fuses the backward's elementwise work with the graph around it, while
    what backward reads stays the op's (``h``, the noise, the parameters): the partitioner cannot keep
    ``z @ B.T``, which nothing in backward uses. (The backward's products take their operands in the other
    order than the forward's, so the joint graph's common-subexpression pass keeps the weight-sized scaled
    ``B`` recomputed rather than saved.)"""

    @staticmethod
    def forward(ctx, y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor,  # noqa: ANN001
                eps: Optional[Tensor], r: int, probabilistic: bool) -> Tensor:
        _lean_setup(ctx, (y, h, lambda_d, b, lambda_b, eps, r, probabilistic), None)
        return _lean_add_impl(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return _lean_backward(ctx, grad)


class _EagerLeanAdd(torch.autograd.Function):
    """``vera_fx::lean_add`` in an eager training step: the op's forward and backward without the custom op's
    dispatch, keeping PVeRA's scaled noise ``eps * exp(lv / 2)`` (the forward computes it; it has eps's size)
    instead of ``eps``, so backward forms ``z`` with one add rather than an exp and three passes again."""

    @staticmethod
    def forward(ctx, y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor,  # noqa: ANN001
                eps: Optional[Tensor], r: int, probabilistic: bool) -> Tensor:
        out, es = _lean_forward(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)
        _lean_setup(ctx, (y, h, lambda_d, b, lambda_b, es, r, probabilistic), None)
        ctx.scaled_noise = True
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return _lean_backward(ctx, grad)


def _eager_step(*tensors: Tensor) -> bool:
    """Whether a lean site runs ``_EagerLeanAdd``: an eager differentiable call on plain tensors (not while
    torch.compile or export traces, not under autocast, not on tensor subclasses such as DTensor)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(tensors[1].device.type)
            and all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors))


def lean_site(y: Tensor, h: Tensor, lambda_d: Tensor, b: Tensor, lambda_b: Tensor, eps: Optional[Tensor], r: int,
              probabilistic: bool, traced_when_compiled: bool) -> Tensor:
    """A lean site's graph node: ``vera_fx::lean_add``, except while torch.compile traces a site ``auto`` made
    lean (``traced_when_compiled``): then ``_TracedLeanAdd``, the op's own forward and backward traced into
    the compiled graph (the opaque op's backward, unfused, made a compiled step slower than the plain
    chain's; the traced one keeps the lean memory at about the plain chain's speed). A site forced lean keeps
    the opaque op under torch.compile too."""
    if traced_when_compiled and torch.compiler.is_compiling():
        return _TracedLeanAdd.apply(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)
    if _eager_step(y, h, lambda_d, b, lambda_b):
        return _EagerLeanAdd.apply(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)
    return torch.ops.vera_fx.lean_add(y, h, lambda_d, b, lambda_b, eps, r, probabilistic)


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
    h32, ld32 = h.float(), lambda_d.float()
    h_mu, h_lv, ld_mu, ld_lv = h32[..., :r], h32[..., r:], ld32[:r], ld32[r:]
    c = grad.float() / h_mu.numel()
    g_mu = (h_mu * ld_mu).mul_(c)  # d mu = g mu / N
    g_lv = torch.exp(h_lv * ld_lv).sub_(1.0).mul_(0.5 * c)  # d lv = -g (1 - exp(lv)) / (2 N)
    grad_lambda_d = None
    if ctx.needs_input_grad[1]:
        grad_lambda_d = torch.cat([(g_mu * h_mu).reshape(-1, r).sum(0),
                                   (g_lv * h_lv).reshape(-1, r).sum(0)]).to(lambda_d.dtype)
    grad_h = None
    if ctx.needs_input_grad[0]:
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        torch.mul(g_mu, ld_mu, out=grad_h[..., :r])
        torch.mul(g_lv, ld_lv, out=grad_h[..., r:])
        grad_h = grad_h.to(h.dtype)
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
