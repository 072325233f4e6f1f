"""rollout.py: cache-kept multi-turn generation equals one plain forward (both schedules, three model families),
masks, template ids, the engine's scheduling (rejoining rows, admissions, failures, budget cuts, timeouts), counts,
per-turn env info, order, the HTTP agent and transcripts."""
import copy
import gc
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers

import engine
import envs
import models
import rollout
import users


class ToyEnv(envs.Env):
    """A gym of test tasks: the opening is the task's question, each turn's observation grows with the turn and
    with `k`, rewards are 0.5 x turn, done after `turns` turns; `fail_at` makes the user fail at that turn
    (0: on reset); `delay` seconds each step takes (a slow user); `block` the Events the step at turn `block_at`
    waits for (a stuck user, or one that answers only once other episodes got somewhere: orderings are tested
    by events, not by timing); `signal` an Event set when the step at turn `signal_at` starts; `end_reason` the
    info the last step ends with. Each step's info is {"turn": t}.
    Every text the agent sends is kept in `seen`, and when each step started and ended in `times` and `ends`."""

    name = "toy"
    system_prompt = "Help the user. You have {max_turns} turns."

    def opening(self):
        self.seen, self.times, self.ends = [], [], []
        if self.task.get("fail_at") == 0:
            raise users.UserError("the user endpoint is down")
        return self.task["question"]

    def step(self, text):
        self.turn += 1
        self.seen.append(text)
        self.times.append(time.perf_counter())
        if self.task.get("signal_at") == self.turn:
            self.task["signal"].set()
        try:
            time.sleep(self.task.get("delay", 0.0))
            if self.task.get("block_at") == self.turn:
                for event in self.task["block"]:
                    event.wait(timeout=60)  # a schedule that waits for this step fails the test, not hangs
            if self.task.get("fail_at") == self.turn:
                raise users.UserError("the user endpoint is down")
        finally:
            self.ends.append(time.perf_counter())
        obs = f"Observation {self.turn}: " + "ok " * (self.turn * self.task["k"])
        if self.show_reward:
            obs += f"\nReward: {0.5 * self.turn}"
        done = self.turn >= self.task["turns"]
        info = {"turn": self.turn, **({"end_reason": self.task["end_reason"]} if done and "end_reason" in self.task
                                      else {})}
        return obs, 0.5 * self.turn, done, info


class Biased(torch.nn.Module):
    """The tiny model with fixed logit biases ({token id: bonus}), e.g. on the end-of-turn token so that random
    turns end at varied lengths. With `period`, the biases apply only at positions p with (p + 1) % period == 0;
    `at` ({position: {token id: bonus}}) adds biases for the token sampled at one position only."""

    def __init__(self, model, bias: dict, period: int = 0, at: dict | None = None):
        super().__init__()
        self.model, self.bias, self.period, self.at = model, bias, period, at or {}
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if position_ids is None:  # a plain forward from position 0
            position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        kept = position_ids[:, position_ids.shape[1] - out.logits.shape[1]:]  # positions whose logits exist
        on = ((kept + 1) % self.period == 0).float() if self.period else 1.0
        for token, bonus in self.bias.items():
            out.logits[..., token] += bonus * on
        for position, biases in self.at.items():  # the logits at position p sample the token at p + 1
            for token, bonus in biases.items():
                out.logits[..., token] += bonus * (kept + 1 == position).float()
        return out


def task(j, **kw):
    # Questions of different lengths give prompts of different lengths; k and turns vary the rest.
    return {"id": f"toy-{j}", "question": "Please help " * (1 + 3 * j), "k": 1 + j, "turns": 1 + j % 3, **kw}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(envs.GYMS, "toy", ToyEnv)
    made = []
    real = envs.make_env

    def make_env(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(envs, "make_env", make_env)
    return made


def cfg(**kw):
    base = dict(max_turns=4, max_new_tokens=24, end_on_no_tool_call=False, progress=False)
    return rollout.RolloutConfig(**{**base, **kw})


def full_forward_logprobs(model, ids, temperature):
    """Log-prob of every token given its prefix from ONE plain forward (no cache, no mask, default positions)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    lp = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return torch.cat([torch.zeros(1), lp])


# ----------------------------------------------------------------------------------------------------------


def assert_logprobs_exact(policy, eps, temperature=1.0):
    """Stored log-probs equal one full forward over the final ids (fp32, 1e-4), on exactly the sampled tokens."""
    for ep in eps:
        ref = full_forward_logprobs(policy, ep.ids, temperature)
        mask = torch.tensor(ep.loss_mask, dtype=torch.bool)
        got = torch.tensor(ep.logprobs)
        assert torch.allclose(got[mask], ref[mask], atol=1e-4, rtol=0), (got[mask] - ref[mask]).abs().max()
        assert (got[~mask] == 0).all()


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_cached_multiturn_logprobs_equal_one_full_forward(tiny, toy, temperature, top_p, schedule):
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0 * temperature})  # about 1 in 20 tokens ends the turn
    tasks = [("toy", task(j)) for j in range(4)]
    torch.manual_seed(0)
    stats = {}
    eps = rollout.rollout(policy, tok, tasks, 3, cfg(temperature=temperature, top_p=top_p, schedule=schedule),
                          stats=stats)
    # The batch really was ragged: prompts, turn counts and turn lengths all differ between rows.
    assert len({ep.info["prompt_tokens"] for ep in eps}) == 4
    assert {ep.info["turns"] for ep in eps} == {1, 2, 3}
    lengths = [e - s for ep in eps for s, e in ep.turn_spans]
    assert len(set(lengths)) > 3 and max(lengths) == 25  # some turns hit the 24-token cap (+ the closing eos)
    assert_logprobs_exact(policy, eps, temperature)
    assert sum(sum(ep.loss_mask) for ep in eps) == stats["tokens_generated"]


def test_loss_mask_is_exactly_the_sampled_tokens_under_greedy(tiny, toy):
    # Greedy makes the sampled tokens knowable without the rollout: each is the argmax of a plain forward
    # over the ids before it. The mask must be 1 there, and 0 on everything else (prompt, observations, the
    # closing eos of a capped turn), and pad/eos never decide it.
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 100.0}, period=17)
    eps = rollout.rollout(policy, tok, [("toy", task(j)) for j in range(6)], 1, cfg(greedy=True, max_new_tokens=8))
    ended = {"eos": 0, "cap": 0}
    for ep in eps:
        x = torch.tensor([ep.ids])
        with torch.no_grad():
            argmax = policy(input_ids=x).logits[0].argmax(-1)
        expected = [0] * len(ep.ids)
        for start, end in ep.turn_spans:
            assert ep.ids[end - 1] == tok.eos_token_id
            capped = end - start == 9  # 8 sampled tokens and no eos among them: one closing eos, not sampled
            for t in range(start, end - 1 if capped else end):
                assert ep.ids[t] == int(argmax[t - 1])  # the model's own greedy token
                expected[t] = 1
            ended["cap" if capped else "eos"] += 1
        assert ep.loss_mask == expected
        assert len(ep.ids) == len(ep.loss_mask) == len(ep.logprobs)
    assert ended["cap"] > 0 and ended["eos"] > 0


def test_pad_equal_to_eos_changes_nothing(tiny, toy):
    # Masks come from the rollout's bookkeeping, never from ids: a tokenizer whose pad IS eos (as many are)
    # gives the same episodes, with loss on the generated end-of-turn tokens.
    model, tok = tiny
    tok_pad_eos = copy.deepcopy(tok)
    tok_pad_eos.pad_token = tok_pad_eos.eos_token
    assert tok_pad_eos.pad_token_id == tok.eos_token_id
    policy = Biased(model, {tok.eos_token_id: 4.0})
    runs = []
    for t in (tok, tok_pad_eos):
        torch.manual_seed(1)
        runs.append(rollout.rollout(policy, t, [("toy", task(j)) for j in range(3)], 2, cfg()))
    for a, b in zip(*runs):
        assert a.ids == b.ids and a.loss_mask == b.loss_mask
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    eos_trained = [m for ep in runs[1] for i, m in zip(ep.ids, ep.loss_mask) if i == tok.eos_token_id]
    assert 1 in eos_trained


def test_ids_equal_the_chat_template_rendering(tiny, toy):
    model, tok = tiny
    torch.manual_seed(2)
    eps = rollout.rollout(Biased(model, {tok.eos_token_id: 4.0}), tok, [("toy", task(j)) for j in range(3)], 2, cfg())
    for ep in eps:
        assert ep.messages[0]["role"] == "system" and ep.messages[1]["role"] == "user"
        msgs = ep.messages[:-1] if ep.messages[-1]["role"] == "tool" else ep.messages  # ids stop at the last turn
        text = tok.apply_chat_template(msgs, tools=[envs.TOOL_SCHEMA], tokenize=False)
        assert text.endswith("<|im_end|>\n")
        text = text[:-1]  # the template's newline after the last end-of-turn token is not generated
        assert tok.decode(ep.ids, skip_special_tokens=False) == text
        # Token by token: every token the policy did not sample is the template's own tokenisation of its
        # text; the sampled ones sit exactly where the template puts the assistant's content.
        prompt = tok.apply_chat_template(msgs[:2], tools=[envs.TOOL_SCHEMA], add_generation_prompt=True, tokenize=False)
        expected, cursor = tok.encode(prompt, add_special_tokens=False), len(prompt)
        assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
        for k, ((start, end), content) in enumerate(zip(ep.turn_spans, assistants)):
            assert text.startswith(content, cursor)
            cursor += len(content)
            gen = [i for i, m in zip(ep.ids[start:end], ep.loss_mask[start:end]) if m]
            expected += gen[:-1] if gen and gen[-1] == tok.eos_token_id else gen
            header = "<|im_start|>assistant\n"
            nxt = text.index(header, cursor) + len(header) if k + 1 < len(assistants) else len(text)
            expected += tok.encode(text[cursor:nxt], add_special_tokens=False)
            cursor = nxt
        assert ep.ids == expected


def test_observation_wrapper_is_the_qwen_tool_turn(tiny):
    _, tok = tiny
    assert rollout.observation_wrapper(tok) == ("\n<|im_start|>user\n<tool_response>\n",
                                                "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
def test_a_failing_user_fails_only_its_episodes(tiny, toy, schedule):
    model, tok = tiny
    tasks = [("toy", task(0)), ("toy", task(1, fail_at=0)), ("toy", task(2, fail_at=2)), ("toy", task(5))]
    eps = rollout.rollout(Biased(model, {tok.eos_token_id: 4.0}), tok, tasks, 2, cfg(schedule=schedule))
    reasons = [ep.info["end_reason"] for ep in eps]
    assert reasons == ["done", "done", "user_failure", "user_failure", "user_failure", "user_failure", "done", "done"]
    assert [ep.failed for ep in eps] == [r == "user_failure" for r in reasons]
    assert [ep.info["turns"] for ep in eps] == [1, 1, 0, 0, 2, 2, 3, 3]
    assert eps[2].ids == [] and "down" in eps[2].info["error"]
    assert eps[4].turn_rewards == [0.5, 0.0] and len(eps[4].turn_spans) == 2
    assert eps[4].turn_info == [{"turn": 1}, {}]  # the failed step gave no info
    assert eps[6].turn_rewards == [0.5, 1.0, 1.5]


def test_episodes_come_back_grouped_in_task_order_sharing_their_prompt(tiny, toy):
    model, tok = tiny
    order = [3, 0, 2, 1]
    eps = rollout.rollout(model, tok, [("toy", task(j)) for j in order], 3, cfg(max_turns=1))
    assert [ep.info["task_id"] for ep in eps] == [f"toy-{j}" for j in order for _ in range(3)]
    assert all(ep.gym == "toy" for ep in eps)
    prompts = [tuple(ep.ids[:ep.info["prompt_tokens"]]) for ep in eps]
    assert all(len(set(prompts[g * 3:g * 3 + 3])) == 1 for g in range(4)) and len(set(prompts)) == 4


def test_no_tool_call_ends_the_episode_or_goes_to_the_env(tiny, toy):
    model, tok = tiny
    model = Biased(model, {tok.convert_tokens_to_ids("<tool_call>"): -100.0})  # random text, never a tool call
    eps = rollout.rollout(model, tok, [("toy", task(2))], 2, cfg(end_on_no_tool_call=True, max_new_tokens=8))
    assert [ep.info["end_reason"] for ep in eps] == ["no_tool_call"] * 2
    assert all(ep.turn_rewards == [0.0] and ep.info["turns"] == 1 for ep in eps)
    assert all(env.seen == [] for env in toy)  # the env never saw the turn
    toy.clear()
    eps = rollout.rollout(model, tok, [("toy", task(2))], 2, cfg(end_on_no_tool_call=False, max_new_tokens=8))
    assert [ep.info["end_reason"] for ep in eps] == ["done"] * 2
    assert [len(env.seen) for env in toy] == [3, 3]
    assert toy[0].seen[0] == eps[0].messages[2]["content"]  # the env got the decoded turn


def test_each_episode_records_its_envs_episode_score(tiny, toy, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(ToyEnv, "episode_score", lambda env: 10.0 + len(env.seen))  # a gym's own metric
    eps = rollout.rollout(model, tok, [("toy", task(1)), ("toy", task(2))], 2, cfg(end_on_no_tool_call=False,
                                                                                   max_new_tokens=4))
    assert [ep.info["score"] for ep in eps] == [10.0 + len(env.seen) for env in toy]
    assert [ep.info["score"] for ep in eps] == [12.0, 12.0, 13.0, 13.0]


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
def test_budget_and_max_turns_end_episodes(tiny, toy, schedule):
    model, tok = tiny
    eps = rollout.rollout(model, tok, [("toy", task(2, turns=99))], 2, cfg(max_new_tokens=10, max_episode_tokens=60,
                                                                           schedule=schedule))
    for ep in eps:
        assert ep.info["end_reason"] == "budget"
        assert len(ep.ids) - ep.info["prompt_tokens"] <= 60
    eps = rollout.rollout(model, tok, [("toy", task(2, turns=99))], 1, cfg(max_new_tokens=4, max_turns=3,
                                                                           schedule=schedule))
    assert eps[0].info["end_reason"] == "max_turns" and eps[0].info["turns"] == 3 and len(eps[0].turn_rewards) == 3
    # a turn max_new_tokens ended is closed with an unsampled end-of-turn token, and counted (SFT drops such episodes)
    closed = [ep.loss_mask[b - 1] == 0 for ep in eps for a, b in ep.turn_spans]
    assert eps[0].info["cut_turns"] == sum(closed) > 0


# ----------------------------------------------------------------------------------------------------------
# The engine's scheduling: rows leave and rejoin, episodes take freed rows, failures and cuts stay local


def test_engine_turns_do_not_wait_for_each_other(tiny, toy):
    # Observations differ in length (k) and one user is slow: the other rows go to their users, come back and
    # decode their next turns while it answers; log-probs still equal one full forward in every row.
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    second = [threading.Event() for _ in range(4)]  # the slow user answers once the others reach their second turn
    tasks = [("toy", task(0, turns=3, block_at=1, block=second))]
    tasks += [("toy", task(j, turns=3, signal_at=2, signal=second[j - 1])) for j in range(1, 5)]
    torch.manual_seed(3)
    stats = {}
    eps = rollout.rollout(policy, tok, tasks, 1, cfg(sync_every=4), stats=stats)
    assert [ep.info["end_reason"] for ep in eps] == ["done"] * 5 and len({len(ep.ids) for ep in eps}) == 5
    slow_reply = toy[0].ends[0]
    assert all(env.times[1] < slow_reply for env in toy[1:])  # their second turns ran before the slow reply came
    assert_logprobs_exact(policy, eps)
    assert stats["time_env"] < sum(ep.info["time_env"] for ep in eps)  # waiting overlapped


def test_engine_admits_waiting_episodes_into_freed_rows(tiny, toy):
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    torch.manual_seed(4)
    stats = {}
    eps = rollout.rollout(policy, tok, [("toy", task(j, turns=2)) for j in range(3)], 2, cfg(max_rows=2), stats=stats)
    assert stats["rows"] == 2 and [ep.info["end_reason"] for ep in eps] == ["done"] * 6
    first_free = min(toy[0].ends[-1], toy[1].ends[-1])
    assert all(env.times[0] > first_free for env in toy[2:])  # admitted mid-rollout, into rows others had left
    assert_logprobs_exact(policy, eps)
    # Each group's second episode copied its sibling's prompt from the cache; nothing else was ever copied.
    bpt = engine.kv_bytes_per_token(model.config, torch.float32)
    assert stats["cache_bytes_copied"] <= sum(eps[2 * g].info["prompt_tokens"] - 1 for g in range(3)) * bpt
    # Allocated once: 2 rows (plus a scratch row) x (longest prompt + the episode budget, plus a scratch column).
    assert stats["cache_bytes"] == 3 * (max(ep.info["prompt_tokens"] for ep in eps) + 8192 + 1) * bpt


def test_a_prompt_copied_from_a_row_that_the_same_round_refills(tiny, toy):
    # Two rows; never an end-of-turn token, so both first episodes are cut by the budget at the same step and free
    # rows 0 and 1 together. Next round: task 1's sibling takes row 0 and copies task 1's prompt from row 1, then
    # task 2 takes row 1 and prefills its own prompt there. The copy must read row 1 before that prefill.
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: -1e4})
    tasks = [("toy", task(0)), ("toy", task(1)), ("toy", task(1)), ("toy", task(2))]
    torch.manual_seed(0)
    eps = rollout.rollout(policy, tok, tasks, 1, cfg(max_rows=2, max_episode_tokens=16))
    assert [ep.info["end_reason"] for ep in eps] == ["budget"] * 4
    assert_logprobs_exact(policy, eps)


def test_an_env_call_found_done_after_its_timeout_times_out(tiny, toy):
    # Episode 0 ends its turn at once and its user takes 0.3 s, past env_timeout 0.2 s; episode 1 decodes 1,200
    # tokens in chunks of 600 steps, so the engine first looks at episode 0's call after it has finished, late.
    model, tok = tiny
    tasks = [("toy", task(0, turns=1, delay=0.3)), ("toy", task(1, turns=1))]
    env = envs.make_env("toy", tasks[0][1])
    prompt = len(rollout.render_ids(tok, rollout.prompt_messages(env), add_generation_prompt=True))
    policy = Biased(model, {tok.eos_token_id: -1e4}, at={prompt + 4: {tok.eos_token_id: 2e4}})
    runs = {}
    for schedule in ("engine", "lockstep"):
        torch.manual_seed(0)
        runs[schedule] = rollout.rollout(policy, tok, tasks, 1, cfg(schedule=schedule, env_timeout=0.2,
                                                                    sync_every=600, max_new_tokens=1200))
        assert [ep.info["end_reason"] for ep in runs[schedule]] == ["env_timeout", "done"], schedule
        assert runs[schedule][0].failed


def test_engine_user_failure_while_other_rows_decode(tiny, toy):
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    # The first user fails once the second episode has reached its second turn; the fourth waits for a row.
    second = threading.Event()
    tasks = [("toy", task(0, fail_at=1, block_at=1, block=[second])), ("toy", task(1, turns=3, signal_at=2,
                                                                                   signal=second)),
             ("toy", task(2, turns=3)), ("toy", task(3, turns=2))]
    torch.manual_seed(5)
    eps = rollout.rollout(policy, tok, tasks, 1, cfg(max_rows=3))
    assert [ep.info["end_reason"] for ep in eps] == ["user_failure", "done", "done", "done"]
    assert eps[0].failed and not any(ep.failed for ep in eps[1:]) and "down" in eps[0].info["error"]
    assert toy[1].times[1] < toy[0].ends[0]  # the other rows went on decoding while the failing user was called
    assert toy[3].times[0] > toy[0].ends[0]  # the fourth episode took the failed one's row
    assert_logprobs_exact(policy, eps)


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
def test_episode_budget_hit_mid_turn(tiny, toy, schedule):
    # Turns never end on their own (eos suppressed): each runs to the 20-token cap until the budget cuts one,
    # at a different step of a decode chunk in each row (observations differ in length).
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: -100.0})
    torch.manual_seed(6)
    eps = rollout.rollout(policy, tok, [("toy", task(j, turns=99)) for j in range(4)], 1,
                          cfg(max_new_tokens=20, max_episode_tokens=75, schedule=schedule))
    cut = 0
    for ep in eps:
        assert ep.info["end_reason"] == "budget"  # cut mid-turn, or no room left after an observation
        start, end = ep.turn_spans[-1]
        if ep.loss_mask[-1] == 1:  # cut mid-turn: no closing eos, the budget filled exactly, no env step
            cut += 1
            assert len(ep.ids) - ep.info["prompt_tokens"] == 75 and 0 < end - start < 20
            assert ep.turn_info[-1] == {} and ep.turn_rewards[-1] == 0.0
    assert cut >= 2 and len({len(ep.ids) for ep in eps}) > 1
    assert_logprobs_exact(policy, eps)


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
def test_a_stuck_env_step_times_out_without_holding_the_batch(tiny, toy, schedule):
    model, tok = tiny
    stuck = threading.Event()
    tasks = [("toy", task(0, block_at=1, block=[stuck])), ("toy", task(1, turns=2))]
    try:
        eps = rollout.rollout(model, tok, tasks, 1, cfg(env_timeout=0.5, schedule=schedule))
        still_stuck = toy[0].ends == []
    finally:
        stuck.set()  # lets the stuck thread go
    assert [ep.info["end_reason"] for ep in eps] == ["env_timeout", "done"]
    assert eps[0].failed and "env_timeout" in eps[0].info["error"] and not eps[1].failed
    assert still_stuck  # the rollout returned while the call was still stuck: it did not wait for it


def test_a_seeded_rollout_repeats_whatever_the_schedule_and_timing(tiny, toy):
    # Sampling noise depends on (episode seed, position, token) only, so neither the engine's timing-dependent
    # batches (users answer after random delays here) nor the schedule change a single token.
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    runs = []
    for schedule, delays in (("engine", (0.0, 0.05)), ("engine", (0.05, 0.0)), ("lockstep", (0.0, 0.0))):
        tasks = [("toy", task(j, turns=3, delay=delays[j % 2])) for j in range(4)]
        torch.manual_seed(9)
        runs.append(rollout.rollout(policy, tok, tasks, 2, cfg(schedule=schedule, top_p=0.9)))
    for a, b, c in zip(*runs):
        assert a.ids == b.ids == c.ids and a.loss_mask == b.loss_mask == c.loss_mask
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-5)


@pytest.mark.parametrize("schedule, compiled", [("engine", False), ("engine", True), ("lockstep", False)])
def test_the_kv_cache_is_freed_when_the_rollout_returns(tiny, toy, monkeypatch, schedule, compiled):
    # Freed by reference counting, not whenever Python's cycle collector runs: on a GPU the rollout's KV cache would
    # otherwise stay allocated through the update. (An engine that kept its own bound method was such a cycle.)
    model, tok = tiny
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the compiled path's wiring, without compiling
    gc.collect()
    gc.disable()
    try:
        rollout.rollout(model, tok, [("toy", task(0, turns=2))], 2, cfg(schedule=schedule, compile=compiled))
        caches = (engine.Engine, engine.KVCache, engine.LockstepBatch, transformers.DynamicCache)
        alive = [o for o in gc.get_objects() if isinstance(o, caches)]
    finally:
        gc.enable()
    assert alive == []


def test_engine_counts_syncs_utilisation_and_copies(tiny, toy):
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    torch.manual_seed(7)
    runs = {}
    for schedule in ("engine", "lockstep"):
        stats = {}
        eps = rollout.rollout(policy, tok, [("toy", task(j, turns=3)) for j in range(3)], 3,
                              cfg(schedule=schedule, sync_every=8), stats=stats)
        runs[schedule] = stats
    eng, lockstep = runs["engine"], runs["lockstep"]
    bpt = engine.kv_bytes_per_token(model.config, torch.float32)
    # One read back per chunk of up to 8 steps over all decoding rows; lockstep waits at least twice a step.
    assert eng["host_syncs"] <= eng["decode_steps"] / 4 and eng["host_syncs"] < eng["tokens_generated"] / 8
    assert lockstep["host_syncs"] >= 3 * lockstep["decode_steps"]
    # The engine copies only prompts (two siblings per group), lockstep its whole cache at every step.
    assert eng["cache_bytes_copied"] == 2 * sum(eps[3 * g].info["prompt_tokens"] - 1 for g in range(3)) * bpt
    assert lockstep["cache_bytes_copied"] > 10 * eng["cache_bytes_copied"]
    assert eng["slot_utilization"] > 0.9 > lockstep["slot_utilization"]
    assert eng["tokens_fed"] <= eng["slots_fed"]


def test_engine_fixed_shapes_for_compilation_change_nothing(tiny, toy, monkeypatch):
    # compile=True decodes at power-of-two row counts (padding rows write into a scratch row) over the whole
    # cache, at power-of-two widths. With torch.compile made the identity, that path alone is checked, quickly.
    model, tok = tiny
    policy = Biased(model, {tok.eos_token_id: 4.0})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    runs, stats = [], {}
    for compiled in (False, True):
        torch.manual_seed(10)
        runs.append(rollout.rollout(policy, tok, [("toy", task(j, turns=3)) for j in range(3)], 1,
                                    cfg(compile=compiled, max_rows=3), stats=stats))
    assert stats["slots_fed"] > stats["tokens_fed"]  # padded to 4 rows, then 2, 1
    for a, b in zip(*runs):
        assert a.ids == b.ids and a.loss_mask == b.loss_mask
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_engine_compiled_decode_step_on_cpu(tiny, toy):
    # The real torch.compile (inductor, C++ on CPU): one chunk at one shape, about 10-25 s on 2 CPU cores, most of
    # it compiling. More shapes would each compile again, so the fixed-shape test above covers the rest.
    model, tok = tiny
    runs = []
    for compiled in (False, True):
        torch.manual_seed(11)
        runs.append(rollout.rollout(model, tok, [("toy", task(0))], 2, cfg(compile=compiled, max_turns=1,
                                                                          max_new_tokens=8, max_episode_tokens=40)))
    for a, b in zip(*runs):
        assert a.ids == b.ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_compiled_rollouts_with_other_prompts_reuse_the_compiled_step(tiny, toy, monkeypatch):
    # The cache is an input of the compiled step: its rows and columns come in buckets, so a later rollout whose
    # prompts are a little longer meets the shapes already compiled (each size was a recompile, and past dynamo's
    # limit everything ran uncompiled). Dynamo's own tracing (backend "eager") counts graphs without inductor's cost.
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=False))
    model, tok = tiny
    torch._dynamo.reset()
    graphs = []
    for j in (0, 1):  # prompts of about 380 and 400 tokens
        torch.manual_seed(0)
        rollout.rollout(model, tok, [("toy", task(j, turns=1))], 2, cfg(compile=True, max_new_tokens=8))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]


def test_turn_info_and_the_envs_end_reason(tiny, toy, tmp_path):
    model, tok = tiny
    eps = rollout.rollout(model, tok, [("toy", task(1, turns=2, end_reason="malformed_call"))], 1,
                          cfg(malformed="retry"))
    assert toy[0].malformed == "retry"  # passed to make_env
    assert eps[0].info["end_reason"] == "malformed_call"
    assert eps[0].turn_info == [{"turn": 1}, {"turn": 2, "end_reason": "malformed_call"}]
    rollout.write_transcripts(tmp_path / "t.jsonl", eps, tok)
    assert json.loads((tmp_path / "t.jsonl").read_text())["turn_info"] == eps[0].turn_info


def tiny_family_model(tok, family):
    """A random Qwen2 (attention biases) or Llama decoder with grouped-query attention, sized like the tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_engine_runs_the_qwen2_and_llama_families(tiny, toy, family):
    _, tok = tiny
    policy = Biased(tiny_family_model(tok, family), {tok.eos_token_id: 4.0})
    torch.manual_seed(8)
    eps = rollout.rollout(policy, tok, [("toy", task(j)) for j in range(3)], 2, cfg())
    assert_logprobs_exact(policy, eps)
    assert policy.config._attn_implementation == "sdpa"  # the engine's attention was set for the call only


@pytest.mark.parametrize("schedule", ["engine", "lockstep"])
def test_a_bf16_policy_samples_from_fp32_logits(tiny, toy, schedule):
    # While a rollout runs, a bf16 model's lm_head hands the sampler fp32 logits (engine.fp32_head: on CUDA computed
    # in fp32, as the trainer's log-probs are); when it returns, the head is the model's own again.
    model, tok = tiny
    policy = models.rollout_copy(model, torch.bfloat16)
    head = policy.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        torch.manual_seed(0)
        eps = rollout.rollout(policy, tok, [("toy", task(j)) for j in range(2)], 2, cfg(schedule=schedule))
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.float32} and not any(ep.failed for ep in eps)
    assert "forward" not in vars(head) and head(torch.zeros(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    h = torch.randn(3, 5, 64).bfloat16()
    with engine.fp32_head(policy):  # on the CPU: the bf16 matmul's logits, unchanged, in fp32
        assert torch.equal(head(h), torch.nn.functional.linear(h, head.weight).float())
    with engine.fp32_head(model):  # an fp32 model is left as it is
        assert "forward" not in vars(model.get_output_embeddings())


def test_engine_refuses_sliding_window_attention(tiny, toy):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = tiny
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                         max_window_layers=0)
    with pytest.raises(ValueError, match="full attention"):
        rollout.rollout(Qwen2ForCausalLM(config), tok, [("toy", task(0))], 1, cfg())


def test_sample_tokens_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    tokens, lp = engine.sample_tokens(logits.expand(2000, 4), top_p=0.7)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is the two most likely
    assert torch.allclose(lp, torch.log(torch.tensor([0.5, 0.3]))[tokens])  # log-prob before top-p
    tokens, lp = engine.sample_tokens(logits, temperature=0.5, greedy=True)
    assert tokens.tolist() == [0] and torch.allclose(lp, torch.log(torch.tensor([0.5])))
    tokens, lp = engine.sample_tokens(logits.expand(4000, 4), temperature=0.5)
    tempered = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(lp, tempered.log()[tokens])
    assert abs((tokens == 0).float().mean().item() - tempered[0].item()) < 0.03


def test_token_noise_samples_the_distribution_and_depends_only_on_its_keys():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    seeds = torch.randint(0, 1 << 62, (4000,))
    positions = torch.randint(0, 8192, (4000,))
    noise = engine.token_noise(seeds, positions, 4)
    assert torch.equal(noise, engine.token_noise(seeds, positions, 4)) and (noise > 0).all()
    assert not torch.equal(noise, engine.token_noise(seeds, positions + 1, 4))
    tokens, _ = engine.sample_tokens(logits, noise=noise)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 4000., torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # One episode's tokens at consecutive positions are independent draws too.
    tokens, _ = engine.sample_tokens(logits, noise=engine.token_noise(seeds[:1].expand(4000), torch.arange(4000), 4))
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 4000., torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    pairs = (tokens[:-1] == 0) & (tokens[1:] == 0)
    assert abs(pairs.float().mean().item() - 0.25) < 0.03


def test_token_noise_is_the_documented_splitmix64_stream():
    # An oracle in Python integers: token t's uniform is output t + 1 of the splitmix64 stream whose seed is output
    # position + 1 of the stream seeded by the episode; its top 24 bits k give u = (k + 1/2) / 2^24, noise -log(u).
    golden, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seeds, positions = [0, 12345, (1 << 62) - 1], [0, 1059, 8191]
    noise = engine.token_noise(torch.tensor(seeds), torch.tensor(positions), 3000)
    for row, (seed, pos) in enumerate(zip(seeds, positions)):
        key = mix((seed + (pos + 1) * golden) & mask)
        for t in (0, 1, 2999):
            u = ((mix((key + (t + 1) * golden) & mask) >> 40) + 0.5) / 2 ** 24
            assert noise[row, t].item() == pytest.approx(-math.log(u), rel=1e-6), (seed, pos, t)


def test_no_token_of_probability_zero_is_ever_sampled():
    """(seed 0, position 1059) draws the top 24 bits all ones for token 2532 of 4096: one (token, step) in 2^24 does,
    so ~1% of steps at Qwen's 152k vocabulary. Its noise must be positive, and a token outside the nucleus (or
    any token of probability 0) must lose to the tokens that can be sampled."""
    noise = engine.token_noise(torch.tensor([0]), torch.tensor([1059]), 4096)
    assert (noise > 0).all() and noise[0, 2532] == 2.0 ** -25
    logits = torch.full((1, 4096), float("-inf"))
    logits[0, 7] = 0.0
    assert engine.sample_tokens(logits, noise=noise)[0].tolist() == [7]
    logits = torch.zeros(1, 4096)
    logits[0, 7] = 20.0  # the nucleus at top_p 0.9 is token 7 alone: 2532, truncated to probability 0, must lose
    assert engine.sample_tokens(logits, top_p=0.9, noise=noise)[0].tolist() == [7]


def test_bad_arguments_are_named(tiny, toy):
    model, tok = tiny
    with pytest.raises(ValueError, match="group_size"):
        rollout.rollout(model, tok, [("toy", task(0))], 0, cfg())
    with pytest.raises(ValueError, match="gym_name, task_dict"):
        rollout.rollout(model, tok, ["toy"], 1, cfg())
    with pytest.raises(ValueError, match="top_p"):
        rollout.rollout(model, tok, [("toy", task(0))], 1, cfg(top_p=0.0))
    with pytest.raises(ValueError, match="rollout.schedule"):
        cfg(schedule="async")
    with pytest.raises(ValueError, match="rollout.malformed"):
        cfg(malformed="ignore")
    with pytest.raises(ValueError, match="max_rows"):
        cfg(max_rows=-1)


# ----------------------------------------------------------------------------------------------------------
# The HTTP agent (a strong model behind an OpenAI-compatible endpoint) and transcripts


class AgentServer(BaseHTTPRequestHandler):
    """A loopback /v1/chat/completions that answers every turn with an interact_with_env tool call, or 400s
    when the conversation's question contains "broken"."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "broken" in body["messages"][1]["content"]:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad request"}')
            return
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        args = json.dumps({"choice": "action", "content": f"question {turn}"})
        msg = {"role": "assistant", "content": None,
               "tool_calls": [{"id": f"call_{turn}", "type": "function",
                               "function": {"name": "interact_with_env", "arguments": args}}]}
        data = json.dumps({"choices": [{"message": msg}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_agent_loop_passes_each_agent_its_env(toy):
    class Oracle:
        """An agent that reads its env (as envs.ExpertAgent does) and answers with a tool call."""

        def complete(self, messages, tools, env=None):
            assert tools == [envs.TOOL_SCHEMA] and isinstance(env, ToyEnv)
            args = {"choice": "action", "content": env.task["id"]}
            call = json.dumps({"name": "interact_with_env", "arguments": args})
            return {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"}

    eps = rollout.rollout(Oracle(), None, [("toy", task(j, turns=2)) for j in range(2)], 1, cfg())
    assert [ep.info["end_reason"] for ep in eps] == ["done", "done"]
    assert [env.seen for env in toy] == [[eps[j].messages[2]["content"]] * 2 for j in range(2)]
    assert envs.parse_action(toy[1].seen[0]).content == "toy-1"


def test_an_http_agent_is_told_which_of_its_calls_ran():
    # Training runs every call of a turn, evaluation only the first; the first call's message holds the reply.
    message = {"role": "assistant", "tool_calls": [{"id": "a"}, {"id": "b"}]}
    ran_all = rollout._observation_messages(message, "obs", first_only=False)
    assert [m["tool_call_id"] for m in ran_all] == ["a", "b"] and ran_all[0]["content"] == "obs"
    assert ran_all[1]["content"].startswith("Executed")
    first = rollout._observation_messages(message, "obs", first_only=True)
    assert first[0]["content"] == "obs" and first[1]["content"].startswith("Not executed")
    assert rollout._observation_messages({"role": "assistant"}, "obs", True) == [{"role": "user", "content": "obs"}]


def test_an_openai_message_becomes_the_text_the_template_writes():
    # The API's arguments are a JSON string: written once, as an object; a served model's reasoning as <think>.
    message = {"role": "assistant", "content": "Let me look.", "reasoning_content": "Search first.",
               "tool_calls": [{"id": "a", "type": "function", "function": {
                   "name": "interact_with_env", "arguments": '{"choice": "search", "content": "test"}'}}]}
    text = rollout.tool_call_text(message)
    assert text.startswith("<think>\nSearch first.\n</think>\n\nLet me look.")
    assert '"arguments": {"choice": "search", "content": "test"}' in text
    assert envs.parse_action(text).content == "test"


def test_http_agent_rollout_and_transcripts(toy, tiny, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), AgentServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        agent = users.make_user("http", base_url=f"http://127.0.0.1:{server.server_port}/v1", model="agent",
                                max_retries=0)
        tasks = [("toy", task(2)), ("toy", task(0, question="broken please"))]
        stats = {}
        eps = rollout.rollout(agent, None, tasks, 2, cfg(end_on_no_tool_call=True), stats=stats)
    finally:
        server.shutdown()
    assert [ep.info["end_reason"] for ep in eps] == ["done", "done", "user_failure", "user_failure"]
    assert eps[0].turn_rewards == [0.5, 1.0, 1.5] and eps[0].ids == [] and not eps[0].failed
    assert toy[0].seen[0].endswith('</tool_call>') and envs.parse_action(toy[0].seen[0]).content == "question 0"
    roles = [m["role"] for m in eps[0].messages]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 3
    assert eps[0].messages[3]["tool_call_id"] == "call_0"
    assert "HTTP 400" in eps[2].info["error"] and stats["turns"] == 3

    path = tmp_path / "t.jsonl"
    rollout.write_transcripts(path, eps)
    model, tok = tiny
    local = rollout.rollout(model, tok, [("toy", task(1))], 1, cfg())
    rollout.write_transcripts(path, local, tok, append=True)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 5 and recs[0]["messages"] == eps[0].messages and recs[0]["turn_rewards"] == [0.5, 1.0, 1.5]
    assert recs[2]["failed"] and recs[2]["info"]["end_reason"] == "user_failure"
    assert recs[0]["turn_info"] == [{"turn": 1}, {"turn": 2}, {"turn": 3}] and recs[2]["turn_info"] == [{}]
    assert recs[4]["text"] == tok.decode(local[0].ids, skip_special_tokens=False)
    assert recs[4]["num_generated"] == sum(local[0].loss_mask) and "text" not in recs[0]
