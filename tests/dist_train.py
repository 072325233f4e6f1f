"""train.py's command line with toy gyms added, for tests/test_distributed.py and tests/test_reliability.py:
`python tests/dist_train.py --nproc 3 ...` is `python train.py --algo grpo --nproc 3 ...` where `--gyms
'{"comma": 1}' --eval_gyms comma` name the comma gym of tests/test_train.py (reward 1 when the reply holds a comma;
the random tiny model writes one often enough for GRPO to have a signal), and "usercomma" the same gym asking the
simulated user every turn (tests/test_reliability.py). When train.py launches ranks, each rank runs this file
again, so every rank has the gyms.
DIST_TRAIN_FAIL_RANK=r makes rank r exit with status 3 as it starts (a rank that dies).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import envs  # noqa: E402
import train  # noqa: E402
from test_reliability import UserCommaEnv  # noqa: E402
from test_train import CommaEnv  # noqa: E402

TASKS = {"train": [{"id": f"d{i}"} for i in range(8)], "test": [{"id": "t0"}, {"id": "t1"}]}


def add_comma_gym(gyms: dict, load_tasks):
    """Register the comma gym in `gyms` (envs.GYMS) and return a task loader that knows the toy gyms' tasks."""
    gyms["comma"] = CommaEnv

    def load(name, split="train", data_dir=None):
        return TASKS[split] if name in ("comma", "usercomma") else load_tasks(name, split, data_dir)
    return load


if __name__ == "__main__":
    if os.environ.get("RANK", "-") == os.environ.get("DIST_TRAIN_FAIL_RANK"):
        sys.exit(3)
    envs.load_tasks = add_comma_gym(envs.GYMS, envs.load_tasks)
    envs.GYMS["usercomma"] = UserCommaEnv
    train.main(["--algo", "grpo", *sys.argv[1:]], entry=__file__)
