"""Linear-like modules: the layers PEFT targets, recognised by what they are rather than by the op they emit.
``linear_forwards`` makes an ``nn.Linear`` subclass whose own forward is a linear map (Falcon's ``FalconLinear``:
``input @ self.weight.T + self.bias``) export as one ``linear`` call, so it is a site."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from . import quantized

logger = logging.getLogger(__name__)


def is_linear_module(module: nn.Module) -> bool:
    """True for what PEFT's ``"all-linear"`` takes: ``nn.Linear`` (bitsandbytes' linears included) and
    subclasses, and transformers' ``Conv1D`` (recognised by class name and package, never imported)."""
    return isinstance(module, nn.Linear) or any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
                                                for c in type(module).__mro__)


def linear_module_paths(model: nn.Module) -> list[str]:
    """Paths of the linear modules of ``model`` (``is_linear_module``), in registration order."""
    return [path for path, m in model.named_modules() if path and is_linear_module(m)]


def computes_linear(module: nn.Linear) -> bool:
    """Whether ``module``'s own forward computes ``F.linear(x, weight, bias)`` (a probe on a random input,
    without autograd, RNG forked); False when it raises or differs."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point() \
            or weight.device.type == "meta":
        return False
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        x = torch.randn(2, 3, weight.shape[1], dtype=weight.dtype, device=weight.device)
        try:
            got = module(x)
        except Exception:  # any failure means: not a plain linear map
            return False
        want = nn.functional.linear(x, weight, module.bias)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol))


@contextlib.contextmanager
def linear_forwards(model: nn.Module) -> Iterator[list[str]]:
    """While inside, every ``nn.Linear`` subclass of ``model`` whose own forward computes a linear map runs
    ``nn.Linear.forward`` (one ``linear`` call in the graph: a site). Yields the paths changed."""
    changed: list[tuple[str, nn.Module]] = []
    try:
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
                    and "forward" not in module.__dict__ and not quantized.is_quantized_layer(module) \
                    and computes_linear(module):
                module.forward = nn.Linear.forward.__get__(module)
                changed.append((path, module))
        if changed:
            logger.debug("linear_forwards: %d %s modules captured as linear calls", len(changed),
                         type(changed[0][1]).__name__)
        yield [p for p, _ in changed]
    finally:
        for _, module in changed:
            module.__dict__.pop("forward", None)
