"""Checkpoints a long run can afford (checkpoints.py, train.py): sharded resumable state with each tensor written
once, exact resume on 2 ranks (data parallel and FSDP2; one process: tests/test_train.py), resharding, --keep_last,
saves cut short by Ctrl-C or failing, Hugging Face exports in the training dtype, bench/memory.py's disk figures,
and old-format checkpoints refused with what to do."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import checkpoints
import envs
import train
from test_train import CommaEnv, read_metrics, small_cfg, untimed

ROOT = Path(__file__).resolve().parent.parent
POOL = {"comma": [{"id": f"d{i}"} for i in range(4)]}


@pytest.fixture(autouse=True)
def comma_gym(monkeypatch):
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)


def weights(folder) -> list:
    return [p.detach() for p in train.load_model(str(folder))[0].parameters()]


def safetensors_dtypes(path: Path) -> set:
    """The dtypes named in a .safetensors file's header (8 bytes of length, then JSON)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def state_bytes(ckpt: Path) -> int:
    """The bytes of one copy of the checkpoint's tensors, from its DCP metadata."""
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return sum(m.size.numel() * m.properties.dtype.itemsize for m in meta.values() if hasattr(m, "size"))


def test_two_ranks_resume_exactly_and_write_each_tensor_once(tmp_path, capsys):
    """torchrun, 2 gloo ranks, data parallel and FSDP2: a run stopped after step 2 and resumed matches an
    uninterrupted 4-step run (metrics and final weights). Each rank writes its own file, and together they hold one
    copy of the state: shards under FSDP2, and under data parallel each replicated tensor written by one rank. A
    2-rank checkpoint also loads in one process (DCP reshards), exported or resumed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/dist_resume.py", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        full, part = tmp_path / mode / "full", tmp_path / mode / "part"
        assert [m["step"] for m in read_metrics(part)] == [1, 2, 3, 4], mode
        assert [untimed(m) for m in read_metrics(full)] == [untimed(m) for m in read_metrics(part)], mode
        assert all(torch.equal(a, b) for a, b in zip(weights(full / "final"), weights(part / "final"))), mode
        ckpt = part / "ckpt-000004"
        shards = {f.name: f.stat().st_size for f in ckpt.glob("*.distcp")}
        assert set(shards) == {"__0_0.distcp", "__1_0.distcp"}, mode
        assert min(shards.values()) > 0.3 * max(shards.values()), (mode, shards)
        # one copy plus DCP's framing (about 1 kB per tensor shard, 10% at this toy size); written twice it is 2x
        assert sum(shards.values()) < 1.5 * state_bytes(ckpt), (mode, shards)
        names = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        assert "model.model.embed_tokens.weight" in names and "model.lm_head.weight" not in names  # tied: once
        checkpoints.export_checkpoint(ckpt, tmp_path / mode / "one-process", "float32")
        assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / mode / "one-process"), weights(part / "final")))
    part = tmp_path / "fsdp" / "part"
    train.train(train.parse_config(["--resume", str(part), "--steps", "5", "--fsdp", "false"]), task_pool=POOL)
    assert "note: ckpt-000004 was written by 2 rank(s), this run has 1: the weights and optimizer state are " \
           "resharded" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(part)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("where", ["in dcp.save", "after the shards"])
def test_keep_last_and_a_save_cut_short_by_ctrl_c(tmp_path, monkeypatch, where):
    """--keep_last 1: each older checkpoint goes once a newer one is complete. Ctrl-C during a save (while DCP
    writes, where DCP wraps it in its own exception; or after the shards, before the rename) ends the run with the
    one-line message, leaves the last complete checkpoint in place and the latest; resume clears the partial one and
    redoes the step."""
    run_dir = tmp_path / "run"
    train.train(small_cfg(run_dir, "--steps", "2", "--keep_last", "1"), task_pool=POOL)
    assert [c.name for c in checkpoints.checkpoints_in(run_dir)] == ["ckpt-000002"]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "in dcp.save":
        monkeypatch.setattr(torch, "save", ctrl_c)  # DCP writes each item with torch.save
    else:
        monkeypatch.setattr(checkpoints, "_fsync_dir", ctrl_c)  # every file written, before the rename
    with pytest.raises(train.Interrupted, match="interrupted during step 3 of 3 \\(last checkpoint ckpt-000002\\)"):
        train.train(train.parse_config(["--resume", str(run_dir), "--steps", "3"]), task_pool=POOL)
    assert (run_dir / ".tmp-ckpt-000003").is_dir()
    assert checkpoints.latest_checkpoint(run_dir) == run_dir / "ckpt-000002"
    monkeypatch.undo()
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    train.train(train.parse_config(["--resume", str(run_dir), "--steps", "3"]), task_pool=POOL)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["ckpt-000003", "final"]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]


def test_a_failed_save_is_one_line_naming_each_ranks_error_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, _ = train.load_model("tiny")
    optimizer = torch.optim.AdamW(model.parameters())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RuntimeError, match=f"^checkpoint {tmp_path}/.tmp-ckpt-000001: dcp.save failed: rank 0: "
                                           "OSError: .Errno 28. No space left on device$"):
        checkpoints.save_checkpoint(tmp_path, 1, model, optimizer, {}, 0, keep_last=2)
    assert checkpoints.latest_checkpoint(tmp_path) is None


def test_bf16_exports_hold_the_trained_weights_cast_and_load_as_a_model(tmp_path):
    """--dtype bfloat16 --export_every 1: RUN/export-000001 and RUN/final (the last step is exported once, there),
    save_pretrained folders of bf16 tensors whose config.json names the dtype under both keys; loaded with
    train.load_model (what --model does), their weights are the checkpoint's fp32 weights cast to bf16."""
    run_dir = train.train(small_cfg(tmp_path / "run", "--steps", "2", "--dtype", "bfloat16", "--export_every", "1",
                                    "--lr", "1e-2"), task_pool=POOL)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["ckpt-000001", "ckpt-000002", "export-000001",
                                                                        "final"]
    for export, ckpt in (("export-000001", "ckpt-000001"), ("final", "ckpt-000002")):
        config = json.loads((run_dir / export / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"
        assert safetensors_dtypes(run_dir / export / "model.safetensors") == {"BF16"}
        assert (run_dir / export / "tokenizer.json").is_file()
        checkpoints.export_checkpoint(run_dir / ckpt, tmp_path / f"{ckpt}-fp32", "float32")
        trained = weights(tmp_path / f"{ckpt}-fp32")
        assert all(torch.equal(a, b.to(torch.bfloat16).float()) for a, b in zip(weights(run_dir / export), trained))
    assert not all(torch.equal(a, b) for a, b in zip(weights(run_dir / "export-000001"), weights(run_dir / "final")))


def test_bench_memory_states_the_disk_a_run_uses(tmp_path):
    """bench/memory.py's checkpoint and export sizes, computed from the shapes, are what a run writes (the tiny
    model, bf16): the checkpoint's tensors (plus AdamW's step counts) and the export's weights file (plus its
    header)."""
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    cfg = small_cfg(tmp_path / "run", "--steps", "1", "--dtype", "bfloat16")
    run_dir = train.train(cfg, task_pool=POOL)
    disk = {k: v * memory.GB for k, v in memory.disk_gb(cfg, 1, memory.load_shape("tiny")).items()}
    params = list(train.load_model("tiny")[0].parameters())
    assert disk["checkpoint"] + 4 * len(params) == state_bytes(run_dir / "ckpt-000001")  # + a float32 step each
    size = (run_dir / "final" / "model.safetensors").stat().st_size
    assert disk["export"] == 2 * sum(p.numel() for p in params) and 0 < size - disk["export"] < 0.01 * size


def test_an_old_format_checkpoint_is_refused_with_what_to_do(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "ckpt-000005").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": "tiny"}))
    (run_dir / "ckpt-000005" / "model.safetensors").write_bytes(b"")
    (run_dir / "ckpt-000005" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(train.ConfigError, match=f"--resume: {run_dir}/ckpt-000005 is a checkpoint of the older "
                                                f"single-file format.*--model {run_dir}/ckpt-000005 --out_dir"):
        train.parse_config(["--resume", str(run_dir)])
