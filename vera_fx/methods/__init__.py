"""Adapter methods, registered by config type (one file per method; the registry is in base.py)."""

from __future__ import annotations

from .base import (CONTAINER, AdapterSet, AdapterState, AdapterView, Emitter, Method, SiteTree, method_by_name,
                   method_for, register)
from .pvera import PveraMethod
from .vera import VeraMethod

__all__ = ["Method", "AdapterSet", "AdapterState", "AdapterView", "SiteTree", "Emitter", "CONTAINER", "method_for",
           "method_by_name", "register"]

register(VeraMethod())
register(PveraMethod())
