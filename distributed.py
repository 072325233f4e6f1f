"""Ranks for train.py: starting them, process-group set-up, FSDP2 sharding, reductions, dealing tasks to ranks and
micro-batch slices. Everything multi-process lives here, so train.py reads as one process's loop.

    python train.py --config configs/userrl-qwen3-4b.json      # one rank per visible GPU (NCCL), started by train.py
    python train.py --nproc 2 --steps 2                         # 2 gloo ranks on the CPU
    torchrun --nproc_per_node 8 train.py --config ...           # also works: torchrun's ranks are used as they are

Starting ranks: `python train.py` without torchrun runs the checks, claims the run folder and starts the user
server (if any) once, then re-runs itself through `torch.distributed.run --standalone` (`launch`), one rank per
GPU it trains on (`--nproc N` to choose; on the CPU, N gloo ranks), as nanochat and verl start their workers. The
ranks find the run folder and the server's address in their environment (RUN_DIR_ENV, USER_URL_ENV).

Data parallel is the same loop on every rank plus an all-reduce (a sum) of the gradients per update, no DDP
wrapper: the loss weights already divide by the GLOBAL token count (grpo.loss_weights), so summing gradients over
micro-batches and ranks gives exactly the gradient one process would compute on the whole batch. `--fsdp true`
shards parameters, gradients and optimizer state with FSDP2 `fully_shard` per decoder block, with the same sum
reduction, reduce-scattered after every micro-batch. Every rank draws the same global batch and rolls out its
share of the tasks (`deal`), so a GRPO group never spans ranks and advantages need no communication; any rank
count works (a rank's share may be one task smaller than another's, or empty). In one process every function
here is the identity.
"""
import os
import sys
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

RUN_DIR_ENV = "USERRL_RUN_DIR"
"""set by `launch` for its ranks: the run folder, already claimed (locked) by the launching process"""
USER_URL_ENV = "USERRL_USER_URL"
"""set by `launch` for its ranks when it started the user server (--user.serve_cmd): the server's base URL"""


class Ranks(NamedTuple):
    rank: int
    world: int
    device: torch.device


class Plan(NamedTuple):
    """How the launching process runs training on this machine (config.plan_ranks decides it)."""

    nproc: int
    """ranks that train"""
    launch: bool
    """start them through torch.distributed.run (more than one rank, or FSDP: a process group, maybe of one)"""
    train_gpus: list | None
    """the ranks' GPUs as CUDA_VISIBLE_DEVICES names them, one per rank; None on the CPU"""
    server_gpus: list
    """the user server's GPUs: the last --user.serve_gpus visible ones"""


# ----------------------------------------------------------------------------------------------------------
# Starting ranks


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs); [] without a
    GPU or without CUDA. Counting them does not initialise CUDA's allocator (see train.main)."""
    n = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:n] if listed is not None else [str(i) for i in range(n)]


def launched_run_dir() -> str | None:
    """The run folder when this process is a rank started by `launch` (the launching process checked the config,
    claimed the folder and started the user server), else None."""
    return os.environ.get(RUN_DIR_ENV) if "RANK" in os.environ else None


def launch(entry: str, argv: list[str], nproc: int, env: dict) -> int:
    """Run `python entry argv` as `nproc` ranks on this machine, exactly as `python -m torch.distributed.run
    --standalone --nproc_per_node nproc entry argv` would (its code runs here, in this process), with `env` added to
    the ranks' environment, and wait for them. Returns 0, or the exit status of the first rank that failed (its
    own error is already printed). Ctrl-C or SIGTERM here reaches every rank (torch.distributed.run sends them the
    signal, then SIGKILL after 30 s) and raises KeyboardInterrupt once they are gone."""
    import logging

    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.update(env)  # the ranks inherit this process's environment
    args = run.parse_args(["--standalone", "--nproc_per_node", str(nproc), entry])
    args.training_script_args = list(argv)  # as they are: its parser would read --nproc as its own --nproc_per_node
    for name in list(logging.root.manager.loggerDict):  # its "shutting down workers" warnings: the ranks say it
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run.run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a rank killed by signal s reports -s; a shell says 128 + s
    except SignalException:
        raise KeyboardInterrupt from None
    return 0


def setup(device: str, timeout_min: float) -> Ranks:
    """This process's rank, the world size and its device. Under torchrun: NCCL on GPUs (bound to this rank's GPU,
    so the communicator forms now and a broken one fails here), gloo on CPU. `timeout_min` is how long a rank
    waits at a collective for the others: long, since a rank that finished its rollout waits there for the slowest
    one (NCCL's default of 10 minutes would kill the job)."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_min),
                                device_id=torch.device("cuda", local) if cuda else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Ranks(rank, world, torch.device("cuda", local) if cuda else torch.device("cpu"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def teardown():
    """After a run that ended well; a rank that fails just exits (a barrier would wait for ranks that are gone)."""
    if dist.is_initialized():
        dist.barrier()  # no rank tears its group down while another still has collectives in flight
        dist.destroy_process_group()


def exit_now(code: int):
    """End this process with `code`. A rank stopped by a signal may leave a collective in flight (the other ranks
    stopped at other points, e.g. halfway through reduce_gradients' all-reduces): when it ends, gloo's worker
    thread drops its tensors, which takes the GIL, and while the interpreter shuts down Python ends such a thread
    where it stands, inside a C++ destructor: "terminate called without an active exception", SIGABRT. So a rank
    of a process group skips the shutdown (every `finally` has run; nothing is left to write but its streams)."""
    if not dist.is_initialized():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def deal(n_tasks: int, rank: int, world: int) -> list[int]:
    """The indices (in the global batch) of the tasks this rank rolls out: every `world`-th. Each mini-batch of
    consecutive tasks is spread as evenly as it can be (shares differ by at most one task, for any rank count;
    a rank's share may be empty)."""
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
    """FSDP2 over every rank (an explicit 1-D device mesh): one shard group per decoder block plus the root
    (embeddings, final norm, lm_head). The model may still be on the CPU: each fully_shard call moves its group to
    the mesh's device and keeps this rank's shard, so the full model is never on the GPU at once (one block is).

    Gradients: FSDP2's default, a reduce-scatter after EVERY micro-batch's backward, the shards accumulating in
    fp32. Accumulating without sync (set_requires_gradient_sync(False)) would keep an unsharded fp32 gradient of
    the whole model on every GPU (16 GB at 4B) until the last micro-batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 shards over the ranks of a process group, and this process has none")
    mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if is_fsdp(m):
            # The loss weights already divide by the GLOBAL token count, so gradients must be summed over ranks.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo (CPU) has no pre-scaled reductions
            # A rank padding with a dummy forward (micro_slices) leaves an untied lm_head without a gradient while
            # the others have one: reduce-scatter a zero for it, so every rank reduces the same tensors.
            m.set_reduce_scatter_unused_params(True)
    return model


def micro_slices(n: int, size: int, model) -> list[slice]:
    """Micro-batches of n items. Under FSDP every forward all-gathers shards and every backward reduce-scatters
    gradients, so every rank must run the same number of them: a rank with fewer items (or none) gets empty slices
    (the caller runs a dummy forward) at the end."""
    slices = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    if is_fsdp(model):
        count = int(all_reduce(torch.tensor(len(slices)), dist.ReduceOp.MAX))
        slices += [slice(0, 0)] * (count - len(slices))
    return slices


def reduce_gradients(model, params: list):
    """Data parallel: sum every gradient over ranks, in place, one all-reduce per parameter, all queued at once (no
    flat copy of the gradients). FSDP2 has already reduce-scattered its own."""
    if is_fsdp(model) or not dist.is_initialized():
        return
    for work in [dist.all_reduce(p.grad, async_op=True) for p in params]:
        work.wait()


def optimizer_step(model, optimizer, params: list, grad_clip: float) -> float:
    """The update once every micro-batch's backward has run, the same on every rank: a parameter with no gradient
    gets zeros (a rank, or a mini-batch, with nothing to train still takes its AdamW step, so the ranks' optimizer
    states stay alike), gradients are summed over ranks, clipped to `grad_clip` global norm, applied and cleared.
    Returns the global norm before clipping."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reduce_gradients(model, params)
    norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
