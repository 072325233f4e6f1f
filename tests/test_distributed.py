"""Multi-process training on CPU with torchrun (gloo): two ranks make the same update as one process,
with plain data parallel and with FSDP2 sharding (train.update, distributed.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_make_the_same_update_as_one_process(tmp_path, mode):
    run([sys.executable, "tests/dist_update.py", str(tmp_path / "one.pt")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "tests/dist_update.py", str(tmp_path / "two.pt"), *(["--fsdp"] if mode == "fsdp" else [])])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    start, _ = train.load_model("tiny", seed=0)
    moved = max(float((p - q.detach()).abs().max()) for p, q in zip(one["params"], start.parameters()))
    assert moved > 1e-4  # the update did something
    # Four AdamW updates of lr 1e-3: summation order differs between 1 and 2 ranks, so allow 1% of one step.
    diffs = [float((p - q).abs().max()) for p, q in zip(one["params"], two["params"])]
    assert max(diffs) < 1e-5, diffs
    for key in ("clip_frac", "approx_kl", "entropy", "grad_norm"):
        assert abs(one["stats"][key] - two["stats"][key]) < 1e-5 * max(1.0, abs(one["stats"][key])), key
