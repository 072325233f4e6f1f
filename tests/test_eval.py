"""eval.py end to end: the expert scores full reward, --resume skips what is done, --table, failed episodes are
reported as failed, a local model and an HTTP agent go through the same table."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import envs
import eval as ev
from config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_server import OpenAIServer  # noqa: E402

QUIET = ["--rollout.progress", "false"]


def run(*argv):
    return ev.run(ev.parse_config([*argv, *QUIET]))


def records(out):
    return [json.loads(line) for line in (Path(out) / "episodes.jsonl").read_text().splitlines()]


def test_expert_scores_full_reward_in_every_gym(tmp_path):
    res = run("--agent", "expert", "--tasks", "2", "--out", str(tmp_path))
    assert set(res["per_gym"]) == set(envs.GYMS)
    for rec in records(tmp_path):
        task = next(t for t in envs.load_tasks(rec["gym"], "test") if t["id"] == rec["task_id"])
        full = envs.make_env(rec["gym"], task, eval_mode=True).max_score()
        assert rec["score"] == pytest.approx(full), (rec["gym"], rec["task_id"])
        assert rec["valid_calls"] == rec["turns"] and not rec["failed"]
    for gym, v in res["per_gym"].items():
        assert v["n"] == 2 and v["failed"] == 0 and v["valid_call_rate"] == 1.0, gym
    assert res["n"] == 2 * len(envs.GYMS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["avg"] == pytest.approx(res["avg"])


def test_avg_is_weighted_by_items():
    recs = [{"gym": "a", "task_id": i, "score": 1.0, "failed": False, "turns": 1, "valid_calls": 1} for i in range(3)]
    recs += [{"gym": "b", "task_id": 0, "score": 0.0, "failed": False, "turns": 2, "valid_calls": 1}]
    res = ev.summarize(recs)
    assert res["avg"] == pytest.approx(0.75)  # (3 x 1.0 + 1 x 0.0) / 4, not the mean of the gym means (0.5)
    assert res["per_gym"]["b"]["valid_call_rate"] == 0.5
    # Failed episodes are out of everything: the score (each item weighs the same however many passes it kept),
    # the Avg's weights, the turns and the valid-call rate
    recs = [{"gym": "a", "task_id": 1, "score": s, "failed": False, "turns": 1, "valid_calls": 1} for s in (1, 0, 1)]
    recs += [{"gym": "a", "task_id": 2, "score": 0.0, "failed": f, "turns": 0 if f else 2, "valid_calls": 0 if f else 2}
             for f in (False, True, True)]
    recs += [{"gym": "b", "task_id": i, "score": 0.0, "failed": i > 0, "turns": 1, "valid_calls": 0} for i in range(9)]
    res = ev.summarize(recs)
    a, b = res["per_gym"]["a"], res["per_gym"]["b"]
    assert a["score"] == pytest.approx((2 / 3 + 0) / 2) and a["turns"] == pytest.approx(5 / 4) and a["failed"] == 2
    assert (b["n"], b["scored"], b["failed"]) == (9, 1, 8)
    assert res["avg"] == pytest.approx((1 / 3 * 2 + 0 * 1) / 3) and res["n"] == 3



def test_gap_pairs_the_tasks_both_runs_scored():
    def results(scores):
        return ev.summarize([{"gym": g, "task_id": t, "score": s, "failed": False, "turns": 1, "valid_calls": 1}
                             for (g, t), s in scores.items()])
    old = results({("a", 0): 0.0, ("a", 1): 0.5, ("b", 0): 1.0})
    new = results({("a", 0): 0.2, ("a", 1): 0.9, ("b", 0): 1.0, ("b", 1): 1.0})  # b/1: not in old, left out
    mean, se, n = ev.gap(new, old)
    # differences 0.2, 0.4, 0.0: mean 0.2, sample sd 0.2, standard error 0.2 / sqrt(3)
    assert n == 3 and mean == pytest.approx(0.2) and se == pytest.approx(0.2 / 3 ** 0.5)
    assert ev.gap(new, results({("c", 0): 1.0})) is None
    assert ev.gap(results({("a", 0): 1.0}), results({("a", 0): 0.0})) == (1.0, None, 1)  # one task: no error

def test_passes_vary_the_expert_and_pass_at_k_takes_the_best(tmp_path):
    res = run("--agent", "expert", "--gyms", "persuade", "--tasks", "3", "--passes", "3", "--split", "train",
              "--out", str(tmp_path))
    recs = records(tmp_path)
    assert sorted((r["task_id"], r["pass"]) for r in recs) == sorted((t["id"], p) for t in
                                                                    envs.load_tasks("persuade", "train")[:3]
                                                                    for p in range(3))
    first = [r["messages"] for r in recs if r["task_id"] == recs[0]["task_id"]]
    assert len({json.dumps(m) for m in first}) > 1  # the expert's phrasing and order differ per pass
    assert res["per_gym"]["persuade"]["n"] == 3 and res["per_gym"]["persuade"]["pass_at_k"] == pytest.approx(1.0)


def test_resume_plays_only_the_missing_episodes(tmp_path, capsys):
    args = ["--agent", "expert", "--gyms", "function,telepathy", "--tasks", "2", "--out", str(tmp_path)]
    first = run(*args)
    path = tmp_path / "episodes.jsonl"
    lines = path.read_text().splitlines()
    # An interruption: the last episode's line was cut off half-way.
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with pytest.raises(ConfigError, match="--resume"):
        run(*args)
    capsys.readouterr()
    again = run(*args, "--resume", "true")
    assert "1 episodes to play (3 already in" in capsys.readouterr().out
    new = path.read_text().splitlines()
    assert new[:3] == lines[:3] and len(new) == 4  # the three kept lines untouched, the cut one played again
    assert again == first
    run(*args, "--resume", "true")
    assert "0 episodes to play (4 already in" in capsys.readouterr().out
    # Cut off during the very first write: the fragment alone is dropped, not glued to the next record.
    path.write_text(lines[0][:20])
    assert run(*args, "--resume", "true") == first
    assert [json.loads(line) for line in path.read_text().splitlines()] and len(path.read_text().splitlines()) == 4


def test_an_endpoint_that_cannot_serve_stops_before_any_episode(tmp_path):
    srv = OpenAIServer(model="fake-agent")
    srv.close()  # nothing listens on its port any more
    args = ["--agent_model", "fake-agent", "--gyms", "function", "--tasks", "1", "--agent_base_url"]
    with pytest.raises(ConfigError, match=f"--agent_base_url: cannot reach {srv.url}/models .* skips this check"):
        run(*args, srv.url, "--out", str(tmp_path / "closed"))
    with pytest.raises(ConfigError, match=f"--user.base_url: cannot reach {srv.url}/models .*--user.probe false"):
        run("--agent", "expert", "--gyms", "telepathy", "--tasks", "1", "--user.backend", "http", "--user.model",
            "fake-user", "--user.base_url", srv.url, "--out", str(tmp_path / "closed"))
    srv = OpenAIServer(model="other-model")
    args.append(srv.url)
    try:
        with pytest.raises(ConfigError, match="does not serve 'fake-agent'; it serves \\['other-model'\\]"):
            run(*args, "--out", str(tmp_path / "other"))
        assert srv.counts == {}  # no completion was asked for
        run(*args, "--agent_probe", "false", "--rollout.max_turns", "1", "--out", str(tmp_path / "unchecked"))
    finally:
        srv.close()
    assert not (tmp_path / "closed" / "episodes.jsonl").exists() and len(records(tmp_path / "unchecked")) == 1


def test_a_second_eval_on_a_folder_in_use_is_refused(tmp_path):
    """Two eval.py --resume on one --out would both play the episodes it lacks and append them: counted twice."""
    args = ["--agent", "expert", "--gyms", "function", "--tasks", "1", "--out", str(tmp_path)]
    run(*args)
    assert not (tmp_path / ev.LOCK).exists()  # released on the way out
    before = (tmp_path / "episodes.jsonl").read_text()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ev.LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"--out: {tmp_path} is in use by process {other.pid}"):
            run(*args, "--tasks", "2", "--resume", "true")
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / "episodes.jsonl").read_text() == before
    run(*args, "--tasks", "2", "--resume", "true")  # its holder gone: the lock is taken over
    assert len(records(tmp_path)) == 2 and not (tmp_path / ev.LOCK).exists()


def test_table_prints_a_row_per_run(tmp_path, capsys):
    run("--agent", "expert", "--gyms", "function,telepathy", "--tasks", "1", "--out", str(tmp_path / "expert"))
    run("--model", "tiny", "--gyms", "function,telepathy", "--tasks", "1", "--rollout.max_new_tokens", "4",
        "--out", str(tmp_path / "tiny"))
    capsys.readouterr()
    ev.main(["--table", str(tmp_path / "expert"), str(tmp_path / "tiny")])
    head, expert, tiny = capsys.readouterr().out.strip().splitlines()
    assert head.split() == ["function", "telepathy", "Avg"]
    assert expert.split() == [str(tmp_path / "expert"), "1.000", "1.000", "1.000"]
    assert tiny.split() == [str(tmp_path / "tiny"), "0.000", "0.000", "0.000"]
    with pytest.raises(SystemExit, match="results.json"):
        ev.main(["--table", str(tmp_path / "missing")])


def test_failed_episodes_are_reported_as_failed_not_scored_zero(tmp_path, capsys):
    srv = OpenAIServer(faults={"500": 1.0})
    try:
        res = run("--agent", "expert", "--gyms", "function,intention", "--tasks", "2", "--out", str(tmp_path),
                  "--user.backend", "http", "--user.base_url", srv.url, "--user.model", "fake-user",
                  "--user.max_retries", "0")
    finally:
        srv.close()
    intention, function = res["per_gym"]["intention"], res["per_gym"]["function"]
    assert intention["failed"] == 2 and intention["score"] is None  # the user failed every intention episode
    assert function["failed"] == 0 and function["score"] == 1.0  # function needs no user
    assert res["avg"] == 1.0 and res["n"] == 2  # the failed gym is left out of Avg, not counted as 0
    recs = [r for r in records(tmp_path) if r["gym"] == "intention"]
    assert all(r["failed"] and r["score"] is None and "500" in r["error"] for r in recs)
    out = capsys.readouterr().out
    assert "2 episode(s) failed" in out
    assert "(2 failed)" in ev.runs_table({"run": res})


def test_local_model_and_http_agent(tmp_path):
    res = run("--model", "tiny", "--gyms", "function", "--tasks", "2", "--rollout.max_new_tokens", "6",
              "--out", str(tmp_path / "tiny"))
    recs = records(tmp_path / "tiny")
    assert res["per_gym"]["function"]["valid_call_rate"] == 0.0  # the random model calls no tool
    assert all(r["num_tokens"] > 0 and r["end_reason"] == "no_tool_call" for r in recs)
    assert all(r["cut_turns"] == 1 for r in recs)  # 6 tokens end its one turn: SFT would leave these out
    srv = OpenAIServer(model="fake-agent", tool_reply={"choice": "search", "content": "test"})
    try:
        res = run("--agent_base_url", srv.url, "--agent_model", "fake-agent", "--gyms", "function", "--tasks", "1",
                  "--rollout.max_turns", "3", "--out", str(tmp_path / "http"))
    finally:
        srv.close()
    v = res["per_gym"]["function"]
    assert v["score"] == 0.0 and v["turns"] == 3 and v["valid_call_rate"] == 1.0
    assert srv.bodies[0]["model"] == "fake-agent" and srv.bodies[0]["tools"][0] == envs.TOOL_SCHEMA
    assert records(tmp_path / "http")[0]["cut_turns"] == 0
    # replies max_tokens ended (finish_reason "length") are counted as cut turns; the marker stays out of the
    # conversation sent back and recorded
    srv = OpenAIServer(model="fake-agent", tool_reply={"choice": "search", "content": "test"}, finish_reason="length")
    try:
        run("--agent_base_url", srv.url, "--agent_model", "fake-agent", "--gyms", "function", "--tasks", "1",
            "--rollout.max_turns", "2", "--out", str(tmp_path / "cut"))
    finally:
        srv.close()
    rec = records(tmp_path / "cut")[0]
    assert rec["cut_turns"] == rec["turns"] == 2
    assert not any("cut_by_max_tokens" in m for m in rec["messages"] + srv.bodies[-1]["messages"])


@pytest.mark.parametrize("argv, message", [
    ([], "name one agent"),
    (["--agent", "expert", "--model", "tiny"], "name one agent"),
    (["--agent", "gpt"], "only built-in agent"),
    (["--agent_base_url", "http://x/v1"], "go together"),
    (["--agent", "expert", "--gyms", "nope"], "unknown gym 'nope'"),
    (["--agent", "expert", "--split", "dev"], "--split"),
    (["--agent", "expert", "--passes", "0"], "--passes"),
    (["--agent", "expert", "--user.backend", "http"], "--user.model"),
])
def test_bad_arguments_are_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        ev.parse_config(argv)
