"""The weight path's site call: the base linear and its VeRA adapter as one autograd function.

A VeRA site computes ``y = x W.T + bias + (h * lambda_d) @ (lambda_b * B).T`` with ``h = x @ A.T`` (shared by
the sites that read ``x``), i.e. ``y = x (W + dW).T + bias`` with ``dW = M @ A`` and ``M = lambda_b * B * lambda_d``
(out x r). ``weight_site`` replaces the site's ``aten.linear`` node; per call it picks the cheaper form of each
direction from the call's token count ``T`` (``x.numel() / in``):

- ``T >= in`` (a float32 / float64 weight): forward folds ``W' = W + M @ A`` (out x r x in multiply-adds instead of T x r x out) and runs
  one linear; backward folds again and computes ``d x = g @ W'`` (the base's own product: the adapter's share of
  the input gradient comes free, ``h`` gets none, so the group's ``d h @ A`` is not computed either);
- ``T < in`` (decoding, small batches): the base linear plus one ``addmm`` of ``h`` against ``M.T``; backward
  ``d x = g @ W`` and ``d h = g @ M`` (autograd carries it into ``x @ A.T``, summed over the group first).

Either way backward keeps only ``h`` (besides parameters and buffers) and the lambdas' gradients come from
one out x r product ``N = g.T @ h``: ``d lambda_b = sum_k N * B * lambda_d`` and ``d lambda_d = sum_o N * lambda_b
* B``. Nothing token x out sized is kept, where the plain path keeps ``h @ (lambda_d B).T`` per site. With
``keep`` a folding call keeps its ``W'`` (out x in values: with ``T >= in`` no more than the plain path's
tokens x out ``u``) and backward reuses it instead of folding again: one out x r x in product less per step.

Under autocast the forward is the plain chain's own ops (a weight folded in bfloat16 would round ``dW`` away
against ``W``; a half-precision weight is never folded either) and backward computes the base's input gradient in the autocast dtype, as autograd does for the
plain linear, the adapter's part in the parameters' dtype. A trainable base weight or bias gets its gradient
too (``x`` is then kept, as the plain linear keeps it).

In the graph a weight-path site is ``fold = weight_fold(W, h, A, B, lambda_d, lambda_b, keep)`` (the adapter's output
node: it only bundles its inputs) and ``y = weight_site(x, fold, bias)``; with the fold node replaced by ``W``
(removing the adapter) ``weight_site`` is the plain linear, and ``restore_linear`` gives the node its
``aten.linear`` back. A GPT-2 Conv1D site (``addmm(bias, view(x), W)``, W stored (in, out)) is the same call on
``W.T``: ``weight_site_t(bias, view(x), fold)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.fx import Node

Fold = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool]


def weight_fold(w: Tensor, h: Tensor, a: Tensor, b: Tensor, lambda_d: Tensor, lambda_b: Tensor,
                keep: bool = False) -> Fold:
    """The weight-path adapter's graph node: its inputs, bundled for ``weight_site`` (no computation); ``keep``:
    a call that folds keeps ``W'`` for backward."""
    return w, h, a, b, lambda_d, lambda_b, keep


def _scaled_b(b: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """``M = lambda_b * B * lambda_d`` (out x r), so that ``dW = M @ A`` and the adapter's output is ``h @ M.T``."""
    return b * lambda_b.unsqueeze(-1) * lambda_d


def _linear_owned(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, w, bias)`` into a tensor of its own: F.linear returns a view of its 2-D product for a 3-D
    input, and a custom Function's view output cannot be modified in place (Falcon's ``mlp_output +=``)."""
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
        # tokens >= in, in float32 / float64 (a weight folded in half precision would round dW away against W)
        ctx.fold = cast is None and w.dtype in (torch.float32, torch.float64) and x.numel() >= fan_in * fan_in
        ctx.cast, ctx.x_shape, ctx.x_dtype, ctx.has_bias = cast, x.shape, x.dtype, bias is not None
        keep_x = w.requires_grad or (bias is not None and bias.requires_grad)
        m = None if cast is not None else _scaled_b(b, lambda_d, lambda_b)
        folded = torch.addmm(w, m, a) if ctx.fold else None  # (ctx.fold implies no autocast)
        ctx.save_for_backward(h, w, a, b, lambda_d, lambda_b, x if keep_x else None, folded if keep else None)
        if cast is not None:  # the plain chain's own ops, so autocast casts them alike (h has the site input's
            y = torch.nn.functional.linear(x, w, bias)  # shape, x a Conv1D's flattened view of it)
            return y + (torch.nn.functional.linear(h * lambda_d, b) * lambda_b).reshape(y.shape)
        if folded is not None:
            return _linear_owned(x, folded, bias)
        y = _linear_owned(x, w, bias)
        y.view(-1, out).addmm_(h.reshape(-1, h.shape[-1]).to(m.dtype), m.T)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        h, w, a, b, lambda_d, lambda_b, x, folded = ctx.saved_tensors
        need = ctx.needs_input_grad
        out, fan_in = w.shape
        dtype = w.dtype
        g = grad.reshape(-1, out)
        gc = g.to(dtype)
        h2 = h.reshape(-1, h.shape[-1]).to(dtype)
        grad_x = grad_w = grad_bias = grad_h = grad_ld = grad_lb = None
        # lambda_b * B, operands in another order than the forward's, so a traced graph's common-subexpression
        # pass keeps it recomputed rather than saved (see methods/lean.py)
        b_scaled = lambda_b.unsqueeze(-1) * b
        if need[0]:
            if ctx.cast is not None:  # the base's input gradient in the autocast dtype, as for the plain linear
                grad_x = (g.to(ctx.cast) @ w.to(ctx.cast)).to(ctx.x_dtype)
            elif ctx.fold:  # through W' = W + M @ A (kept, or folded again): the adapter's share of d x included
                if folded is None:
                    folded = torch.addmm(w, lambda_d * b_scaled, a)
                grad_x = (gc @ folded).to(ctx.x_dtype)
            else:
                grad_x = (gc @ w).to(ctx.x_dtype)
            grad_x = grad_x.view(ctx.x_shape)
        if need[3] and not ctx.fold:
            grad_h = (gc @ (lambda_d * b_scaled)).view(h.shape).to(h.dtype)
        if need[6] or need[7]:
            n = gc.T @ h2  # (out, r): the one product for both lambdas' gradients
            if need[7]:
                grad_lb = (n * (lambda_d * b)).sum(1).to(lambda_b.dtype)
            if need[6]:
                grad_ld = (n * b_scaled).sum(0).to(lambda_d.dtype)
        if need[1]:
            grad_w = (gc.T @ x.reshape(-1, fan_in).to(dtype)).to(w.dtype)
        if need[2] and ctx.has_bias:
            grad_bias = gc.sum(0).to(dtype)
        return grad_x, grad_w, grad_bias, grad_h, None, None, grad_ld, grad_lb, None


def weight_site(x: Tensor, fold: Union[Fold, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """A weight-path site's call: ``_FoldedLinear`` on the bundle ``weight_fold`` made; the plain linear when
    ``fold`` is a weight (its adapter was removed)."""
    if isinstance(fold, Tensor):
        return torch.nn.functional.linear(x, fold, bias)
    w, h, a, b, lambda_d, lambda_b, keep = fold
    return _FoldedLinear.apply(x, w, bias, h, a, b, lambda_d, lambda_b, keep)


def weight_site_t(bias: Tensor, x: Tensor, fold: Union[Fold, Tensor]) -> Tensor:
    """``weight_site`` for a weight stored (in, out) (GPT-2's Conv1D: ``addmm(bias, x, W)``, ``x`` flattened to
    2-D; ``h`` keeps the site input's shape)."""
    if isinstance(fold, Tensor):
        return torch.addmm(bias, x, fold)
    w, h, a, b, lambda_d, lambda_b, keep = fold
    return _FoldedLinear.apply(x, w.T, bias, h, a, b, lambda_d, lambda_b, keep)


def fold_argument(node: Node) -> Optional[object]:
    """The fold (or, once its adapter is removed, the weight) a ``weight_site`` / ``weight_site_t`` call reads;
    None for any other node."""
    if node.op != "call_function" or node.target not in (weight_site, weight_site_t):
        return None
    return node.args[2] if node.target is weight_site_t else node.args[1]


def restore_linear(node: Node) -> bool:
    """Give a ``weight_site`` / ``weight_site_t`` node whose fold was replaced by its weight its ``aten.linear``
    / ``aten.addmm`` back; returns whether it did."""
    fold = fold_argument(node)
    if fold is None or (isinstance(fold, Node) and fold.target is weight_fold):
        return False
    if node.target is weight_site_t:
        node.target, node.args = torch.ops.aten.addmm.default, (node.args[0], node.args[1], fold)
        return True
    bias = node.args[2] if len(node.args) > 2 else None
    node.target = torch.ops.aten.linear.default
    node.args = (node.args[0], fold) if bias is None else (node.args[0], fold, bias)
    return True
