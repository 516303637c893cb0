"""vera_fx: VeRA and PVeRA adapters as a torch.fx graph-rewriting pass. The public names load on first use
(PEP 562), so ``import vera_fx`` imports no torch and the ``vera-fx`` command answers ``--help`` at once."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute in it).
_EXPORTS: dict[str, tuple[str, str]] = {
    **{n: ("capture", n) for n in ("CaptureError", "capture")},
    **{n: ("adapters", n) for n in ("active_adapters", "add_adapter", "delete_adapter", "disable_adapters",
                                     "set_adapter", "set_lowering")},
    **{n: ("checkpoint", n) for n in ("adapter_state_dict", "load_adapter", "load_adapter_state_dict",
                                       "save_adapter")},
    **{n: ("config", n) for n in ("PveraConfig", "VeraConfig")},
    **{n: ("model", n) for n in ("VeraFxModel", "from_pretrained", "transform")},
    **{n: ("passes.merge", n) for n in ("merge", "merge_into", "unmerge")},
    "Site": ("sites", "Site"), "sites": ("sites", "adapted_sites"), "read_sites": ("sites", "read_sites"),
    **{n: ("sampling", n) for n in ("kl_divergence", "set_sample_at_inference")},
    **{n: ("uncertainty", n) for n in ("confidence_interval", "monte_carlo")},
    "generate": ("generation", "generate"),
    **{n: ("serving", n) for n in ("adapter_index", "export", "load_adapters", "mixed_adapter_forward")},
    **{n: ("inspect", n) for n in ("print_trainable_parameters", "summary", "to_dot", "to_networkx", "view")},
    "trainable_parameters": ("surface", "count_parameters"),
}

__all__ = [n for n in _EXPORTS if n != "read_sites"]  # read_sites: as vera_fx.read_sites only


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``vera_fx.passes``, ``vera_fx.sampling``, ...), imported on first use."""
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_SHADOWED = {name for name, (module, _) in _EXPORTS.items() if module == name}  # capture, sites


class _Package(types.ModuleType):
    """The package module: importing a submodule named as a public function (``capture``, ``sites``) keeps the
    function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
