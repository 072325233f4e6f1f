"""The run folder: what a run writes, how two runs are kept out of one folder, how a run continues (train.py), and
the exports of the trained policy.

    runs/<name>/
      train.lock          pid and host of the process that holds the folder; a second process is refused
      config.json         the resolved config, written when the run really starts (every check passed, model loaded)
      resume-log.jsonl    one line per --resume: the step it continued from and what the overrides changed
      metrics.jsonl       one JSON line per step
      transcripts.jsonl   a few episodes per step, each carrying its step (info.step)
      ckpt-000005/        resumable state (--save_every, the last --keep_last kept): model and AdamW state as
                          torch.distributed.checkpoint shards (.metadata, __<rank>_0.distcp), trainer_state.pt
                          (step, sampler), rng-rank<r>.pt (each rank's RNG states)
      export-000010/      the policy as a Hugging Face folder in the training dtype (--export_every)
      final/              the same, written when the run reaches --steps: what --model, vLLM or from_pretrained load

    python checkpoints.py runs/<name>/ckpt-000005 OUT    # any checkpoint as a Hugging Face folder (one process)

A checkpoint is each rank's shard, not a full copy gathered on rank 0: at the 4B recipe on 8 GPUs, 5.6 GB per GPU of
45 GB (fp32 weights and AdamW's two moments; bench/memory.py's `disk:` line computes it from the shapes). A folder
that holds a run (a config, a checkpoint or metrics) is refused unless the run is resumed. Within a step, the
metrics and transcripts are appended and flushed to disk BEFORE the checkpoint is renamed into place, so the latest
checkpoint's step always has its lines; on --resume, the lines of later steps are dropped (they are about to be
redone). Checkpoints and exports are written to `.tmp-*` folders and renamed once complete on every rank, so
an interrupted save never leaves a broken latest checkpoint; older checkpoints are deleted only after that.
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError
from rollout import write_transcripts

LOCK = "train.lock"
# Each log file and, for a record, the step of the run it belongs to (given the run's phase, its --algo). A run
# folder's evals.jsonl may also hold other phases' lines (the recipe's untrained and SFT rows): they are kept.
LOGS = {"metrics.jsonl": lambda rec, phase: rec.get("step", 0),
        "transcripts.jsonl": lambda rec, phase: rec.get("info", {}).get("step", 0),
        "evals.jsonl": lambda rec, phase: rec.get("step", 0) if rec.get("phase") == phase else 0}


# ----------------------------------------------------------------------------------------------------------
# Claiming the folder


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists() or (run_dir / "metrics.jsonl").exists() or any(run_dir.glob("ckpt-*"))


def open_run(run_dir: Path, resume: bool) -> str:
    """Claim `run_dir` for this process (rank 0 only): refuse a folder that holds a run unless resuming, and a
    folder another live process holds; create it and take its lock. Returns a note to print ("" if none)."""
    if not resume and holds_run(run_dir):
        raise ConfigError(f"--out_dir: {run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "or choose another --out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    note = take_lock(run_dir)
    if resume:  # what a save, an export or a deletion left when it was cut short
        for tmp in run_dir.glob(".tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp)
    return note


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def take_lock(run_dir: Path, flag: str = "--out_dir", name: str = LOCK) -> str:
    """Create run_dir/train.lock (or `name`: eval.py's eval.lock) holding our pid and host. A lock left by a dead
    process on this host is taken over (returns a note saying so); a live one, or one from another host, is an
    error that names the option (`flag`) that chose the folder."""
    path, note = run_dir / name, ""
    for _ in range(3):  # a stale lock taken over by two processes at once: one of them creates it, the other sees it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"{flag}: {run_dir} is locked by {path}, which cannot be read; delete it if no "
                                  "run is using this folder") from None
            if host != socket.gethostname() or pid_alive(pid):
                raise ConfigError(f"{flag}: {run_dir} is in use by process {pid} on {host} (lock file {path}); "
                                  "wait for that run to end, or delete the lock file if it is gone") from None
            path.unlink(missing_ok=True)
            note = f"took over the lock of {run_dir} from process {pid}, which is no longer running"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                      f)
        return note
    raise ConfigError(f"{flag}: {run_dir} is being claimed by another process at the same time")


def release(run_dir: Path, name: str = LOCK):
    """Drop the lock if it is ours."""
    path = run_dir / name
    try:
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError):
        pass


# ----------------------------------------------------------------------------------------------------------
# config.json, the resume log, the per-step logs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_run(run_dir: Path, config: dict, resumed_at: int | None) -> list[str]:
    """Write config.json as the run starts. On resume, first append what the overrides change to
    resume-log.jsonl and drop the log lines of steps after `resumed_at`; returns the changes as text."""
    changes = {}
    if resumed_at is not None:
        old = flatten(json.loads((run_dir / "config.json").read_text()))
        new = flatten(config)
        changes = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
                   if old.get(k) != new.get(k) and k not in ("resume", "out_dir")}
        with open(run_dir / "resume-log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": resumed_at,
                                "changes": changes}) + "\n")
        truncate_logs(run_dir, resumed_at, config.get("algo"))
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")
    return [f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()]


def truncate_logs(run_dir: Path, step: int, phase: str):
    """Keep the records of steps <= step in each log (a line torn by a crash goes too); in evals.jsonl, of the
    evaluations of `phase` (the resumed run's --algo)."""
    for name, step_of in LOGS.items():
        path = run_dir / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if step_of(json.loads(line), phase) <= step:
                    kept.append(line + "\n")
            except ValueError:
                pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _sync_to_disk(path: Path):
    with open(path, "a") as f:
        os.fsync(f.fileno())


def append_step(run_dir: Path, metrics: dict, episodes: list, tokenizer):
    """The step's metrics line and transcripts, on disk before the step's checkpoint is written."""
    if episodes:
        write_transcripts(run_dir / "transcripts.jsonl", episodes, tokenizer, append=True)
        _sync_to_disk(run_dir / "transcripts.jsonl")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    _sync_to_disk(run_dir / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------------
# Resumable checkpoints: sharded with torch.distributed.checkpoint (DCP)

CKPT = re.compile(r"ckpt-(\d{6,})")


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first. Each one is complete: a checkpoint is renamed into place only once
    every rank has written its part."""
    found = [(int(m[1]), p) for p in run_dir.glob("ckpt-*") if (m := CKPT.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = checkpoints_in(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(ckpt: Path | None) -> int:
    """The step a checkpoint holds (0 for None: the start)."""
    return int(CKPT.fullmatch(ckpt.name)[1]) if ckpt else 0


def check_resumable(run_dir: Path):
    """Refuse, before any work, a run whose latest checkpoint is of the format written before sharded checkpoints
    (a full model.safetensors and an optimizer in trainer_state.pt): its weights can start a new run."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt and not (ckpt / ".metadata").is_file() and (ckpt / "model.safetensors").is_file():
        raise ConfigError(f"--resume: {ckpt} is a checkpoint of the older single-file format, which this version "
                          f"cannot resume; start a new run from its weights with --model {ckpt} --out_dir NEW_DIR "
                          "(the optimizer state and the step count start afresh)")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dcp(fn, state: dict, ckpt: Path):
    """dcp.save or dcp.load of `state` at `ckpt`. DCP gathers every rank's failure into one CheckpointException,
    a Ctrl-C too: that one is raised again as the KeyboardInterrupt it was (train.py makes it one line), any other
    as one line naming each rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # in one process DCP warns that it "assumes the intent" to work locally: ours
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            return fn(state, checkpoint_id=ckpt)
        except CheckpointException as e:
            errors = {rank: exc for rank, (exc, _) in sorted(e.failures.items())}
        if any(isinstance(exc, KeyboardInterrupt) for exc in errors.values()):
            raise KeyboardInterrupt
        raise RuntimeError(f"checkpoint {ckpt}: dcp.{fn.__name__} failed: " +
                           "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, exc in errors.items()))


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resumable_state(model, optimizer=None) -> dict:
    """The model's (and the optimizer's) state dicts as DCP reads and writes them: this rank's shards under FSDP2
    (DTensors), the full tensors otherwise, keyed by parameter name; each a view of the live tensors, so DCP loads
    in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def untied(state: dict, model) -> dict:
    """`state` without the second name of a tied weight (Qwen3-4B's lm_head is its embedding: 1.6 GB in fp32).
    Loading the first name fills both, since they are one tensor."""
    first = {}
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name}
    return {**state, "model": {k: v for k, v in state["model"].items() if k not in tied}}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict, rank: int, keep_last: int):
    """Every rank calls it. Writes RUN/ckpt-<step>: the model and optimizer state with DCP (each rank writes its
    own shard; a tensor every rank holds in full, as in plain data parallel, is written once, by one rank),
    `trainer_state.pt` (step, `trainer_state`, rank 0) and `rng-rank<r>.pt` (each rank's RNG states). All of it
    goes to `.tmp-ckpt-<step>`, which rank 0 renames once every rank has finished; then checkpoints older than
    the last `keep_last` are deleted (0 keeps all)."""
    import torch.distributed.checkpoint as dcp

    final, tmp = run_dir / f"ckpt-{step:06d}", run_dir / f".tmp-ckpt-{step:06d}"
    # returns once rank 0 has written .metadata, which it does after every rank has written its shard
    _dcp(dcp.save, untied(resumable_state(model, optimizer), model), tmp)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        torch.save({"step": step, "world": world, **trainer_state}, tmp / "trainer_state.pt")
    signal_point("checkpoint", step)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _fsync_dir(tmp)
        tmp.rename(final)
        _fsync_dir(run_dir)
        prune(run_dir, keep_last)
    if dist.is_initialized():
        dist.barrier()  # the checkpoint is the latest on every rank before any goes on


SIGNAL_AT = "USERRL_SIGNAL_AT"


def signal_point(point: str, step: int):
    """A test hook, so that tests interrupt each phase of a step deterministically rather than on a timer: with
    USERRL_SIGNAL_AT=POINT@STEP:SIGNAL in the environment (e.g. checkpoint@2:SIGTERM; several separated by commas)
    this process sends itself SIGNAL when step STEP reaches POINT, each once a step: rollout (its first chunk of
    tasks done), update (as it starts), checkpoint (every shard written, the folder not yet renamed into place)."""
    for spec in filter(None, os.environ.get(SIGNAL_AT, "").split(",")):
        where, _, name = spec.partition(":")
        if where == f"{point}@{step}":
            os.kill(os.getpid(), getattr(signal, name))


def prune(run_dir: Path, keep_last: int):
    """Delete the checkpoints older than the last `keep_last` (rank 0, after a newer one is complete). Each is
    renamed out of the `ckpt-*` names first, so a deletion cut short never leaves a partial checkpoint where
    resume looks (open_run clears what it left on resume)."""
    if keep_last <= 0:
        return
    for old in checkpoints_in(run_dir)[:-keep_last]:
        trash = run_dir / f".tmp-delete-{old.name}"
        old.rename(trash)
        shutil.rmtree(trash)


def load_checkpoint(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Load `ckpt` into the model and optimizer (already built, sharded and on their device: each rank reads its
    shard straight into its tensors, whatever the rank count or sharding that wrote it), and this rank's RNG
    states; returns the trainer state (step, world, sampler). A rank the writing run did not have keeps its
    seed. The optimizer's hyper-parameters come back as saved: the caller sets the config's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = resumable_state(model, optimizer)
    _dcp(dcp.load, untied(state, model), ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if (ckpt / f"rng-rank{rank}.pt").is_file():
        set_rng_state(torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=False))
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face exports: the policy for --model, vLLM, or any from_pretrained


def export_model(path: Path, model, tokenizer):
    """Write `model` (unsharded, in the dtype it should be served in) and `tokenizer` as a `save_pretrained` folder
    at `path`, through a temporary folder (an existing export of that name is replaced). config.json names the
    dtype under both keys: `dtype` (transformers 5) and `torch_dtype` (what older transformers, and vLLM with
    them, read). One process calls it (rank 0)."""
    tmp, old = path.with_name(f".tmp-{path.name}"), path.with_name(f".tmp-old-{path.name}")
    for leftover in (tmp, old):  # of an export cut short
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _fsync_dir(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(ckpt: Path, out: Path, dtype: str | None = None):
    """Any resumable checkpoint as a Hugging Face folder, in one process (DCP reads every rank's shard): the model
    is built as the run built it (its config.json), its weights loaded from `ckpt`, cast to `dtype` (the run's
    --dtype by default). For a run stopped before its end, or a step between exports."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from models import load_model

    run = json.loads((ckpt.parent / "config.json").read_text())
    model, tokenizer = load_model(run["model"], seed=run["seed"])
    state = resumable_state(model)
    _dcp(dcp.load, untied(state, model), ckpt)
    set_model_state_dict(model, state["model"])
    export_model(out, model.to(getattr(torch, dtype or run["dtype"])), tokenizer)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export a resumable checkpoint as a Hugging Face folder.")
    parser.add_argument("ckpt", type=Path, help="a checkpoint folder, RUN/ckpt-NNNNNN")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the run's --dtype")
    args = parser.parse_args()
    if not (args.ckpt / ".metadata").is_file() or not (args.ckpt.parent / "config.json").is_file():
        sys.exit(f"error: {args.ckpt} is not a checkpoint folder of a run (RUN/ckpt-NNNNNN)")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    export_checkpoint(args.ckpt, args.out, args.dtype)
    print(f"wrote {args.out}")
