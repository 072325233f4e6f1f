"""Behaviours a user relies on that no single formula shows: the trainer hands every reward setting to rewards.py,
keeps failed episodes out of its means, evaluates with the evaluation settings; the rollout calls its users
concurrently and ends an episode exactly at its token budget. (The update itself: tests/test_golden.py.)"""
import threading
import time

import pytest
import torch

import envs
import grpo
import rewards
import rollout
import train
import users
from openai_server import OpenAIServer
from rollout import Episode
from test_train import CommaEnv, read_metrics, small_cfg

# ----------------------------------------------------------------------------------------------------------
# The trainer's phase 3 and its metrics


def episode(gym, turn_rewards, turn_lens, failed=False, group_prompt=3):
    """An episode with the given per-turn rewards and generated tokens per turn (1 observation token between)."""
    ids, mask, spans = [0] * group_prompt, [0] * group_prompt, []
    for n in turn_lens:
        spans.append((len(ids), len(ids) + n))
        ids, mask = ids + [1] * n + [2], mask + [1] * n + [0]
    return Episode(ids=ids, loss_mask=mask, logprobs=[0.0] * len(ids), turn_rewards=list(turn_rewards),
                   turn_spans=spans, gym=gym, failed=failed, info={"end_reason": "user_failure" if failed else "done",
                                                                  "error": "UserError: down" if failed else None})


@pytest.mark.parametrize("argv", [
    ["--score", "r2g", "--credit", "r2g", "--gamma", "0.5", "--use_std", "false"],
    ["--credit", "em", "--scheme", "additive", "--lam", "0.3"],
    ["--score", "r2g", "--credit", "naive", "--scheme", "additive", "--lam", "2.0", "--gamma", "0.9"],
])
def test_every_reward_setting_reaches_the_advantages(argv):
    """train.score_and_advantages is rewards.compute_advantages with the config's score, credit, scheme, gamma,
    use_std and lam (each case sets some away from its default, and the result differs from the default's)."""
    turn_rewards = [[0.0, 1.0], [0.5, 0.2], [1.0, 0.0], [0.0, 0.3], [0.7, 0.7], [0.1, 0.9]]
    turn_lens = [[2, 3], [1, 4], [3, 1], [2, 2], [1, 1], [4, 2]]
    eps = [episode("toy", r, n) for r, n in zip(turn_rewards, turn_lens)]
    groups = [0, 0, 0, 1, 1, 1]
    cfg = train.parse_config(argv)
    scores, advs = train.score_and_advantages(eps, groups, cfg)
    want, _ = rewards.compute_advantages(turn_rewards, turn_lens, groups, score=cfg.score, credit=cfg.credit,
                                         scheme=cfg.scheme, gamma=cfg.gamma, use_std=cfg.use_std, lam=cfg.lam)
    flat = lambda xs: [x for a in xs for x in a]  # noqa: E731
    assert flat(advs) == pytest.approx(flat(want), abs=1e-12) and [len(a) for a in advs] == [5, 5, 4, 4, 2, 6]
    assert scores == [rewards.trajectory_score(e.turn_rewards, cfg.score, cfg.gamma) for e in eps]
    default, _ = rewards.compute_advantages(turn_rewards, turn_lens, groups)
    assert flat(advs) != pytest.approx(flat(default), abs=1e-3)


def test_with_kl_an_episode_without_advantage_still_trains():
    """Skipping episodes whose advantages are all 0 is exact only without the KL term."""
    zeros = torch.zeros(5)
    assert not train.has_gradient(zeros, grpo.LossConfig())
    assert train.has_gradient(zeros, grpo.LossConfig(kl_coef=0.01))
    assert train.has_gradient(torch.tensor([0.0, -0.1]), grpo.LossConfig())


def test_failed_episodes_count_only_as_failures_in_the_metrics():
    """A failed episode's rewards, turns and tokens stay out of every mean (its 0 reward is not a score)."""
    ok = [episode("a", [1.0], [4]), episode("a", [0.5, 0.5], [2, 2]), episode("b", [1.0], [6])]
    failed = [episode("a", [0.0], [10], failed=True), episode("b", [0.0, 0.0], [9, 9], failed=True)]
    m = train.episode_metrics(ok + failed, [1.0, 0.5, 1.0], [[0.5] * 4, [-0.5] * 4, [0.0] * 6], [0, 0, 1])
    assert m["reward_mean"] == pytest.approx(1.0) and m["reward_mean/a"] == 1.0 and m["reward_mean/b"] == 1.0
    assert m["score_mean"] == pytest.approx(2.5 / 3) and m["score_mean/a"] == 0.75
    assert m["turns_mean"] == pytest.approx(4 / 3) and m["response_tokens_mean"] == pytest.approx(14 / 3)
    assert (m["failed_episodes"], m["episodes"], m["end/user_failure"], m["end/done"]) == (2, 5, 2, 3)
    assert m["frac_zero_std"] == 0.5  # group 0 has a spread, group 1 (one member) none
    # Equal scores are no spread whatever their float sum does: 7 x 0.1 has np.std 1.4e-17, not 0.
    sevens = [episode("a", [0.0] * 9 + [1.0], [1] * 10) for _ in range(7)]
    m = train.episode_metrics(sevens, [0.1] * 7, [[0.0] * 10] * 7, [0] * 7)
    assert m["frac_zero_std"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# Evaluation


class ProbeEnv(CommaEnv):
    """A one-turn gym that rewards 0.5 in its evaluation settings and 1 in its training ones, and keeps each env
    made (with what the agent wrote) in `made`."""

    name = "probe"
    made = []

    def opening(self):
        ProbeEnv.made.append(self)
        return super().opening()

    def step(self, text):
        self.text = text
        reward = 0.5 if self.eval_mode else 1.0
        self.rewards.append(reward)
        return "Thanks.", reward, True, {}


def test_evaluation_plays_greedy_in_the_gyms_evaluation_settings(tmp_path, monkeypatch):
    """--eval_every: each test task once, greedy (four identical tasks get one identical reply, though training
    samples at temperature 1.5), with the gyms' evaluation rewards, no reward shown, the rollout's turn limit."""
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)
    monkeypatch.setitem(envs.GYMS, "probe", ProbeEnv)
    monkeypatch.setattr(ProbeEnv, "made", [])
    real = envs.load_tasks
    monkeypatch.setattr(envs, "load_tasks", lambda name, split="train", data_dir=None:
                        [{"id": "same"}] * 4 if name == "probe" else real(name, split, data_dir))
    run_dir = train.train(small_cfg(tmp_path, "--steps", "1", "--save_every", "0", "--eval_every", "1",
                                    "--eval_gyms", "probe", "--eval_tasks", "0", "--rollout.temperature", "1.5",
                                    "--rollout.max_turns", "2"), task_pool={"comma": [{"id": "d0"}]})
    made = ProbeEnv.made
    assert len(made) == 4 and all(e.eval_mode and not e.show_reward and e.max_turns == 2 for e in made)
    assert len({e.text for e in made}) == 1
    m = read_metrics(run_dir)[0]
    assert m["eval/probe"] == 0.5 and m["eval/avg"] == 0.5


# ----------------------------------------------------------------------------------------------------------
# The rollout: users called concurrently, the episode budget's boundary


class AskEnv(envs.Env):
    """A one-turn gym whose step asks the (HTTP) user."""

    name = "ask"
    system_prompt = "Ask the user. You have {max_turns} turn."

    def opening(self):
        return "Ask me anything."

    def step(self, text):
        self.turn += 1
        return self.user.reply([{"role": "user", "content": text}]), 1.0, True, {}


def test_the_users_of_a_rollout_are_called_concurrently(tiny, monkeypatch):
    """8 episodes' user calls are in flight at the loopback server together: each reply waits until 4 requests are
    in flight (a rollout that stepped its envs one at a time would have 1: the replies give up after 10 s)."""
    monkeypatch.setitem(envs.GYMS, "ask", AskEnv)
    together, server = threading.Event(), {}

    def reply(body):
        deadline = server.setdefault("deadline", time.monotonic() + 10)  # one for all: a failure costs 10 s
        while not together.is_set() and time.monotonic() < deadline:
            if server["srv"].in_flight >= 4:
                together.set()
            time.sleep(0.005)
        return "Yes."

    server["srv"] = srv = OpenAIServer(reply_fn=reply)
    try:
        user = users.make_user("http", base_url=srv.url, model="fake-user", max_retries=0)
        model, tok = tiny
        eps = rollout.rollout(model, tok, [("ask", {"id": "a"})], 8, rollout.RolloutConfig(
            max_turns=1, max_new_tokens=4, end_on_no_tool_call=False, progress=False), user=user)
    finally:
        srv.close()
    assert together.is_set() and srv.max_in_flight >= 4, srv.max_in_flight
    assert [e.info["end_reason"] for e in eps] == ["done"] * 8 and srv.counts == {"ok": 8}


class ChatEnv(envs.Env):
    """Never ends by itself: every turn gets the same observation and reward 0.5."""

    name = "chat"
    system_prompt = "Chat. You have {max_turns} turns."

    def opening(self):
        return "Count with me."

    def step(self, text):
        self.turn += 1
        return "ok " * 5, 0.5, False, {}


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])  # each schedule applies the budget in its own loop
def test_the_episode_budget_ends_an_episode_exactly_at_its_boundary(tiny, monkeypatch, schedule):
    """max_episode_tokens counts every token after the prompt. Greedy, so each run makes the same tokens up to its
    cut: a turn that reaches the budget ends the episode there (no closing eos, reward 0); an observation that
    leaves no room for one more token ends it before it is appended; one token of room is one more sampled token."""
    monkeypatch.setitem(envs.GYMS, "chat", ChatEnv)
    model, tok = tiny
    cap = 6

    def play(budget):
        return rollout.rollout(model, tok, [("chat", {"id": "c"})], 1, rollout.RolloutConfig(
            max_turns=8, max_new_tokens=cap, max_episode_tokens=budget, greedy=True, end_on_no_tool_call=False,
            progress=False, schedule=schedule))[0]

    ref = play(10_000)
    p = ref.info["prompt_tokens"]
    (s1, e1), (s2, _) = ref.turn_spans[:2]
    assert sum(ref.loss_mask[s1:e1]) == cap and e1 - s1 == cap + 1  # turn 1 ran to its cap, then a closing eos
    used, obs = e1 - p, s2 - e1  # tokens after the prompt once turn 1 is closed; the observation's tokens

    for budget in (cap, cap - 1):  # the budget cuts turn 1
        ep = play(budget)
        assert len(ep.ids) - p == budget and ep.ids == ref.ids[:p + budget] and all(ep.loss_mask[p:])
        assert ep.info["end_reason"] == "budget" and ep.turn_rewards == [0.0] and ep.turn_spans == [(p, p + budget)]
    ep = play(used + obs)  # the observation would fill the budget: no room to sample after it
    assert ep.ids == ref.ids[:e1] and ep.info["end_reason"] == "budget" and ep.turn_rewards == [0.5]
    ep = play(used + obs + 1)  # room for exactly one more token
    assert ep.ids == ref.ids[:s2 + 1] and ep.loss_mask[-1] == 1 and ep.turn_spans[1] == (s2, s2 + 1)
    assert ep.info["end_reason"] == "budget" and ep.turn_rewards == [0.5, 0.0]
