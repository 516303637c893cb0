"""VeRA: ``y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))`` (``Method``'s nodes)."""

from __future__ import annotations

from ..config import VeraConfig
from .base import Method


class VeraMethod(Method):
    name = "vera"
    prefix = "vera"
    config_type = VeraConfig
