"""The custom ops vera_fx's graphs call (an exported PVeRA program needs torch and this file only): standard
normal noise on CPU from a generator state kept in a uint8 tensor and written back, one opaque state-mutating
node where a ``torch.Generator`` argument would break the graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.library.custom_op("vera_fx::pvera_noise", mutates_args=("generator_state",))
def pvera_noise(generator_state: Tensor, shape: Sequence[int], groups: int, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` from ``generator_state``; with ``groups > 1`` the leading dimension is
    ``groups`` blocks each drawn by its own call (as ``groups`` forwards of one block each)."""
    gen = torch.Generator(device="cpu")
    gen.set_state(generator_state.detach().to("cpu"))
    shape = [int(s) for s in shape]
    if groups > 1 and shape and shape[0] % groups == 0:
        block = [shape[0] // groups, *shape[1:]]
        noise = torch.cat([torch.randn(block, generator=gen, dtype=dtype) for _ in range(groups)])
    else:
        noise = torch.randn(shape, generator=gen, dtype=dtype)
    generator_state.copy_(gen.get_state())
    return noise


@pvera_noise.register_fake
def _pvera_noise_fake(generator_state: Tensor, shape: Sequence[int], groups: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(list(shape), dtype=dtype, device="cpu")


@torch.library.custom_op("vera_fx::pvera_bank_noise", mutates_args=("generator_states",))
def pvera_bank_noise(generator_states: list[Tensor], index: Tensor, draw: list[bool], shape: Sequence[int],
                     dtype: torch.dtype) -> Tensor:
    """Noise for a mixed-adapter batch: row ``i`` draws ``shape[1:]`` from ``generator_states[index[i]]``
    when ``draw[index[i]]``, else it is zero and draws nothing (an index past the list is a row of no bank
    member). Rows of one adapter draw in row order, so the result equals running each row alone."""
    shape = [int(s) for s in shape]
    noise = torch.zeros(shape, dtype=dtype)
    gens: dict[int, torch.Generator] = {}
    for row, k in enumerate(index.tolist()):
        if k >= len(generator_states) or not draw[k]:
            continue
        gen = gens.get(k)
        if gen is None:
            gen = gens[k] = torch.Generator(device="cpu")
            gen.set_state(generator_states[k].detach().to("cpu"))
        noise[row] = torch.randn(shape[1:], generator=gen, dtype=dtype)
    for k, gen in gens.items():
        generator_states[k].copy_(gen.get_state())
    return noise


@pvera_bank_noise.register_fake
def _pvera_bank_noise_fake(generator_states: list[Tensor], index: Tensor, draw: list[bool], shape: Sequence[int],
                           dtype: torch.dtype) -> Tensor:
    return torch.empty(list(shape), dtype=dtype, device="cpu")
