"""The demo pipeline at toy size (train.py's recipe): `python train.py` evaluates the untrained model, runs SFT on
expert episodes, evaluates, runs GRPO from the SFT model, evaluates, and prints the table of the three. The full
demo (configs/demo.json) takes minutes and is not a test; this runs each phase for a step or two."""
import json
import shutil

import pytest
import torch

import eval as ev
import train
from rollout import RolloutConfig

TOY = ["--sft_steps", "2", "--sft_batch_size", "4", "--sft_expert_passes", "1", "--steps", "1", "--batch_size", "2",
       "--group_size", "2", "--mini_batch_size", "2", "--eval_tasks", "1", "--rollout.max_new_tokens", "8"]


def phases(run_dir):
    return [(r["phase"], r["step"]) for r in map(json.loads, (run_dir / "evals.jsonl").read_text().splitlines())]


def test_the_demo_runs_every_phase_and_prints_the_table(tmp_path, capsys):
    train.main(["--out_dir", str(tmp_path / "run"), *TOY])
    run = tmp_path / "run"
    assert phases(run) == [("untrained", 0), ("sft", 2), ("grpo", 1)]
    first = json.loads((run / "evals.jsonl").read_text().splitlines()[0])
    assert set(first) == {"phase", "step", "avg", "per_gym"}
    assert set(first["per_gym"]) == {"intention", "persuade"}  # configs/demo.json's evaluation gyms
    assert {"score", "n", "failed", "turns", "valid_call_rate"} <= set(first["per_gym"]["intention"])
    # the SFT phase is a run of its own, trained on expert episodes it played; GRPO started from its export
    assert (run / "sft" / "final" / "config.json").is_file() and (run / "sft" / "expert-episodes.jsonl").is_file()
    assert json.loads((run / "config.json").read_text())["model"] == str(run / "sft" / "final")
    assert (run / "final" / "config.json").is_file()
    sft_steps = [json.loads(line)["step"] for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_steps == [1, 2]
    out = capsys.readouterr().out
    table = out[out.index("evals.jsonl: score"):].splitlines()
    assert table[1].split() == ["intention", "persuade", "Avg"]
    assert [line.split("(step")[0].strip() for line in table[2:5]] == ["untrained", "sft", "grpo"]
    # each phase's gain over the one before, paired over the 2 test tasks (1 per gym)
    assert table[5].startswith("sft - untrained: ") and "over 2 test tasks" in table[5]
    assert table[6].startswith("grpo - sft: ")


def test_without_sft_grpo_starts_from_the_untrained_model(tmp_path):
    train.main(["--out_dir", str(tmp_path / "run"), *TOY, "--sft_steps", "0"])
    assert phases(tmp_path / "run") == [("untrained", 0), ("grpo", 1)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny-demo"


def test_a_used_folder_is_refused_before_work(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "evals.jsonl").write_text("")
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(["--out_dir", str(tmp_path / "run"), *TOY])


def test_sft_alone_on_a_data_file_and_its_resume(tmp_path, monkeypatch):
    """`--algo sft --sft_data FILE`: eval.py's episodes.jsonl in, a run folder with RUN/final out; resumed from a
    checkpoint, it makes the same steps and evaluations as a run that was never stopped. Its AdamW has no weight
    decay unless asked (the original's SFT sets none; GRPO's 0.01 is not SFT's)."""
    decays, real_adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW",
                        lambda *a, **kw: decays.append(kw["weight_decay"]) or real_adamw(*a, **kw))
    data = tmp_path / "episodes.jsonl"
    _, recs = ev.evaluate("expert", None, ev.select_tasks(["telepathy"], "train", 4), RolloutConfig(progress=False))
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["--algo", "sft", "--sft_data", str(data), "--sft_steps", "4", "--sft_batch_size", "2", "--sft_lr", "1e-3",
            "--save_every", "2", "--keep_last", "0", "--eval_every", "2", "--eval_gyms", "telepathy", "--eval_tasks",
            "1"]
    for name in ("a", "b"):
        train.main([*args, "--out_dir", str(tmp_path / name)])
    a, b = tmp_path / "a", tmp_path / "b"
    losses = lambda run: [json.loads(line)["sft_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(losses(a)) == 4 and (a / "ckpt-000002").is_dir() and (a / "final" / "config.json").is_file()
    # b stopped after its step-2 checkpoint: the later checkpoint, the export and step 3's line never happened
    shutil.rmtree(b / "ckpt-000004")
    shutil.rmtree(b / "final")
    train.main(["--resume", str(b)])
    assert losses(b) == pytest.approx(losses(a), rel=1e-6)
    # the evaluation of step 4 is redone, not repeated: RUN/evals.jsonl loses the lines after the checkpoint
    assert phases(b) == phases(a) == [("sft", 2), ("sft", 4)]
    assert decays == [0.0] * 3
