"""The command line: defaults, --config files, --key value overrides, and errors that name the key."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import eval as evaluation
import train

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_and_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"_comment": "a recipe", "lr": 2e-6, "steps": 7}))
    cfg = train.parse_config(["--config", str(f), "--steps=9", "--seed", "4"])
    assert (cfg.lr, cfg.steps, cfg.seed) == (2e-6, 9, 4)  # the command line wins over the file


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "abc"], "--lr"),
    (["--no_such_key", "1"], "--no_such_key"),
    (["--steps", "2.5"], "--steps"),
    (["--dtype", "float8"], "--dtype"),
    (["--steps"], "--steps"),
    (["steps", "3"], "steps"),
])
def test_bad_config_names_the_key(argv, needle):
    with pytest.raises(train.ConfigError, match=needle):
        train.parse_config(argv)


def test_bad_config_file_value_names_the_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(train.ConfigError, match="--lr"):
        train.parse_config(["--config", str(f)])


@pytest.mark.parametrize("argv, needle", [(["--lr", "abc"], "--lr"), (["--no_such_key", "1"], "--no_such_key")])
def test_cli_fails_with_one_line(argv, needle, tmp_path):
    p = subprocess.run([sys.executable, "train.py", *argv, "--out_dir", str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()  # nothing is created for a bad config


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.json")))
def test_every_shipped_recipe_parses(name):
    cfg = train.parse_config(["--config", str(ROOT / "configs" / f"{name}.json")])
    assert cfg.model and cfg.group_size >= 1


def test_a_credit_of_another_signature_is_refused_before_any_work(monkeypatch):
    # rewards.py passes every credit function (turn_rewards, gamma, turn_info); one that takes two arguments would
    # fail only after the first rollout of a run
    monkeypatch.setitem(train.rewards.CREDITS, "last", lambda turn_rewards, gamma: [0.0] * len(turn_rewards))
    with pytest.raises(train.ConfigError, match=r"--credit: .*turn_info"):
        train.parse_config(["--credit", "last"])
    monkeypatch.setitem(train.rewards.CREDITS, "last", lambda turn_rewards, gamma, turn_info=None: [1.0])
    assert train.parse_config(["--credit", "last"]).credit == "last"


def dotted_keys(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        yield from dotted_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]


@pytest.mark.parametrize("script, cfg", [("train.py", train.Config()), ("eval.py", evaluation.EvalConfig())])
def test_help_lists_every_key_with_its_default_and_description(script, cfg, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert not list(tmp_path.iterdir())  # --help runs nothing: no run folder
    lines = p.stdout.splitlines()
    entries = [(i, line.split()) for i, line in enumerate(lines) if line.startswith("  --")]
    fixed = train.FIXED_KEYS if script == "train.py" else {}  # derived keys cannot be set: not listed
    assert [words[0] for _, words in entries] == [f"--{k}" for k in dotted_keys(cfg) if k not in fixed]
    for i, words in entries:  # its default, then a description under it
        assert words[1] == "(default" and lines[i + 1].startswith("      ") and lines[i + 1].strip(), lines[i:i + 2]


def test_a_runs_own_config_json_is_a_recipe(tmp_path):
    # config.json holds the derived loss.temperature too: a file may carry it (it is derived again), the command
    # line may not; "_comment" keys document a recipe at any depth
    cfg = train.parse_config(["--rollout.temperature", "0.7", "--lr", "3e-6"])
    path = tmp_path / "config.json"
    saved = dataclasses.asdict(cfg)
    saved["rollout"]["_comment"] = "sampling"
    path.write_text(json.dumps(saved))
    assert train.parse_config(["--config", str(path)]) == cfg
    with pytest.raises(train.ConfigError, match="not a key of its own"):
        train.parse_config(["--loss.temperature", "0.7"])
    # a file's numbers and booleans are JSON's own; the command line takes plain ASCII numbers only
    for bad in ({"lr": "1e-5"}, {"rollout": {"greedy": "yes"}}):
        path.write_text(json.dumps(bad))
        with pytest.raises(train.ConfigError, match="expected"):
            train.parse_config(["--config", str(path)])
    for value in ("1_0", "\u0663"):
        with pytest.raises(train.ConfigError, match="expected a number"):
            train.parse_config(["--steps", value])


def test_help_in_process_changes_nothing(capsys):
    before = signal.getsignal(signal.SIGTERM)
    train.main(["--help"])
    assert "--rollout.schedule" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # main's SIGTERM handler is restored only on its run path
