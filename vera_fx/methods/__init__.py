"""Adapter methods, registered by config type (one file per method)."""

from __future__ import annotations

from ..config import AdapterConfig
from .base import CONTAINER, AdapterState, Emitter, Method
from .pvera import PveraMethod
from .vera import VeraMethod

__all__ = ["Method", "AdapterState", "Emitter", "CONTAINER", "method_for", "method_by_name", "register"]

_BY_CONFIG: dict[type, Method] = {}
_BY_NAME: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Register a method instance for its config type."""
    _BY_CONFIG[method.config_type] = method
    _BY_NAME[method.name] = method
    return method


def method_for(config: AdapterConfig) -> Method:
    method = _BY_CONFIG.get(type(config))
    if method is None:
        raise TypeError(f"config must be a VeraConfig or PveraConfig, got {type(config).__name__}")
    return method


def method_by_name(name: str) -> Method:
    return _BY_NAME[name]


register(VeraMethod())
register(PveraMethod())
