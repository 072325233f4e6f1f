"""The run folder is never damaged (checkpoints.py, train.py): config.json only when a run starts, a used folder
refused unless resumed, a lock against a second process, resume overrides recorded, a step's lines on disk
before its checkpoint, and Ctrl-C as one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoints
import envs
import train
from test_train import CommaEnv, read_metrics, small_cfg

ROOT = Path(__file__).resolve().parent.parent
POOL = {"comma": [{"id": f"d{i}"} for i in range(4)]}


@pytest.fixture(autouse=True)
def comma_gym(monkeypatch):
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)


def run(tmp_path, *extra):
    return train.train(small_cfg(tmp_path, "--steps", "1", *extra), task_pool=POOL)


def test_a_folder_that_holds_a_run_is_refused_and_left_as_it_was(tmp_path):
    run_dir = run(tmp_path / "run", "--lr", "1e-3")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(train.ConfigError, match="--out_dir: .* already holds a run; continue it with --resume"):
        run(run_dir, "--lr", "5e-3")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-3


@pytest.mark.parametrize("left", ["metrics.jsonl", "ckpt-000001"])
def test_a_folder_with_only_metrics_or_a_checkpoint_holds_a_run(tmp_path, left):
    """What a run leaves before its config.json is written again (a crash, a copy) still marks the folder as used."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if left.startswith("ckpt"):
        (run_dir / left).mkdir()
    else:
        (run_dir / left).write_text('{"step": 1}\n')
    with pytest.raises(train.ConfigError, match="already holds a run"):
        checkpoints.open_run(run_dir, resume=False)
    assert checkpoints.open_run(run_dir, resume=True) == "" and (run_dir / checkpoints.LOCK).exists()


def test_resume_clears_what_a_save_an_export_or_a_deletion_cut_short_left(tmp_path):
    run_dir = tmp_path / "run"
    for name in (".tmp-ckpt-000003", ".tmp-delete-ckpt-000001", ".tmp-export-000002"):
        (run_dir / name).mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    checkpoints.open_run(run_dir, resume=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", checkpoints.LOCK]


def test_config_json_is_written_only_once_the_model_has_loaded(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "load_model", broken)
    with pytest.raises(RuntimeError):
        run(tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    assert not (tmp_path / "run" / checkpoints.LOCK).exists()  # released on the way out
    monkeypatch.undo()
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    run(tmp_path / "run")  # the folder is not a run yet: a new run may use it


def test_a_live_lock_keeps_a_second_process_out_and_a_stale_one_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / checkpoints.LOCK).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        with pytest.raises(train.ConfigError, match=f"--out_dir: .* is in use by process {other.pid}"):
            run(run_dir)
        assert not (run_dir / "config.json").exists()
    finally:
        other.kill()
        other.wait()
    run(run_dir)  # the holder is dead: its lock is stale
    assert f"took over the lock of {run_dir} from process {other.pid}" in capsys.readouterr().out
    assert not (run_dir / checkpoints.LOCK).exists()


def test_resume_records_what_the_overrides_change_and_keeps_the_checkpoints_model(tmp_path, capsys, monkeypatch):
    run_dir = run(tmp_path / "run", "--lr", "1e-3", "--save_every", "1")
    seen, real = [], train.update
    monkeypatch.setattr(train, "update", lambda model, opt, *a: seen.append(
        (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"])) or real(model, opt, *a))
    train.train(train.parse_config(["--resume", str(run_dir), "--steps", "2", "--lr", "2e-3", "--weight_decay", "0.3"]),
                task_pool=POOL)
    assert seen == [(2e-3, 0.3)]  # the overrides, not the values saved with the optimizer state
    log = [json.loads(line) for line in (run_dir / "resume-log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["changes"] == {"lr": [1e-3, 2e-3], "steps": [1, 2],
                                                         "weight_decay": [0.01, 0.3]}
    assert "lr 0.001 -> 0.002" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 2e-3  # the next --resume continues from here
    with pytest.raises(train.ConfigError, match=f"--model: a resumed run .* pass --model {run_dir}/final"):
        train.parse_config(["--resume", str(run_dir), "--model", "Qwen/Qwen3-4B"])
    with pytest.raises(train.ConfigError, match="--out_dir: a resumed run stays in its folder"):
        train.parse_config(["--resume", str(run_dir), "--out_dir", str(tmp_path / "elsewhere")])


def test_resume_drops_the_log_lines_after_the_checkpoint_of_its_own_phase_only(tmp_path):
    """A recipe's run folder: evals.jsonl holds the untrained and SFT rows of earlier phases, then GRPO's. Resuming
    the GRPO run at step 10 drops GRPO's later evaluation and metrics (they are redone), keeps the other phases'
    rows whatever their step, and drops a line a crash tore."""
    rows = [{"phase": "untrained", "step": 0}, {"phase": "sft", "step": 300}, {"phase": "grpo", "step": 10},
            {"phase": "grpo", "step": 20}]
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": n}) + "\n" for n in (5, 10, 15)) + '{"st')
    checkpoints.truncate_logs(tmp_path, 10, "grpo")
    assert [json.loads(ln) for ln in (tmp_path / "evals.jsonl").read_text().splitlines()] == rows[:3]
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_a_steps_metrics_and_transcripts_are_on_disk_before_its_checkpoint(tmp_path, monkeypatch):
    seen = []
    real = checkpoints.save_checkpoint

    def save(run_dir, step, *args):
        transcripts = [json.loads(x) for x in (run_dir / "transcripts.jsonl").read_text().splitlines()]
        seen.append((step, read_metrics(run_dir)[-1]["step"], transcripts[-1]["info"]["step"]))
        return real(run_dir, step, *args)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    run(tmp_path / "run", "--steps", "2")
    assert seen == [(1, 1, 1), (2, 2, 2)]


def test_a_run_without_a_checkpoint_yet_is_resumed_from_the_start(tmp_path):
    run_dir = run(tmp_path / "run", "--save_every", "0")
    train.train(train.parse_config(["--resume", str(run_dir), "--steps", "2"]), task_pool=POOL)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def test_ctrl_c_prints_one_line_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--algo", "grpo", "--out_dir", str(run_dir), "--batch_size", "2",
           "--group_size", "2", "--rollout.max_new_tokens", "8", "--rollout.progress", "false", "--eval_gyms", "",
           "--gyms", '{"telepathy": 1}']
    p = subprocess.Popen([*cmd, "--steps", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (run_dir / "ckpt-000002").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGINT during step") and f"python train.py --resume {run_dir}" in last, \
        err[-2000:]
    done = int(checkpoints.latest_checkpoint(run_dir).name.split("-")[1])
    q = subprocess.run([*cmd[:4], "--resume", str(run_dir), "--steps", str(done + 1)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert q.returncode == 0, q.stderr[-2000:]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, done + 2))
