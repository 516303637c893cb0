"""The pipeline: match and inject (which shares x·Aᵀ and lowers what it emits) composed with torch.fx's
PassManager; ``vera_fx.transform`` (vera_fx/model.py) runs it on a captured graph."""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from ..config import AdapterConfig
from .inject import InjectPass
from .match import MatchPass


def run_passes(gm: GraphModule, passes: list[Any]) -> GraphModule:
    """Run ``passes`` on ``gm`` with torch.fx's PassManager, re-raising our ValueError / TypeError as is (the
    manager wraps them in a generic Exception)."""
    try:
        return PassManager(passes=passes, run_checks_after_each_pass=False)(gm).graph_module
    except Exception as e:
        cause = e.__cause__ or e
        if not isinstance(cause, (ValueError, TypeError)):
            raise
    raise cause.with_traceback(cause.__traceback__) from None


def add_adapter_passes(config: AdapterConfig, adapter_name: str) -> list[Any]:
    """Match, then inject (which shares x·Aᵀ and lowers what it emits, by the adapter set's lowering setting)."""
    return [MatchPass(), InjectPass(config, adapter_name)]
