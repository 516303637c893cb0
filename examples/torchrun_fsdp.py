"""Data-parallel VeRA training under torchrun: DDP, FSDP2 per decoder layer, FSDP1.

    torchrun --nproc_per_node=2 examples/torchrun_fsdp.py --model llama --modes ddp,fsdp2,plain,fsdp1 --out /tmp/run

``fsdp2`` shards with ``vera_fx.distributed.shard``; ``plain`` is the standard FSDP2 recipe on the object
``vera_fx.transform`` returns, as PEFT and accelerate users write it (``fully_shard`` each layer of
``m.model.layers``, then ``m``), nothing else: on torch 2.13 gloo averages the gradients as DDP does (torch
builds that sum instead, pytorch issue 162338, need ``vera_fx.distributed.mean_gradients(m)``).

Each mode transforms a small model from the same seed, splits a fixed batch across the ranks, trains a few
SGD steps and saves the adapter from rank 0 (``vera_fx.save_adapter`` gathers the shards on every rank).
Without torchrun it runs as one process. Rank 0 writes ``<out>/<mode>.pt``: the full lambda gradients of the
first step, the losses, and for FSDP2 the fraction of the frozen block weights each rank holds between
forwards. ``--backend nccl`` runs the same on GPUs. (tests/test_distributed.py launches this script and compares with a single-process run.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import vera_fx
from vera_fx.distributed import full_tensor, shard, sharded_fraction


def build(name: str) -> torch.nn.Module:
    """A tiny transformers model, the same on every rank (fixed seed)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def batch(world: int, rows_per_rank: int = 2, length: int = 8) -> torch.Tensor:
    """The full batch: ``world * rows_per_rank`` rows of token ids."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (world * rows_per_rank, length), generator=g)


def adapted(name: str) -> vera_fx.VeraFxModel:
    """The object ``vera_fx.transform`` returns, the same on every rank."""
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"] if name == "llama" else ["c_attn", "c_fc"]
    config = vera_fx.VeraConfig(r=8, target_modules=targets, init_weights=False, fan_in_fan_out=name == "gpt2")
    return vera_fx.transform(build(name), config)


def transformed(name: str) -> torch.fx.GraphModule:
    return adapted(name).graph_module  # the graph: DDP / FSDP1 wrap it as any module


def layers(m: vera_fx.VeraFxModel) -> torch.nn.ModuleList:
    """The model's layer list, through the object's attribute path (each entry is a block of the graph)."""
    return m.model.layers if hasattr(m, "model") else m.transformer.h


def lambda_grads(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = vera_fx.distributed.unwrap_parallel(gm)
    return {n: full_tensor(p.grad).detach().clone() for n, p in inner.named_parameters()
            if p.requires_grad and p.grad is not None}


def run(mode: str, name: str, steps: int, out: Path, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gm = transformed(name).to(device) if device.type != "cpu" else transformed(name)
    if mode == "ddp":
        model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(gm)
    elif mode == "fsdp2":
        model = shard(gm)
    elif mode == "plain":  # the standard FSDP2 recipe, on the object
        model = adapted(name)
        for layer in layers(model):
            fully_shard(layer)
        fully_shard(model)
    elif mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(gm, use_orig_params=True, device_id=device)
    else:
        raise ValueError(f"--modes: unknown mode {mode!r}; use ddp, fsdp2, plain or fsdp1")
    ids = batch(world)[2 * rank: 2 * rank + 2].to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, grads, fraction = [], None, None
    for step in range(steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        if step == 0:
            grads = lambda_grads(model) if mode != "fsdp1" else None
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        if mode in ("fsdp2", "plain"):
            fraction = sharded_fraction(model)
    vera_fx.save_adapter(model, out / f"adapter_{mode}", is_main_process=rank == 0)  # every rank: a gather
    if rank == 0:
        torch.save({"grads": grads, "losses": losses, "fraction": fraction, "world": world}, out / f"{mode}.pt")
        print(f"{mode}: losses {['%.4f' % v for v in losses]}, block weights held per rank: {fraction}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--modes", default="ddp,fsdp2,plain,fsdp1")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("torchrun_out"))
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--quick", action="store_true", help="two steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" not in os.environ:  # run without torchrun: one process (a smoke run of the same code)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for mode in args.modes.split(","):
            run(mode, args.model, 2 if args.quick else args.steps, args.out, device)
        dist.barrier()  # every rank done before any tears the process group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
