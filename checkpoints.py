"""The run folder: what a run writes, how two runs are kept out of one folder, and how a run continues (train.py).

    runs/<name>/
      train.lock          pid and host of the process that holds the folder; a second process is refused
      config.json         the resolved config, written when the run really starts (every check passed, model loaded)
      resume-log.jsonl    one line per --resume: the step it continued from and what the overrides changed
      metrics.jsonl       one JSON line per step
      transcripts.jsonl   a few episodes per step, each carrying its step (info.step)
      ckpt-000005/        save_pretrained folder + tokenizer + trainer_state.pt (step, optimizer, sampler)
                          + rng-rank<r>.pt (each rank's RNG states)

A folder that holds a run (a config, a checkpoint or metrics) is refused unless the run is resumed. Within a step,
the metrics and transcripts are appended and flushed to disk BEFORE the checkpoint is renamed into place, so the
latest checkpoint's step always has its lines; on --resume, the lines of later steps are dropped (they are about
to be redone). A checkpoint is written to `.tmp-ckpt-N` and renamed, so an interrupted save never leaves a broken
latest checkpoint.
"""
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError
from rollout import write_transcripts

LOCK = "train.lock"
LOGS = {"metrics.jsonl": lambda rec: rec.get("step", 0),  # each log file and where its records keep their step
        "transcripts.jsonl": lambda rec: rec.get("info", {}).get("step", 0)}


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
    if resume:  # a save that was interrupted before its rename
        for tmp in run_dir.glob(".tmp-ckpt-*"):
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


def take_lock(run_dir: Path) -> str:
    """Create run_dir/train.lock holding our pid and host. A lock left by a dead process on this host is taken
    over (returns a note saying so); a live one, or one from another host, is an error."""
    path, note = run_dir / LOCK, ""
    for _ in range(3):  # a stale lock taken over by two processes at once: one of them creates it, the other sees it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"--out_dir: {run_dir} is locked by {path}, which cannot be read; delete it if no "
                                  "run is using this folder") from None
            if host != socket.gethostname() or pid_alive(pid):
                raise ConfigError(f"--out_dir: {run_dir} is in use by process {pid} on {host} (lock file {path}); "
                                  "wait for that run to end, or delete the lock file if it is gone") from None
            path.unlink(missing_ok=True)
            note = f"took over the lock of {run_dir} from process {pid}, which is no longer running"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                      f)
        return note
    raise ConfigError(f"--out_dir: {run_dir} is being claimed by another process at the same time")


def release(run_dir: Path):
    """Drop the lock if it is ours."""
    path = run_dir / LOCK
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
        truncate_logs(run_dir, resumed_at)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")
    return [f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()]


def truncate_logs(run_dir: Path, step: int):
    """Keep the records of steps <= step in each log (a line torn by a crash goes too)."""
    for name, step_of in LOGS.items():
        path = run_dir / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if step_of(json.loads(line)) <= step:
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
# Checkpoints


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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, trainer_state: dict, rank: int):
    """`save_pretrained` folder + tokenizer + optimizer + `trainer_state` (e.g. the sampler) + per-rank RNG,
    written to a temporary folder and renamed. Every rank calls it (the full state dicts gather FSDP shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    final, tmp = run_dir / f"ckpt-{step:06d}", run_dir / f".tmp-ckpt-{step:06d}"
    if rank == 0:
        model.save_pretrained(tmp, state_dict=msd)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": osd, **trainer_state}, tmp / "trainer_state.pt")
    if dist.is_initialized():
        dist.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp.rename(final)


def load_checkpoint(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Restore the optimizer and this rank's RNG from `ckpt` (the weights came with load_model(ckpt)); returns
    the trainer state (step, sampler, ...)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    set_rng_state(torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=False))
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(run_dir.glob("ckpt-*"))
    return ckpts[-1] if ckpts else None
