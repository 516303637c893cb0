"""vera_fx: VeRA and PVeRA adapters as a torch.fx graph-rewriting pass."""

from __future__ import annotations

from .compat import warn_if_untested

warn_if_untested()  # first: a torch outside the tested range says so even if a later import fails

from .capture import CaptureError, capture
from .adapters import active_adapters, add_adapter, delete_adapter, disable_adapters, set_adapter, set_lowering
from .checkpoint import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from .config import PveraConfig, VeraConfig
from .model import VeraFxModel, from_pretrained, transform
from .passes.merge import merge, merge_into, unmerge
from . import passes
from .sites import Site, adapted_sites as sites, read_sites
from .sampling import kl_divergence, set_sample_at_inference
from .uncertainty import confidence_interval, monte_carlo
from .generation import generate
from .serving import adapter_index, export, load_adapters, mixed_adapter_forward
from .inspect import print_trainable_parameters, summary, to_dot, to_networkx, trainable_parameters, view

__all__ = [
    "VeraConfig", "PveraConfig", "transform", "VeraFxModel", "capture", "CaptureError", "sites", "Site",
    "adapter_state_dict", "load_adapter_state_dict", "save_adapter", "load_adapter", "from_pretrained",
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "active_adapters",
    "set_sample_at_inference", "kl_divergence", "monte_carlo", "confidence_interval",
    "merge", "unmerge", "merge_into", "generate", "set_lowering",
    "mixed_adapter_forward", "load_adapters", "adapter_index", "export",
    "summary", "trainable_parameters", "print_trainable_parameters", "to_networkx", "to_dot", "view",
]

__version__ = "0.1.0"

