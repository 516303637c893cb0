"""The pipeline: capture, then match and inject composed with torch.fx's PassManager."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from ..capture import capture
from ..signatures import ExampleInputs
from ..config import AdapterConfig, as_config
from ..methods import method_for
from ..state import adapter_container
from .inject import InjectPass
from .lower import check_lowering
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


def transform(model: nn.Module, config: AdapterConfig, example_inputs: ExampleInputs = None,
              adapter_name: str = "default", lowering: Any = "auto", tokens: Optional[int] = None) -> GraphModule:
    """Capture ``model`` and attach a VeRA / PVeRA adapter to every linear-like call ``config`` targets.

    Returns a new GraphModule whose only trainable parameters are the adapter's; ``model`` is left as it was
    (on failure too). ``lowering`` ("auto", "fast", "activation", "fused", "lean", "weight" or ``{site: mode}``)
    and ``tokens`` (per step, for the cost model) choose how each site group is computed
    (vera_fx/passes/lower.py): the graph's setting, not the adapter's (``vera_fx.set_lowering`` changes it).
    """
    config = as_config(config)  # ours, or PEFT's read by its fields
    method_for(config)  # type check before the (slow) capture
    setting = check_lowering(lowering, tokens)
    gm = capture(model, example_inputs)
    adapter_container(gm).flags.lowering = setting
    return run_passes(gm, add_adapter_passes(config, adapter_name))

