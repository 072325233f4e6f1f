"""The training loop end to end: the demo, resume, a learning signal, and bad configs (train.py)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import envs
import train
import users

ROOT = Path(__file__).resolve().parent.parent


def untimed(m: dict) -> dict:
    """A metrics line without its timings (which differ between runs)."""
    return {k: v for k, v in m.items() if not k.startswith(("time_", "peak_mem_gb/"))}


class CommaEnv(envs.Env):
    """A one-turn toy gym: reward 1 when the agent's text contains a comma. A random tiny model writes one in
    about a fifth of its 12-token replies, so GRPO has signal from the first step, and a sign or masking
    error in the loss shows up as a reward that does not rise."""

    name = "comma"
    system_prompt = "Write anything. You have {max_turns} turn."

    def opening(self):
        return "Say a list."

    def step(self, text):
        reward = float("," in text)
        return f"Reward: {reward}", reward, True, {}


class FlakyCommaEnv(CommaEnv):
    """The comma gym whose user endpoint is down for tasks marked "down"."""

    def step(self, text):
        if self.task.get("down"):
            raise users.UserError("the user endpoint is down")
        return super().step(text)


def small_cfg(tmp_path, *extra):
    return train.parse_config(["--out_dir", str(tmp_path), "--batch_size", "2", "--group_size", "4",
                               "--mini_batch_size", "1", "--rollout.max_new_tokens", "12",
                               "--rollout.max_turns", "3", "--rollout.progress", "false",
                               "--rollout.end_on_no_tool_call", "false", *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_command_runs_and_logs_every_field(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--algo", "grpo", "--out_dir", str(tmp_path), "--steps", "1",
                        "--group_size", "2", "--batch_size", "4", "--mini_batch_size", "2", "--rollout_tasks", "3",
                        "--eval_every", "1", "--eval_tasks", "1", "--rollout.max_new_tokens", "8",
                        "--rollout.progress", "false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step    1" in p.stdout
    m = read_metrics(tmp_path)[0]
    for key in ("step", "reward_mean", "score_mean", "frac_zero_std", "clip_frac", "grad_norm", "entropy",
                "response_tokens_mean", "turns_mean", "failed_episodes", "time_generate", "time_user", "time_logprob",
                "time_update", "time_step"):
        assert key in m, key
    assert any(k.startswith("reward_mean/") for k in m)
    assert {"eval/intention", "eval/telepathy", "eval/search", "eval/avg"} <= set(m)
    assert "eval/avg" in p.stdout  # the per-gym eval table
    assert [json.loads(line)["phase"] for line in (tmp_path / "evals.jsonl").read_text().splitlines()] == ["grpo"]
    assert (tmp_path / "ckpt-000001" / "trainer_state.pt").is_file() and (tmp_path / "final" / "config.json").is_file()
    assert (tmp_path / "transcripts.jsonl").stat().st_size > 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["group_size"] == 2 and cfg["rollout"]["max_new_tokens"] == 8


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Stop after step 2 and resume: steps 3-4 match an uninterrupted run (metrics and weights, read from each
    run's final export: fp32, the trained weights as they are)."""
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    pool = {"comma": [{"id": f"d{i}"} for i in range(8)]}
    args = ["--lr", "1e-3", "--seed", "3"]
    full = train.train(small_cfg(tmp_path / "full", "--steps", "4", *args), task_pool=pool)
    part = train.train(small_cfg(tmp_path / "part", "--steps", "2", *args), task_pool=pool)
    # as if stopped after step 3's lines were written but before its checkpoint, mid-way through a line
    # (each file's records keep their step where that file keeps it: metrics at the top, transcripts in info)
    for name, line in (("metrics.jsonl", {"step": 3}), ("transcripts.jsonl", {"gym": "comma", "info": {"step": 3}})):
        with open(part / name, "a") as f:
            f.write(json.dumps(line) + '\n{"step": 3, "rew')
    train.train(train.parse_config(["--resume", str(part), "--steps", "4"]), task_pool=pool)
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    tasks = {}
    for run in (full, part):
        transcripts = [json.loads(line) for line in (run / "transcripts.jsonl").read_text().splitlines()]
        tasks[run] = [(t["info"]["step"], t["info"]["task_id"]) for t in transcripts]
    assert [step for step, _ in tasks[part]] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert tasks[part] == tasks[full]  # the task sampler went on where it stopped (the comma gym ignores the task)
    for x, y in zip(a, b):
        assert untimed(x) == untimed(y)
    ma, _ = train.load_model(str(full / "final"))
    mb, _ = train.load_model(str(part / "final"))
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))


def test_grpo_raises_the_reward_of_a_toy_gym(tmp_path, monkeypatch):
    """The learning test: GRPO on the comma gym lifts the tiny model's mean reward clearly."""
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    pool = {"comma": [{"id": f"d{i}"} for i in range(8)]}
    cfg = small_cfg(tmp_path, "--steps", "16", "--lr", "1e-2", "--batch_size", "4", "--group_size", "8",
                    "--mini_batch_size", "4", "--save_every", "0", "--transcripts", "0")
    rewards = [m["reward_mean"] for m in read_metrics(train.train(cfg, task_pool=pool))]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.3, rewards


@pytest.mark.parametrize("argv, needle", [
    (["--gyms", '{"nope": 1}'], "--gyms"),
    (["--score", "max"], "--score"),
    (["--loss.agg", "sum"], "--loss: agg"),
    (["--batch_size", "3", "--mini_batch_size", "2"], "--mini_batch_size"),
    (["--user.backend", "http"], "--user.model"),
    (["--data_dir", "/original"], "--gyms"),
    (["--rollout.max_turns", "0"], "--rollout"),
])
def test_bad_config_fails_before_any_model_is_loaded(argv, needle, monkeypatch, tmp_path):
    """The command itself: one `config error: --key` line, no model loaded, no run folder."""
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(["--algo", "grpo", *argv, "--out_dir", str(tmp_path / "run")])
    assert str(e.value.code).startswith(f"config error: {needle}"), e.value.code
    assert not (tmp_path / "run").exists()


def test_user_config_is_the_http_clients_own_fields_and_builds_every_backend(monkeypatch):
    """One definition of the http user's fields and defaults (they once drifted: 64 vs 32 requests in flight)."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    client = {f.name: f.default for f in dataclasses.fields(users.HTTPUser) if f.default is not dataclasses.MISSING}
    config = {f.name: f.default for f in dataclasses.fields(train.Config().user) if f.name in client}
    assert config == client and len(client) >= 9
    assert users.from_config(users.UserConfig()) is None  # the envs build the scripted user
    http = users.from_config(users.UserConfig(backend="http", model="m", base_url="http://127.0.0.1:9/v1",
                                              extra_body={"top_k": 1}, max_concurrency=3))
    assert (http.base_url, http.model, http.extra_body, http.max_concurrency) == ("http://127.0.0.1:9/v1", "m",
                                                                                  {"top_k": 1}, 3)
    hf = users.from_config(users.UserConfig(backend="hf", model="tiny", max_tokens=7))
    assert hf.max_new_tokens == 7


def test_failed_episodes_are_counted_and_left_out_of_the_update(tmp_path, monkeypatch):
    monkeypatch.setitem(envs.GYMS, "comma", FlakyCommaEnv)
    pool = {"comma": [{"id": "up"}, {"id": "down", "down": True}]}
    # 24 tokens a turn: some of step 2's 12 good episodes write a comma, so they have a spread to train on
    m = read_metrics(train.train(small_cfg(tmp_path, "--steps", "2", "--batch_size", "4", "--mini_batch_size", "2",
                                           "--save_every", "0", "--rollout.max_new_tokens", "24",
                                           "--max_failed_frac", "1"), task_pool=pool))
    assert [x["failed_episodes"] for x in m] == [16, 4]  # seed 0 draws only broken tasks first: 1 lets it go on
    assert all(x["end/user_failure"] == x["failed_episodes"] for x in m)
    assert m[1]["end/done"] == 12 and m[1]["turns_mean"] == 1 and m[1]["grad_norm"] > 0


def test_kl_to_a_reference_model_when_its_coefficient_is_positive(tmp_path, monkeypatch):
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    pool = {"comma": [{"id": f"d{i}"} for i in range(4)]}
    loads = []
    real = train.load_model
    monkeypatch.setattr(train, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    m = read_metrics(train.train(small_cfg(tmp_path, "--steps", "2", "--lr", "1e-2", "--save_every", "0",
                                           "--batch_size", "4", "--group_size", "8", "--mini_batch_size", "4",
                                           "--loss.kl_coef", "0.1"), task_pool=pool))
    assert loads == ["tiny", "tiny"]  # the policy and, only because kl_coef > 0, the reference
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0  # one update per step: identical in step 1, apart in step 2
    loads.clear()
    train.train(small_cfg(tmp_path / "nokl", "--steps", "1", "--save_every", "0"), task_pool=pool)
    assert loads == ["tiny"]


def test_episodes_without_gradient_are_skipped_without_changing_the_update(monkeypatch):
    """A zero-spread group (all advantages 0, no KL) is not run through the model, yet the update is the one
    computed with it: it still counts in the token-mean's denominator."""
    from dist_update import fixed_episode

    cfg = train.parse_config(["--batch_size", "2", "--group_size", "2", "--mini_batch_size", "2",
                              "--micro_batch_size", "1", "--lr", "1e-3"])
    results, calls = [], []
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(train, "has_gradient", lambda adv, loss_cfg: True)
        model, tok = train.load_model("tiny", seed=0)
        real_hidden = train.hidden_states
        monkeypatch.setattr(train, "hidden_states", lambda *a: calls.append(skip) or real_hidden(*a))
        eps = [fixed_episode(t, m, len(tok)) for t in range(2) for m in range(2)]
        advs = [torch.zeros(sum(e.loss_mask)) for e in eps[:2]] + [torch.full((sum(e.loss_mask),), s)
                                                                   for e, s in zip(eps[2:], (1.0, -1.0))]
        batch = train.Batch(eps, [0, 0, 1, 1], advs, tok.pad_token_id)
        batch.old_logprobs, _ = train.recompute_logprobs(model, batch, cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        stats = train.update(model, optimizer, batch, cfg)
        results.append(([p.detach().clone() for p in model.parameters()], stats))
        monkeypatch.setattr(train, "hidden_states", real_hidden)
    assert calls.count(True) == 4 + 2 and calls.count(False) == 4 + 4  # 4 old-log-prob forwards, then 2 vs 4
    (skipped, s1), (full, s2) = results
    assert max(float((p - q).abs().max()) for p, q in zip(skipped, full)) < 1e-6
    assert abs(s1["grad_norm"] - s2["grad_norm"]) < 1e-5 * s2["grad_norm"]


def test_a_mini_batch_with_no_episode_takes_no_optimizer_step():
    """Every episode of the step failed (--max_failed_frac 1 lets it through): nothing to train on, so the weights
    stay as they are; AdamW's momentum from an earlier update would otherwise move them."""
    from dist_update import fixed_episode

    cfg = train.parse_config(["--batch_size", "2", "--group_size", "2", "--mini_batch_size", "2", "--lr", "1e-3"])
    model, tok = train.load_model("tiny", seed=0)
    eps = [fixed_episode(t, m, len(tok)) for t in range(2) for m in range(2)]
    batch = train.Batch(eps, [0, 0, 1, 1], [torch.full((sum(e.loss_mask),), s) for e, s in zip(eps, (1., -1.) * 2)],
                        tok.pad_token_id)
    batch.old_logprobs, _ = train.recompute_logprobs(model, batch, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train.update(model, optimizer, batch, cfg)  # momentum now
    before = [p.detach().clone() for p in model.parameters()]
    stats = train.update(model, optimizer, train.Batch([], [], [], tok.pad_token_id), cfg)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert stats["grad_norm"] == 0.0 and stats["loss"] == 0.0


def test_each_episode_is_scored_once_per_step(tmp_path, monkeypatch):
    import rewards

    calls = []
    real = rewards.SCORES["sum"]
    monkeypatch.setitem(rewards.SCORES, "sum", lambda r, gamma: calls.append(1) or real(r, gamma))
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    train.train(small_cfg(tmp_path, "--steps", "1", "--save_every", "0"), task_pool={"comma": [{"id": "a"}]})
    assert len(calls) == 2 * 4  # batch 2 x group 4


def test_the_naive_loss_runs_with_fused_false_and_makes_the_same_update(tmp_path, monkeypatch):
    """--loss.fused false trains with grpo.naive_grpo_loss (and never the fused one), to the same parameters."""
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    pool = {"comma": [{"id": f"d{i}"} for i in range(4)]}
    used = []
    for name in ("grpo_loss", "naive_grpo_loss"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    params, norms = {}, {}
    for fused in ("true", "false"):
        used.clear()
        run_dir = train.train(small_cfg(tmp_path / fused, "--steps", "1", "--lr", "1e-2", "--loss.fused", fused,
                                        "--batch_size", "4", "--group_size", "8", "--mini_batch_size", "4"),
                              task_pool=pool)
        assert set(used) == {"grpo_loss" if fused == "true" else "naive_grpo_loss"}
        params[fused] = [p.detach() for p in train.load_model(str(run_dir / "final"))[0].parameters()]
        norms[fused] = read_metrics(run_dir)[0]["grad_norm"]
    assert abs(norms["true"] - norms["false"]) < 1e-5 * norms["true"] and norms["true"] > 0
    # Adam's first step moves each parameter by about lr, and by lr * g / (|g| + 1e-8) where the gradient nearly
    # cancels: there the rounding of g shifts it by up to ~1% of lr (1.0e-4 and 1.1e-4 with seeds 0 and 1)
    assert max(float((p - q).abs().max()) for p, q in zip(params["true"], params["false"])) < 2e-2 * 1e-2


def test_the_sampling_temperature_reaches_the_old_logprobs_and_the_loss(tmp_path, monkeypatch):
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    seen = []
    real_lp, real_loss = train.token_logprobs, train.grpo_loss
    monkeypatch.setattr(train, "token_logprobs",
                        lambda *a, **k: seen.append(("old", k["temperature"])) or real_lp(*a, **k))
    monkeypatch.setattr(train, "grpo_loss",
                        lambda *a, **k: seen.append(("loss", a[6].temperature)) or real_loss(*a, **k))
    train.train(small_cfg(tmp_path, "--steps", "1", "--save_every", "0", "--rollout.temperature", "0.6",
                          "--batch_size", "4", "--group_size", "8", "--mini_batch_size", "4"),
                task_pool={"comma": [{"id": f"d{i}"} for i in range(4)]})
    assert {kind for kind, _ in seen} == {"old", "loss"} and {temp for _, temp in seen} == {0.6}


def test_hidden_states_are_the_final_norms_output_and_carry_gradients():
    """models.hidden_states (train.py and sft.py call it) catches the decoder's final norm with a hook (so the
    forward does not keep every layer's output): it must equal the model's own last hidden state, padded rows
    included, and backprop."""
    from models import hidden_states, load_model
    model, _ = load_model("tiny", seed=0)
    ids = torch.randint(0, 200, (2, 24))
    attn = torch.ones_like(ids)
    attn[1, 15:] = 0
    h = hidden_states(model, ids, attn, bf16=False)
    ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False).hidden_states[-1]
    assert torch.equal(h, ref)
    h.sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert not model.get_decoder().norm._forward_hooks  # the hook is removed again


def test_peak_memory_per_phase_on_cuda(monkeypatch):
    """On CUDA each phase logs its own peak (the counter is reset when the phase starts); on CPU nothing."""
    peak = {"now": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["now"])
    m = {}
    for name, used in (("rollout", 3 * 2 ** 30), ("logprob", 2 ** 29)):
        with train.phase(m, name, torch.device("cuda", 0)):
            peak["now"] = max(peak["now"], used)
    assert (m["peak_mem_gb/rollout"], m["peak_mem_gb/logprob"]) == (3.0, 0.5) and m["time_rollout"] >= 0
    with train.phase(m := {}, "update", torch.device("cpu")):
        pass
    assert list(m) == ["time_update"]
