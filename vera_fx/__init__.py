"""vera_fx: VeRA and PVeRA adapters as a torch.fx graph-rewriting pass."""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule

from .capture import CaptureError, capture
from .checkpoint import adapter_state_dict, load_adapter_state_dict
from .config import PveraConfig, VeraConfig
from .passes.pipeline import transform
from . import passes
from .sites import Site, read_sites

__all__ = [
    "VeraConfig", "PveraConfig", "transform", "capture", "CaptureError", "sites", "Site",
    "adapter_state_dict", "load_adapter_state_dict",
]

__version__ = "0.1.0"


def sites(gm: GraphModule, adapter_name: Optional[str] = None) -> list[Site]:
    """The adapted sites of ``gm`` (those of ``adapter_name`` only, when given), one per site name."""
    seen: dict[str, Site] = {}
    for s in read_sites(gm):
        if s.name in seen or not (s.adapters or s.merged):
            continue
        if adapter_name is not None and adapter_name not in s.adapters + s.merged:
            continue
        seen[s.name] = s
    return list(seen.values())
