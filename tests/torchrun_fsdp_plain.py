"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): the standard FSDP2 recipe on what
``vera_fx.transform`` returns, then ``state_dict()`` / ``load_state_dict()`` of the sharded model.

``--variant graph``: ``fully_shard`` each layer of ``m.graph_module.model.layers``, then ``m``, nothing else.
``--variant object``: each layer of ``m.model.layers``, then ``m``, then
``vera_fx.distributed.mean_gradients(m)``. Both record whether FSDP2 on gloo sums the gradients (pytorch
issue 162338) on this torch. Rank 0 writes ``<out>/<variant>.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import torchrun_fsdp as ex  # noqa: E402

from vera_fx.checkpoint import state_dict_targets  # noqa: E402
from vera_fx.distributed import fsdp2_sums_gradients, full_tensor, mean_gradients  # noqa: E402


def run(variant: str, steps: int, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    m = ex.adapted("llama")
    ids_before = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        ids_before.setdefault(id(p), []).append(name)
    duplicates = [names for names in ids_before.values() if len(names) > 1]
    layers = m.model.layers if variant == "object" else m.graph_module.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(m)
    sums = fsdp2_sums_gradients()
    averaged = mean_gradients(m) if variant == "object" else None
    ids = ex.batch(world)[2 * rank: 2 * rank + 2]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    losses, grads = [], None
    for step in range(steps):
        loss = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: full_tensor(p.grad).clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    state = m.state_dict()  # every rank calls it, as the Trainer does: a collective under FSDP2
    sharded = [k for k, v in state.items() if hasattr(v, "device_mesh")]
    every = [None] * world
    dist.all_gather_object(every, {k: v.clone() for k, v in state.items()})
    same_on_ranks = all(o.keys() == state.keys() and all(torch.equal(o[k], v) for k, v in state.items())
                        for o in every)
    lambdas = {n: p for n, p in m.named_parameters() if p.requires_grad}
    trained = {n: full_tensor(p).clone() for n, p in lambdas.items()}
    with torch.no_grad():
        for p in lambdas.values():
            p.zero_()
    m.load_state_dict(state)  # full tensors into the sharded model: each rank keeps its shard
    reloaded = all(torch.equal(full_tensor(p), trained[n]) for n, p in lambdas.items())
    local = {n: (p.to_local().numel(), p.numel()) for n, p in lambdas.items() if hasattr(p, "to_local")}
    # a state dict of DTensors (each rank's shard, as state_dict() gave before) stands for its full tensors
    shards = dict(state)
    for key, (mod, attr) in state_dict_targets(m, "default").items():
        if hasattr(getattr(mod, attr), "device_mesh"):
            shards[f"vera_fx.default.{key}"] = getattr(mod, attr).detach().clone()
    with torch.no_grad():
        for p in lambdas.values():
            p.zero_()
    m.load_state_dict(shards)
    reloaded_shards = all(torch.equal(full_tensor(p), trained[n]) for n, p in lambdas.items())
    if rank == 0:
        torch.save({"grads": grads, "losses": losses, "state": {k: v.clone() for k, v in state.items()},
                    "sharded": sharded, "same_on_ranks": same_on_ranks, "reloaded": reloaded,
                    "reloaded_shards": reloaded_shards, "local": local, "duplicates": duplicates,
                    "averaged": averaged, "sums": sums, "world": world}, out / f"{variant}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["graph", "object"], required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        run(args.variant, args.steps, args.out)
        dist.barrier()  # no rank tears its gloo pairs down while the other still reads from them
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
