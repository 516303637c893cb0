"""VeRA: ``y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..config import VeraConfig
from ..sites import Site
from .base import AdapterState, Emitter, Method, emit_projection, finish_output


class VeraMethod(Method):
    name = "vera"
    prefix = "vera"
    config_type = VeraConfig

    def emit(self, em: Emitter, state: AdapterState, x: Node, y: Node, training: Node) -> Node:
        aten = torch.ops.aten
        h, lam_d, lam_b, b = emit_projection(self, em, state, x, training)
        h = em.call(aten.mul.Tensor, (h, lam_d), "adapter", "scale_d")
        u = em.call(aten.linear.default, (h, b), "adapter", "xAB")
        u = em.call(aten.mul.Tensor, (u, lam_b), "adapter", "scale_b")
        return finish_output(em, y, u, state.site_parameters(em.site.name)["vera_lambda_d"].dtype)

    def delta_weight(self, state: AdapterState, site: Site) -> torch.Tensor:
        params = state.site_parameters(site.name)
        lam_b, lam_d = params["vera_lambda_b"], params["vera_lambda_d"]
        a = state.projection("A")[:, : site.in_features]
        b = state.projection("B")[: site.out_features]
        return (lam_b.float()[:, None] * b.float()) @ (lam_d.float()[:, None] * a.float())
