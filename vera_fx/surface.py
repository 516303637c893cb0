"""PEFT's ``PeftModel`` surface on the object ``transform`` returns: the methods a PEFT user calls, with PEFT's
names, signatures and semantics, each delegating to the module-level function that does the work.

``PeftSurface`` is a mixin of ``VeraFxModel`` (vera_fx/model.py). Its methods are class attributes, so they win
over a same-named method of the wrapped transformers model (``add_adapter``, ``set_adapter``, ``delete_adapter``,
``disable_adapters``, ... of transformers' own PEFT integration), which ``VeraFxModel.__getattr__`` refuses.
Where vera_fx differs from PEFT the docstring says so.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

from torch import nn

from . import adapters as adapter_ops
from . import checkpoint as ckpt
from .config import AdapterConfig
from .methods import CONTAINER
from .passes.merge import merge, merge_into, unmerge
from .state import active_adapters, merged_adapters, state_lock

__all__ = ["PeftSurface"]

logger = logging.getLogger(__name__)


class PeftSurface:
    """PEFT's model methods over ``self._source`` (the graph holding the adapter state) and ``self._base_model``
    (the user's model, never changed by the object)."""

    _source: Any
    _base_model: nn.Module

    # --- adapters --------------------------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name -> its config, as PEFT's ``peft_config`` (a new dict of the live config objects)."""
        return {name: state.config for name, state in (getattr(self._source, CONTAINER, None) or {}).items()}

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active), as PEFT's ``active_adapter``."""
        names = active_adapters(self._source)
        return names[0] if len(names) == 1 else names

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter (a vera_fx or a PEFT VeRA / PVeRA config); as in PEFT it is not made active
        (``set_adapter``). ``low_cpu_mem_usage`` / ``autocast_adapter_dtype`` are accepted and have no effect
        (the lambdas are created in the weights' dtype)."""
        if adapter_name in self.peft_config:  # PEFT's check and words
            raise ValueError(f"Adapter with name '{adapter_name}' already exists: choose another adapter_name or "
                             f"delete_adapter('{adapter_name}') first")
        adapter_ops.add_adapter(self, adapter_name, peft_config)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list: they add up) the active adapters; only their lambdas train, and
        none with ``inference_mode=True``."""
        adapter_ops.set_adapter(self, adapter_name)
        if inference_mode:
            for name in ([adapter_name] if isinstance(adapter_name, str) else adapter_name):
                state = self._source.get_submodule(f"{CONTAINER}.{name}")
                for p in [*state.parameters(), *state.lambda_parameters()]:  # block lambdas live in the blocks
                    p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting the active one activates a remaining one, as in PEFT."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; adapters: {list(self.peft_config) or 'none'}")
        adapter_ops.delete_adapter(self, adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model (``vera_fx.disable_adapters``)."""
        with adapter_ops.disable_adapters(self):
            yield

    def disable_adapter_layers(self) -> None:
        """Disable every adapter until ``enable_adapter_layers()``."""
        adapter_ops.set_adapters_disabled(self, True)

    def enable_adapter_layers(self) -> None:
        """Enable the adapters again after ``disable_adapter_layers()``."""
        adapter_ops.set_adapters_disabled(self, False)

    # --- merging ---------------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the active (or the named) adapters into the graph's weights (``vera_fx.merge``); the user's
        model is not changed (copy-on-merge) and ``unmerge_adapter()`` restores the exact weights."""
        merge(self, adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo every ``merge_adapter`` (``vera_fx.unmerge``)."""
        unmerge(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The user's model with the active (or the named) adapters folded into its weights (``merge_into``,
        in place, as PEFT's); returned. ``progressbar`` is accepted (merging takes no visible time)."""
        if adapter_names is None or list(adapter_names) == active_adapters(self._source):
            return merge_into(self._base_model, self._source, safe_merge=safe_merge)
        with state_lock(self).write():  # no forward sees the temporary active list
            before = active_adapters(self._source)
            adapter_ops.set_adapter(self, list(adapter_names))
            try:
                return merge_into(self._base_model, self._source, safe_merge=safe_merge)
            finally:
                adapter_ops.set_adapter(self, before)

    def unload(self) -> nn.Module:
        """The base model without the adapters: the model ``transform`` was given (vera_fx never changes it)."""
        merged = sorted(merged_adapters(self._source))
        if merged:
            logger.warning("unload: adapters %s are merged in the graph only (copy-on-merge): the returned model has "
                           "its own weights; use merge_and_unload() for a model with them folded in", merged)
        return self._base_model

    def get_base_model(self) -> nn.Module:
        """The model ``transform`` was given. Unlike PEFT's (whose layers hold the adapters), calling it runs
        the model without adapters; the adapters are in the graphs this object calls."""
        return self._base_model

    # --- files -----------------------------------------------------------------------------------------------

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, **kwargs: Any) -> None:
        """Load the adapter saved in folder ``model_id`` (PEFT's or vera_fx's layout) as ``adapter_name``; as in
        PEFT it is not made active, and unless ``is_trainable`` the model is put in eval mode. Local folders
        only; ``torch_device`` and PEFT's other keywords are accepted and ignored (the weights' device is used)."""
        if kwargs:
            logger.info("load_adapter: ignored %s", sorted(kwargs))
        ckpt.load_adapter(self, model_id, adapter_name)
        if not is_trainable:
            self.eval()  # type: ignore[attr-defined]

    # save_pretrained, print_trainable_parameters and get_nb_trainable_parameters are VeraFxModel's own.
