"""FSDP2 per block (``shard``), DDP and FSDP1 helpers, and what saving a sharded graph needs (a gather on every
rank, with ``is_main_process``). torch.distributed.fsdp / .tensor are imported where used (a second to import)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .sites import as_graph_module, graph_modules

logger = logging.getLogger(__name__)


def _require_group(fn: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"vera_fx.distributed.{fn} needs an initialised process group: call "
                           "torch.distributed.init_process_group (torchrun sets the environment)")


def fsdp2_sums_gradients(mesh: Any = None) -> bool:
    """Whether FSDP2 on this process group sums gradients instead of averaging (a collective: every rank)."""
    _require_group("fsdp2_sums_gradients")
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    probe = nn.Linear(world, world, bias=False)
    fully_shard(probe, mesh=mesh)
    x = torch.ones(1, world)
    probe(x).sum().backward()
    grad = full_tensor(probe.weight.grad)
    return bool(world > 1 and torch.allclose(grad, torch.full_like(grad, float(world))))


def mean_gradients(model: nn.Module, mesh: Any = None) -> bool:
    """Make FSDP2 modules of ``model`` average gradients where gloo sums them (pytorch 162338; a collective)."""
    _require_group("mean_gradients")
    from torch.distributed.fsdp import FSDPModule

    sharded = [mod for mod in model.modules() if isinstance(mod, FSDPModule)]  # (the first is model itself)
    if not sharded:
        raise ValueError(f"mean_gradients: no module of this {type(model).__name__} is sharded with FSDP2; call "
                         "fully_shard(layer) for each layer and fully_shard(model) first")
    if dist.get_backend() != "gloo" or not fsdp2_sums_gradients(mesh):
        return False
    world = float(dist.get_world_size())
    for mod in sharded:
        mod.set_gradient_divide_factor(world)
    logger.info("mean_gradients: gloo sums FSDP2 gradients (pytorch issue 162338); divide factor %d set on %d "
                "modules", world, len(sharded))
    return True


def shard(gm: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """``fully_shard`` every block of ``gm`` (the model object or a graph), then its root, then ``mean_gradients``;
    ``mesh`` and ``fsdp_kwargs`` go to every ``fully_shard``. Returns ``gm``."""
    _require_group("shard")
    from torch.distributed.fsdp import fully_shard

    given, gm = gm, as_graph_module(gm, "shard")
    blocks = graph_modules(gm)[1:]
    if not blocks:
        logger.warning("shard: this graph has no blocks (captured as one graph): sharding it as one unit, so "
                       "every rank gathers all weights at each forward")
    for block in blocks:
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(gm, mesh=mesh, **fsdp_kwargs)  # each block parameter is registered once: the blocks keep theirs
    mean_gradients(gm, mesh)
    logger.info("shard: %d blocks and the root sharded over %d ranks", len(blocks), dist.get_world_size())
    return given


def unwrap_parallel(gm: nn.Module) -> nn.Module:
    """The module inside a DDP or FSDP1 wrapper (or ``gm`` itself)."""
    inner = getattr(gm, "_orig_mod", gm)
    while isinstance(inner, nn.parallel.DistributedDataParallel) or type(inner).__name__ == "FullyShardedDataParallel":
        inner = inner.module
    return inner


def gathered(wrapper: nn.Module) -> ContextManager[Any]:
    """Full parameters inside the block for an FSDP1 wrapper (a collective); a no-op for anything else."""
    if type(wrapper).__name__ == "FullyShardedDataParallel":
        return type(wrapper).summon_full_params(wrapper, writeback=False, rank0_only=False)
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor (collective), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def placed_like(value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) as this rank's shard when ``current`` is a DTensor."""
    if not hasattr(current, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, current.device_mesh, current.placements, src_data_rank=None)


def needs_gather(wrapper: nn.Module, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether saving needs a collective (an FSDP1 wrapper or a DTensor); local, so one rank can refuse at once."""
    return type(wrapper).__name__ == "FullyShardedDataParallel" or any(hasattr(t, "device_mesh") for t in tensors)


def save_role(gather: bool, is_main_process: Optional[bool], fn: str) -> bool:
    """Whether this process writes the folder (``is_main_process``, else rank 0); ValueError when a gather is
    needed and ``is_main_process`` is not given (one rank alone would wait forever)."""
    if is_main_process is not None and not isinstance(is_main_process, bool):
        raise TypeError(f"is_main_process={is_main_process!r} must be True, False or None (rank 0 writes)")
    grouped = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if grouped else 1
    if gather and world > 1 and is_main_process is None:
        raise ValueError(f"{fn}: this model is sharded (FSDP2 DTensors or an FSDP1 wrapper), so saving gathers "
                         f"its full tensors from all {world} ranks. Call it on every rank with "
                         f"is_main_process=(rank == 0), e.g. vera_fx.save_adapter(m, d, is_main_process="
                         "dist.get_rank() == 0) or m.save_pretrained(d, is_main_process=dist.get_rank() == 0)")
    return (not grouped or dist.get_rank() == 0) if is_main_process is None else is_main_process


def sharded_fraction(gm: nn.Module) -> Optional[float]:
    """The fraction of the blocks' frozen parameter elements this rank holds (None without blocks)."""
    blocks = graph_modules(unwrap_parallel(gm))[1:]
    params = [p for p in {p for b in blocks for p in b.parameters()} if not p.requires_grad]
    full = sum(p.numel() for p in params)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    return local / full if full else None
