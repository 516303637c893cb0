"""Run by tests/test_faults.py under torchrun (2 gloo processes): saves under DDP and FSDP2 by the ecosystem's
conventions. Writes <out>/record.pt (rank 0) and the folders the test reads."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import vera_fx
from conftest import tiny_llama


def adapted() -> torch.nn.Module:
    m = vera_fx.transform(tiny_llama(), vera_fx.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)  # the same values on every rank
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a hang fails, never waits on
    rank = dist.get_rank()
    m = adapted()
    full = {k: v.clone() for k, v in vera_fx.adapter_state_dict(m).items()}
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    if rank == 0:  # the usual idiom: no collective inside, rank 1 goes on
        vera_fx.save_adapter(ddp, out / "ddp_rank0")
    m.save_pretrained(out / "ddp_pretrained", is_main_process=rank == 0)  # transformers' convention
    dist.barrier()

    sharded = adapted()
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    error, seconds = "no error", 0.0
    if rank == 0:  # one rank alone: refused at once (a gather would wait for rank 1 forever)
        start = time.perf_counter()
        try:
            vera_fx.save_adapter(sharded, out / "fsdp2_one")
        except ValueError as e:
            error = str(e)
        seconds = time.perf_counter() - start
    vera_fx.save_adapter(sharded, out / "fsdp2_all", is_main_process=rank == 0)  # every rank: a gather
    state = sharded.state_dict()  # full tensors on every rank (a collective, as the Trainer calls it)
    if rank == 0:
        (out / "trainer").mkdir()
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                    str(out / "trainer" / "model.safetensors"))
        torch.save({"full": full, "fsdp2_one_rank_error": error, "fsdp2_one_rank_seconds": seconds},
                   out / "record.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
