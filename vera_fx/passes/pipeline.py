"""The pipeline: match and inject (which shares and lowers what it emits) under torch.fx's PassManager."""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from ..config import AdapterConfig
from .inject import InjectPass
from .match import MatchPass


def run_passes(gm: GraphModule, passes: list[Any]) -> GraphModule:
    """Run ``passes`` on ``gm``, re-raising our ValueError / TypeError as is (the manager wraps them)."""
    try:
        return PassManager(passes=passes, run_checks_after_each_pass=False)(gm).graph_module
    except Exception as e:
        cause = e.__cause__ or e
        if not isinstance(cause, (ValueError, TypeError)):
            raise
    raise cause.with_traceback(cause.__traceback__) from None


def add_adapter_passes(config: AdapterConfig, adapter_name: str) -> list[Any]:
    """Match, then inject."""
    return [MatchPass(), InjectPass(config, adapter_name)]
