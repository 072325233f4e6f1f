"""Reliability (issue 15): adversarial agent text never breaks a gym or leaks a hidden answer, and rollouts
against a failing user endpoint lose no episode (a small version of bench/faults.py)."""
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
