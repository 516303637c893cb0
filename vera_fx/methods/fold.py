"""The weight path's site call, ``y = x (W + M @ A).T + bias`` with ``M = lambda_b * B * lambda_d``, as one autograd
function: with ``T >= in`` tokens it folds ``W'`` in forward and backward (or keeps it), so ``d x = g @ W'`` carries
the adapter's share and the group's ``d h @ A`` is skipped; with fewer it is the base linear plus one ``addmm``;
under autocast the plain ops (a half-precision fold would round ``dW`` away). In the graph: ``fold = weight_fold(W,
h, A, B, lambda_d, lambda_b, keep)`` then ``weight_site(x, fold, bias)`` (Conv1D: ``weight_site_t``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx import Node

from .lean import scale_smaller, site_apply, vera_grads

Fold = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool]


def weight_fold(w: Tensor, h: Tensor, a: Tensor, b: Tensor, lambda_d: Tensor, lambda_b: Tensor,
                keep: bool = False) -> Fold:
    """The weight-path adapter's graph node: its inputs bundled for ``weight_site``; ``keep``: keep ``W'``."""
    return w, h, a, b, lambda_d, lambda_b, keep


def _linear_owned(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, w, bias)`` into a tensor of its own: a custom Function's view output (F.linear's for a 3-D
    input) cannot be modified in place (Falcon's ``mlp_output +=``)."""
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    flat, x2 = out.view(-1, w.shape[0]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, w.t(), out=flat)
    else:
        torch.addmm(bias, x2, w.t(), out=flat)
    return out


class _FoldedLinear(torch.autograd.Function):
    """``linear(x, W + M @ A, bias)`` computed from ``h = x @ A.T`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Optional[Tensor], h: Tensor, a: Tensor, b: Tensor,  # noqa: ANN001
                lambda_d: Tensor, lambda_b: Tensor, keep: bool = False) -> Tensor:
        out, fan_in = w.shape
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.fold = cast is None and w.dtype in (torch.float32, torch.float64) and x.numel() >= fan_in * fan_in
        ctx.cast, ctx.x_shape, ctx.x_dtype, ctx.has_bias = cast, x.shape, x.dtype, bias is not None
        keep_x = w.requires_grad or (bias is not None and bias.requires_grad)
        folded = torch.addmm(w, b * lambda_b.unsqueeze(-1) * lambda_d, a) if ctx.fold else None
        ctx.save_for_backward(h, w, a, b, lambda_d, lambda_b, x if keep_x else None, folded if keep else None)
        if cast is not None:  # h has the site input's shape, x may be a Conv1D's flattened view of it
            return site_apply(torch.nn.functional.linear(x, w, bias), h.reshape(*x.shape[:-1], h.shape[-1]), b,
                              lambda_d, lambda_b, False)
        if folded is not None:
            return _linear_owned(x, folded, bias)
        y = _linear_owned(x, w, bias)
        h2 = h.reshape(-1, h.shape[-1]).to(w.dtype)
        z, m = scale_smaller(h2, b * lambda_b.unsqueeze(-1), lambda_d)
        y.view(-1, out).addmm_(z, m.T)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        h, w, a, b, lambda_d, lambda_b, x, folded = ctx.saved_tensors
        need = ctx.needs_input_grad
        out, fan_in = w.shape
        dtype = w.dtype
        g = grad.reshape(-1, out)
        gc = g.to(dtype)
        grad_x = grad_w = grad_bias = None
        b_scaled = lambda_b.unsqueeze(-1) * b  # operands in another order than the forward's (see lean.py)
        if need[0]:  # folding: through W' (kept, or folded again), the adapter's share of d x included
            if ctx.fold and folded is None:
                folded = torch.addmm(w, lambda_d * b_scaled, a)
            # under autocast the base's input gradient in the autocast dtype, as for the plain linear
            gx, wx = (g.to(ctx.cast), w.to(ctx.cast)) if ctx.cast is not None else (gc, folded if ctx.fold else w)
            grad_x = (gx @ wx).to(ctx.x_dtype).view(ctx.x_shape)
        grad_h, grad_ld, grad_lb = vera_grads(gc, h.reshape(-1, h.shape[-1]).to(dtype), lambda_d, b, lambda_b,
                                              b_scaled, need[3] and not ctx.fold, need[6], need[7])
        if need[1]:
            grad_w = (gc.T @ x.reshape(-1, fan_in).to(dtype)).to(w.dtype)
        if need[2] and ctx.has_bias:
            grad_bias = gc.sum(0).to(dtype)
        return (grad_x, grad_w, grad_bias, None if grad_h is None else grad_h.view(h.shape).to(h.dtype), None, None,
                None if grad_ld is None else grad_ld.to(lambda_d.dtype),
                None if grad_lb is None else grad_lb.to(lambda_b.dtype), None)


def weight_site(x: Tensor, fold: Fold, bias: Optional[Tensor] = None) -> Tensor:
    """A weight-path site's call (an adapter's removal makes it the plain linear again: ``restore_linear``)."""
    return _FoldedLinear.apply(x, fold[0], bias, *fold[1:])


def weight_site_t(bias: Tensor, x: Tensor, fold: Fold) -> Tensor:
    """``weight_site`` for a weight stored (in, out) (GPT-2's Conv1D: ``addmm(bias, x, W)``, ``x`` 2-D)."""
    return _FoldedLinear.apply(x, fold[0].T, bias, *fold[1:])


def fold_argument(node: Node) -> Optional[object]:
    """The fold (or, while its adapter is removed, the weight) a weight-path call reads; None for any other node."""
    if node.op != "call_function" or node.target not in (weight_site, weight_site_t):
        return None
    return node.args[2] if node.target is weight_site_t else node.args[1]


def restore_linear(node: Node) -> None:
    """Give a weight-path call whose fold was replaced by its weight its ``aten.linear`` / ``aten.addmm`` back."""
    fold = fold_argument(node)
    if fold is None or (isinstance(fold, Node) and fold.target is weight_fold):
        return
    if node.target is weight_site_t:
        node.target, node.args = torch.ops.aten.addmm.default, (node.args[0], node.args[1], fold)
    else:
        bias = node.args[2] if len(node.args) > 2 else None
        node.target = torch.ops.aten.linear.default
        node.args = (node.args[0], fold) if bias is None else (node.args[0], fold, bias)
