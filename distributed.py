"""Ranks for train.py: process-group set-up, FSDP2 sharding, reductions, micro-batch slices and the rollout copy's
weights. Everything multi-process lives here, so train.py reads as one process's loop.

    torchrun --nproc_per_node 8 train.py --config configs/userrl-qwen3-4b.json     # 8 ranks, NCCL on GPUs
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 train.py --steps 2                # 2 gloo ranks on CPU

Data parallel is the same loop on every rank plus one all-reduce (a sum) of the gradients per update, no DDP
wrapper: the loss weights already divide by the GLOBAL token count (grpo.loss_weights), so summing gradients over
micro-batches and ranks gives exactly the gradient one process would compute on the whole batch. `--fsdp true`
shards parameters, gradients and optimizer state with FSDP2 `fully_shard` per decoder block, with the same sum
reduction. Every rank draws the same global batch and rolls out its share of the tasks (`deal`), so a GRPO group
never spans ranks and advantages need no communication. In one process every function here is the identity.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Ranks(NamedTuple):
    rank: int
    world: int
    device: torch.device


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 without torchrun); known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str) -> Ranks:
    """This process's rank, the world size and its device. Under torchrun: NCCL on GPUs, gloo on CPU."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return Ranks(rank, world, torch.device("cuda", local))
    return Ranks(rank, world, torch.device("cpu"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def teardown():
    if dist.is_initialized():
        dist.barrier()  # no rank tears its group down while another still has collectives in flight
        dist.destroy_process_group()


def deal(n_tasks: int, rank: int, world: int) -> list[int]:
    """The indices (in the global batch) of the tasks this rank rolls out: every `world`-th, so each mini-batch
    of consecutive tasks has the same share on every rank."""
    return list(range(rank, n_tasks, world))


def on_rank0(fn):
    """fn() run by rank 0 alone, its result returned on every rank. An exception it raises is raised on every
    rank, so no rank waits forever for one that failed (used to claim the run folder once)."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # handed to every rank, then raised
            error, box = e, [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise error or value
    return value


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Reductions


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks. NCCL reduces on the GPU, gloo on the CPU."""
    if not dist.is_initialized():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev)
    dist.all_reduce(x, op=op)
    return x.to(t.device)


def all_reduce_sums(sums: dict) -> dict:
    """{name: float} summed over ranks, in float64 (every rank must hold the same names)."""
    keys = sorted(sums)
    total = all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist()))


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------------------
# Gradients: data parallel or FSDP2


def is_fsdp(model) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # what fully_shard adds to a module


def shard(model, bf16: bool):
    """FSDP2: one shard group per decoder block plus the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The loss weights already divide by the GLOBAL token count, so gradients must be summed over ranks.
    for m in model.modules():
        if is_fsdp(m):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo (CPU) has no pre-scaled reductions
    return model


def micro_slices(n: int, size: int, model) -> list[slice]:
    """Micro-batches of n items. Under FSDP every forward all-gathers shards, so every rank must run the same
    number of them: a rank with fewer items gets empty slices (the caller runs a dummy forward) at the end."""
    slices = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    if is_fsdp(model):
        count = int(all_reduce(torch.tensor(len(slices)), dist.ReduceOp.MAX))
        slices += [slice(0, 0)] * (count - len(slices))
    return slices


def set_gradient_sync(model, last_micro_batch: bool):
    """FSDP2 accumulates gradients locally and reduce-scatters once, after the last micro-batch of an update."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(last_micro_batch)


def reduce_gradients(model, params: list):
    """Data parallel: sum every gradient over ranks, in one flat all-reduce (FSDP2 has already reduced its own)."""
    if is_fsdp(model) or not dist.is_initialized():
        return
    grads = [p.grad for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def sync_rollout_weights(rollout_model, model):
    """Copy the trained weights into the rollout copy, gathering each FSDP shard once per step."""
    with torch.no_grad():
        dst = dict(rollout_model.named_parameters())
        for name, p in model.named_parameters():
            dst[name].copy_(full_tensor(p))
