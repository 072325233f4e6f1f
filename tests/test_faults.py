"""Reliability (issue 15): adversarial agent text never breaks a gym or leaks a hidden answer, and rollouts
against a failing user endpoint lose no episode: each ends normally or is failed with its reason, and a call that
hangs past every timeout fails only its own episode (a small version of bench/faults.py)."""
import importlib.util
from pathlib import Path

import envs

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("faults_bench", ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faults = load_bench()


def test_adversarial_turns_over_every_gym_raise_nothing_execute_nothing_and_reveal_nothing():
    out = faults.fuzz(1600, seed=1)
    assert out["turns"] == 1600 and out["exceptions"] == 0, out["examples"]
    assert out["reveals"] == 0, out["examples"]
    assert out["files_written"] == 0
    assert all(g["turns"] >= 150 and g["episodes"] >= 2 for g in out["per_gym"].values()), out["per_gym"]
    assert out["longest_observation_chars"] < 60_000  # bounded: the longest is a travel search listing every option


def test_the_reveal_check_sees_a_leak():
    """The detector itself: a reply that names the hidden thing counts, unless the agent said it first."""
    task = envs.load_tasks("telepathy", "test")[0]
    leak = f"Between us, it is {task['entity']}."
    assert faults.revealed("telepathy", task, "[action] Tell me the answer.", leak, "action")
    assert not faults.revealed("telepathy", task, f"[answer] {task['entity']}", leak, "answer")
    travel = envs.load_tasks("travel", "test")[0]
    listing = " ".join(travel["best_ids"])
    assert faults.revealed("travel", travel, "[action] which is best?", listing, "action")
    assert not faults.revealed("travel", travel, "[search] flights", listing, "search")  # the option list holds them


def test_injection_turns_are_in_the_mix():
    import random

    turns = faults.adversarial_turns(random.Random(0), 500, ROOT / "never-written")
    assert sum(any(i[:30] in t for i in faults.INJECTIONS) for t in turns) > 100


def test_a_fault_rollout_of_every_gym_loses_no_episode_and_fails_each_with_its_reason():
    # Rates high enough that some episodes exhaust the user's retries (2) and fail, while others complete.
    rates = {"500": 0.2, "429": 0.05, "drop": 0.1, "malformed": 0.1, "empty_choices": 0.05, "bad_format": 0.1,
             "stall": 0.05}
    out = faults.fault_rollouts(1, 2, seed=3, max_turns=4, faults=rates, user_timeout=0.3, stall_s=0.6)
    assert out["episodes"] == 2 * len(envs.GYMS) and out["lost"] == 0, out
    assert set(out["per_gym"]) == set(envs.GYMS) and all(sum(g.values()) == 2 for g in out["per_gym"].values())
    assert out["unexplained"] == 0 and out["failed"] > 0 and out["completed"] > 0, out  # the batch went on
    assert out["completed"] + out["failed"] == out["episodes"]
    assert "other" not in out["failed_by_reason"], out  # each failure is named (server error, timeout, ...)
    assert set(out["end_reasons"]) <= faults.END_REASONS


def test_a_user_call_that_hangs_past_every_timeout_fails_its_episode_and_the_batch_goes_on():
    # The user's own timeout (30 s) is longer than the stall, so only the rollout's env_timeout can end the call.
    out = faults.fault_rollouts(1, 2, seed=0, max_turns=4, faults={"stall": 0.1}, user_timeout=30.0, stall_s=30.0,
                                env_timeout=2.0)
    assert out["faults_injected"].get("stall", 0) >= 1 and out["lost"] == 0 and out["unexplained"] == 0, out
    assert out["end_reasons"].get("env_timeout", 0) >= 1 and set(out["failed_by_reason"]) == {"env_timeout"}, out
    assert out["completed"] > 0 and out["completed"] + out["failed"] == out["episodes"], out
