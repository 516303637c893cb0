"""PEFT's ``PeftModel`` surface (names, signatures, semantics; a docstring says where vera_fx differs) as a mixin of
``VeraFxModel``, whose class attributes win over the wrapped model's same-named PEFT integration."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import AbstractSet, Any, ContextManager, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import adapters as adapter_ops, blockwise, checkpoint as ckpt
from .config import AdapterConfig
from .generation import generate
from .passes.merge import merge, merge_into, unmerge
from .state import active_adapters, adapters_of, merged_adapters, state_lock

logger = logging.getLogger(__name__)


def count_parameters(module: nn.Module, skip: AbstractSet[int] = frozenset()) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT reports them: shared tensors once, no buffers, a 4-bit
    bitsandbytes weight as the parameters it packs; parameters whose ``id`` is in ``skip`` left out."""
    def size(p: nn.Parameter) -> int:
        storage = getattr(p, "quant_storage", None)
        packed = 2 * (storage.itemsize if isinstance(storage, torch.dtype) else 1)
        return p.numel() * (packed if p.__class__.__name__ == "Params4bit" else 1)

    sizes = [(size(p), p.requires_grad) for p in module.parameters() if id(p) not in skip]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def trainable_line(module: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line: ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = count_parameters(module)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def check_is_trainable(is_trainable: Any) -> None:
    """TypeError unless ``is_trainable`` (of ``from_pretrained`` / ``load_adapter``) is a bool."""
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable={is_trainable!r} must be True or False: False (the default) loads the "
                        "adapter frozen for inference, True keeps it trainable")


class PeftSurface:
    """PEFT's model methods over ``self._source`` and ``self._base_model``, and the surface the Trainer reads."""

    _source: Any
    _base_model: nn.Module
    _forward_params: dict

    @property
    def config(self) -> Any:
        return getattr(self._base_model, "config", None)

    @property
    def main_input_name(self) -> str:
        return getattr(self._base_model, "main_input_name", "input_ids")

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the Trainer may pass ``num_items_in_batch`` (as it decides for the model itself)."""
        default = any(p.kind is p.VAR_KEYWORD for p in self._forward_params.values())
        return bool(getattr(self._base_model, "accepts_loss_kwargs", default))

    @property
    def active_adapters(self) -> list[str]:
        return active_adapters(self._source)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.Tensor:
        """``vera_fx.generate``: a KV-cache decode graph over this object's adapter state."""
        kwargs.setdefault("model", self._base_model)
        return generate(self, input_ids, attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      **kwargs: Any) -> None:
        """Checkpoint every block call of every graph, also those captured later (ValueError without blocks); always
        non-reentrant, so ``gradient_checkpointing_kwargs`` are ignored."""
        blockwise.gradient_checkpointing_enable(self._source)
        for gm in self._all_graphs():
            if gm is not self._source and blockwise.block_calls(gm):
                blockwise.gradient_checkpointing_enable(gm)

    def gradient_checkpointing_disable(self) -> None:
        for gm in {id(g): g for g in [self._source, *self._all_graphs()]}.values():
            blockwise.gradient_checkpointing_disable(gm)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return blockwise.is_gradient_checkpointing(self._source)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name -> its live config object (a new dict each time)."""
        return {name: state.config for name, state in adapters_of(self._source).items()}

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active)."""
        names = active_adapters(self._source)
        return names[0] if len(names) == 1 else names

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter (vera_fx's or PEFT's config), inactive; ``low_cpu_mem_usage`` / ``autocast_adapter_dtype``
        do nothing (the lambdas take the weights' dtype)."""
        if adapter_name in self.peft_config:  # PEFT's check and words
            raise ValueError(f"Adapter with name '{adapter_name}' already exists: choose another adapter_name or "
                             f"delete_adapter('{adapter_name}') first")
        with self._keeping_trainability():  # as PEFT's: the others keep their requires_grad
            adapter_ops.add_adapter(self, adapter_name, peft_config)

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Its lambdas and ``modules_to_save`` copies."""
        state = adapters_of(self._source)[adapter_name]
        return list({id(p): p for p in [*state.parameters(), *state.lambda_parameters()]}.values())

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` of the named adapters' parameters, active or not (until the next ``set_adapter``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"set_requires_grad: adapter_names={names!r}: {unknown} are not adapters of this model "
                             f"({list(self.peft_config)})")
        if not isinstance(requires_grad, bool):
            raise TypeError(f"set_requires_grad: requires_grad={requires_grad!r} must be True or False")
        for name in names:
            for p in self._adapter_parameters(name):
                p.requires_grad_(requires_grad)

    @contextmanager
    def _keeping_trainability(self) -> Iterator[None]:
        """The adapters present on entry keep their ``requires_grad`` (adding an adapter re-syncs them)."""
        kept = [(p, p.requires_grad) for name in self.peft_config for p in self._adapter_parameters(name)]
        try:
            yield
        finally:
            for p, flag in kept:
                p.requires_grad_(flag)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list: they add up) active; only they train, none with ``inference_mode``."""
        adapter_ops.set_adapter(self, adapter_name)
        if inference_mode:
            self.set_requires_grad(adapter_name, False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; adapters: {list(self.peft_config) or 'none'}")
        adapter_ops.delete_adapter(self, adapter_name)

    def disable_adapter(self) -> ContextManager[Any]:
        return adapter_ops.disable_adapters(self)

    def disable_adapter_layers(self) -> None:
        adapter_ops.set_adapters_disabled(self, True)

    def enable_adapter_layers(self) -> None:
        adapter_ops.set_adapters_disabled(self, False)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """``vera_fx.merge``: the user's model is not changed (copy-on-merge)."""
        merge(self, adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        unmerge(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The user's model with the active (or named) adapters folded into its weights, in place as PEFT's."""
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
        """The model ``transform`` was given (vera_fx never changes it)."""
        merged = sorted(merged_adapters(self._source))
        if merged:
            logger.warning("unload: adapters %s are merged in the graph only (copy-on-merge): the returned model has "
                           "its own weights; use merge_and_unload() for a model with them folded in", merged)
        return self._base_model

    def get_base_model(self) -> nn.Module:
        """Unlike PEFT's, it runs without adapters (they live in the graphs)."""
        return self._base_model

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, **kwargs: Any) -> None:
        """Load a local adapter folder as ``adapter_name``, inactive; frozen (eval mode) unless ``is_trainable``, then
        it trains even while inactive. ``torch_device`` and PEFT's other keywords are ignored."""
        check_is_trainable(is_trainable)
        if kwargs:
            logger.info("load_adapter: ignored %s", sorted(kwargs))
        with self._keeping_trainability():
            ckpt.load_adapter(self, model_id, adapter_name)
        self.peft_config[adapter_name].inference_mode = not is_trainable
        self.set_requires_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()  # type: ignore[attr-defined]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)  # type: ignore[arg-type]

    def print_trainable_parameters(self) -> None:
        print(trainable_line(self))  # type: ignore[arg-type]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count over the base weights and the adapters' trainable tensors (PEFT's number);
        ``exclude_embeddings`` leaves out ``nn.Embedding`` weights and the weights tied to them."""
        names = {f"{n}.weight" for n, mod in self._base_model.named_modules() if isinstance(mod, nn.Embedding)} \
            if exclude_embeddings else set()
        skip = {id(p) for n, p in self.named_parameters(remove_duplicate=False)  # type: ignore[attr-defined]
                if n in names}
        trainable, total = count_parameters(self, skip)  # type: ignore[arg-type]
        return trainable if only_trainable else total

    def get_input_embeddings(self) -> nn.Module:
        """The model's input embedding module: the graphs share its weight's storage until ``m.to(...)`` converts it."""
        return self._base_model.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        """The model's (base) output head, as ``get_input_embeddings``."""
        return self._base_model.get_output_embeddings()

    def enable_input_require_grads(self) -> None:
        """A no-op: the graphs checkpoint non-reentrantly, which needs no input that requires grad."""
        logger.debug("enable_input_require_grads: not needed (non-reentrant checkpointing); nothing done")

    def disable_input_require_grads(self) -> None:
        """A no-op, as ``enable_input_require_grads``."""
        logger.debug("disable_input_require_grads: nothing to undo")

    @property
    def active_peft_config(self) -> AdapterConfig:
        """The active adapter's config (PEFT's property); ValueError when several adapters are active."""
        names = active_adapters(self._source)
        if len(names) != 1:
            raise ValueError(f"active_peft_config: adapters {names} are active, not one: read m.peft_config[name]")
        return self.peft_config[names[0]]

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[list[str]] = None,
                        is_main_process: Optional[bool] = None, **kwargs: Any) -> None:
        """Write ``default`` in ``save_directory`` and other adapters in subfolders of their names, as PEFT does."""
        safe = kwargs.pop("safe_serialization", True)
        if kwargs:
            logger.info("save_pretrained: ignored %s (vera_fx writes safetensors only)", sorted(kwargs))
        names = list(self.peft_config)
        chosen = names if selected_adapters is None else list(selected_adapters)
        if not chosen:
            raise ValueError(f"save_pretrained({str(save_directory)!r}): this model has no adapter to save; add one "
                             "with m.add_adapter(name, config) or m.load_adapter(folder, name) first")
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ValueError(f"selected_adapters={chosen!r}: {unknown} are not adapters of this model ({names})")
        folders = [Path(save_directory) / ("" if name == "default" else name) for name in chosen]
        if not safe and is_main_process is not False:
            logger.warning("save_pretrained: safe_serialization=False, but vera_fx writes safetensors only (PEFT "
                           "reads them): %s", ", ".join(str(f / ckpt.WEIGHTS_NAME) for f in folders))
        for name, folder in zip(chosen, folders):
            ckpt.save_adapter(self._source, folder, name, is_main_process=is_main_process)
