"""Data-parallel and sharded training of a block-structured graph: FSDP2 per block, DDP, FSDP1.

``shard(gm, mesh)`` applies FSDP2's ``fully_shard`` to every block (each layer's frozen weights and its
lambdas, which the block's adapter view holds), then to the root (embeddings, head, the root's own sites),
leaving the block-held parameters to the blocks. Between forwards each rank keeps 1/world of every block's
weights; a block's hooks gather them when the top graph calls it.

FSDP2 on gloo (CPU) sums gradients across ranks instead of averaging them (pytorch issue 162338); ``shard``
measures this once with a probe and sets the gradient divide factor so that gradients are the mean, as with
DDP and on NCCL.

DDP needs no helper: ``torch.nn.parallel.DistributedDataParallel(gm)`` (only the lambdas require grad, so
only they are reduced). FSDP1 works with ``FullyShardedDataParallel(gm, use_orig_params=True)``.

``full_tensors(wrapper, tensors)`` and ``is_writer()`` are what ``save_adapter`` uses to gather a sharded or
wrapped graph's adapter on every rank and write it from rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from .sites import as_graph_module, graph_modules

__all__ = ["shard", "unwrap_parallel", "gathered", "full_tensor", "placed_like", "is_writer", "barrier",
           "sharded_fraction"]

logger = logging.getLogger(__name__)


def _gloo_sums(mesh: Any) -> bool:
    """Whether FSDP2's reduce-scatter on this process group sums instead of averaging (gloo, issue 162338):
    one tiny sharded Linear, every rank's gradient set to 1, look at the result."""
    world = dist.get_world_size()
    probe = nn.Linear(world, world, bias=False)
    fully_shard(probe, mesh=mesh)
    x = torch.ones(1, world)
    probe(x).sum().backward()
    grad = probe.weight.grad.full_tensor() if hasattr(probe.weight.grad, "full_tensor") else probe.weight.grad
    return bool(torch.allclose(grad, torch.full_like(grad, float(world))))


def shard(gm: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 per block: ``fully_shard`` every block of ``gm``, then ``gm`` itself; returns ``gm``.

    ``gm`` is the model ``vera_fx.transform`` returns (its source graph, ``m.graph_module``, is sharded: call
    the model with the keyword set it was transformed with) or a GraphModule.

    ``mesh`` (default: the world, one dimension) and ``fsdp_kwargs`` (``reshard_after_forward``,
    ``mp_policy``, ...) go to every ``fully_shard`` call. Needs an initialised process group. A graph
    without blocks (captured as one graph) is sharded as one unit, with a warning: no per-layer saving.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vera_fx.distributed.shard needs an initialised process group: call "
                           "torch.distributed.init_process_group (torchrun sets the environment)")
    given, gm = gm, as_graph_module(gm, "shard")
    if "ignored_params" in fsdp_kwargs:
        raise ValueError("shard computes ignored_params itself (the parameters the blocks manage); leave it out")
    sums = _gloo_sums(mesh) if dist.get_backend() == "gloo" else False
    blocks = graph_modules(gm)[1:]
    if not blocks:
        logger.warning("shard: this graph has no blocks (captured as one graph): sharding it as one unit, so "
                       "every rank gathers all weights at each forward")
    for block in blocks:
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    in_blocks = {p for b in blocks for p in b.parameters()}
    fully_shard(gm, mesh=mesh, ignored_params=in_blocks or None, **fsdp_kwargs)
    if sums:
        world = float(dist.get_world_size())
        for mod in [*blocks, gm]:
            mod.set_gradient_divide_factor(world)
        logger.info("shard: gloo sums FSDP2 gradients (pytorch issue 162338); divide factor set to %d", world)
    logger.info("shard: %d blocks and the root sharded over %d ranks", len(blocks), dist.get_world_size())
    return given


def unwrap_parallel(gm: nn.Module) -> nn.Module:
    """The module inside a DDP or FSDP1 wrapper (or ``gm`` itself)."""
    inner = getattr(gm, "_orig_mod", gm)
    for _ in range(3):
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif type(inner).__name__ == "FullyShardedDataParallel":
            inner = inner.module
        else:
            break
    return inner


@contextlib.contextmanager
def gathered(wrapper: nn.Module) -> Iterator[None]:
    """Full parameters inside the block for an FSDP1 wrapper (``summon_full_params``, collective: every rank
    must enter); a no-op for anything else."""
    if type(wrapper).__name__ == "FullyShardedDataParallel":
        with type(wrapper).summon_full_params(wrapper, writeback=False, rank0_only=False):
            yield
    else:
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor (collective), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def placed_like(value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) laid out as ``current``: this rank's shard when
    ``current`` is a DTensor (FSDP2; sliced locally, no communication), else ``value`` itself."""
    if not hasattr(current, "device_mesh"):
        return value
    return distribute_tensor(value, current.device_mesh, current.placements, src_data_rank=None)


def is_writer() -> bool:
    """True on rank 0 of an initialised process group, and without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sharded_fraction(gm: nn.Module, frozen_only: bool = True) -> Optional[float]:
    """The fraction of the blocks' (frozen) parameter elements this rank holds locally (1/world when every
    block is sharded); None for a graph without blocks."""
    blocks = graph_modules(unwrap_parallel(gm))[1:]
    local = full = 0
    for p in {p for b in blocks for p in b.parameters()}:
        if frozen_only and p.requires_grad:
            continue
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / full if full else None
