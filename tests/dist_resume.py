"""Exact resume on two ranks (tests/test_checkpoints.py): an uninterrupted 4-step run and a run stopped after
step 2 then resumed to step 4, on the comma toy gym, with plain data parallel and with FSDP2, in one torchrun
launch (a launch costs more than the runs).

    torchrun --nproc_per_node 2 tests/dist_resume.py OUT_DIR
OUT_DIR/<ddp|fsdp>/full and OUT_DIR/<ddp|fsdp>/part are the run folders.
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import distributed  # noqa: E402
import envs  # noqa: E402
import train  # noqa: E402
from test_train import CommaEnv, small_cfg  # noqa: E402

POOL = {"comma": [{"id": f"d{i}"} for i in range(8)]}


def main(out: Path):
    envs.GYMS["comma"] = CommaEnv
    for mode in ("ddp", "fsdp"):
        args = ["--lr", "1e-3", "--seed", "3", "--mini_batch_size", "2", "--fsdp", str(mode == "fsdp")]
        train.train(small_cfg(out / mode / "full", "--steps", "4", *args), task_pool=POOL)
        train.train(small_cfg(out / mode / "part", "--steps", "2", *args), task_pool=POOL)
        train.train(train.parse_config(["--resume", str(out / mode / "part"), "--steps", "4"]), task_pool=POOL)
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
