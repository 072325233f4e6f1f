"""The gyms: full scripted episodes, the original's rules (each on a hand-made case), the safe rule evaluator, task
validation and original-data loaders, the experts on every shipped task, import order, and a fuzz test that no
agent text can crash a gym or run code."""
import json
import random
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import envs
import users
from gyms import function as fr
from gyms import intention, persuade, search, travel, turtle

ROOT = Path(__file__).resolve().parent.parent
TESTS_DATA = Path(__file__).resolve().parent / "data"
FIVE = ("function", "telepathy", "turtle", "intention", "persuade")
EIGHT = FIVE + ("travel", "tau", "search")

FUNC = {"id": "f", "rule": "(b * c) - a + d", "test_case": [3, 7, 2, 5], "expected_result": 16.0}
TELE = {"id": "t", "category": "animal", "entity": "giraffe", "synonyms": ["camelopard"], "description": "A tall mammal.",
        "attributes": {"yes": ["animal", "mammal", "long neck"], "no": ["bird", "farm animal", "pet"]}}
TURTLE = {"id": "u", "title": "The Note", "surface": "A man read a note and smiled.", "bottom": "His son had passed the exam.",
          "criteria": [{"statement": "The note was from his son.", "weight": 0.6, "keywords": [["son"], ["note", "letter"]]},
                       {"statement": "The son passed an exam.", "weight": 0.4, "keywords": [["exam", "test"]]}],
          "host_facts": {"yes": ["son", "exam"], "no": ["money", "love"]}}
INTENT = {"id": "i", "category": "coding", "task": "Write a script that cleans my photos.",
          "missing_details": [
              {"description": "file types", "importance": 3, "inquiry": "Which file formats?", "options": ["JPEG only", "all"],
               "keywords": ["format", "formats"]},
              {"description": "language", "importance": 2, "inquiry": "Which language?", "options": ["Python", "Bash"],
               "keywords": ["language"]},
              {"description": "backup", "importance": 1, "inquiry": "Keep a backup?", "options": ["yes", "no"],
               "keywords": ["backup"]}]}
PERSUADE = {"id": "p", "claim": "Homework should be banned.", "argument": "Kids need rest.",
            "counterpoints": [{"point": "Reading at home helps literacy.", "keywords": ["reading"]},
                              {"point": "It builds habits.", "keywords": ["habits"]},
                              {"point": "Limit it instead of a ban.", "keywords": ["limit"]}]}
# The tool-backed gyms' tasks are generated with exact ground truth: take them from the shipped test files.
TRAVEL = envs.load_tasks("travel", "test")[0]
TAU = next(t for t in envs.load_tasks("tau", "test") if t["actions"])  # a task that needs a write
SEARCH = envs.load_tasks("search", "test")[0]
TASKS = {"function": FUNC, "telepathy": TELE, "turtle": TURTLE, "intention": INTENT, "persuade": PERSUADE,
         "travel": TRAVEL, "tau": TAU, "search": SEARCH}


def play(env, turns):
    """Reset, play `turns` until done; the list of (observation, reward, done, info)."""
    env.reset()
    out = []
    for text in turns:
        out.append(env.step(text))
        if out[-1][2]:
            break
    return out


def total(steps):
    return sum(r for _, r, _, _ in steps)


def test_registry_lists_the_eight_gyms_and_each_prompt_is_complete():
    assert sorted(envs.GYMS) == sorted(EIGHT)
    for name in EIGHT:
        for eval_mode in (False, True):  # every gym takes the switch, whether or not its settings differ
            env = envs.make_env(name, TASKS[name], max_turns=7, eval_mode=eval_mode)
            prompt = env.system()
            assert "7 turns" in prompt and "<think>" in prompt and "{max" not in prompt, name
            for choice in env.choices:
                assert f"- {choice}:" in prompt, (name, choice)
            assert isinstance(env.reset(), str) and env.reset()
    assert "at most 2 searches" in envs.make_env("search", SEARCH, max_searches=2).system()


def test_unknown_gym_missing_fields_and_bad_override_are_clear_errors():
    with pytest.raises(KeyError, match="nosuch"):
        envs.make_env("nosuch", {})
    with pytest.raises(ValueError, match="criteria"):
        envs.make_env("turtle", {"id": "x", "title": "t", "surface": "s", "bottom": "b"})
    with pytest.raises(TypeError, match="colour"):
        envs.make_env("function", FUNC, colour="red")


# ----------------------------------------------------------------------------------------------------------
# FunctionGym and its rules


def test_function_episode_good_and_bad_policy():
    steps = play(envs.make_env("function", FUNC), ["[search] test", "[action] 1 2 3 4", "[answer] 16"])
    assert steps[0][0].startswith("The test case is [3, 7, 2, 5].")
    assert "For numbers [1, 2, 3, 4], the result is 9." in steps[1][0]  # 2*3 - 1 + 4
    assert [r for _, r, _, _ in steps] == [0.0, 0.0, 1.0] and steps[-1][2]
    bad = play(envs.make_env("function", FUNC, max_turns=5), ["[answer] 15", "[action] 1 1 1 1"] * 5)
    assert total(bad) == 0 and len(bad) == 5 and bad[-1][3]["truncated"]


def test_function_refusals_and_undefined_values():
    env = envs.make_env("function", {"id": "g", "rule": "a / (b - c) + d ** 2", "test_case": [1, 3, 2, 1],
                                     "expected_result": 2.0}, show_reward=False)
    env.reset()
    # As the original: search is exactly "test", an answer is one number and nothing else (its float()), and
    # queries read numbers as its -?\d+\.?\d* does ("1e1" is 1 and 1)
    for text, error in [("[action] 1 3 2 1", "test case itself"), ("[action] 1 2 3", "exactly four"),
                        ("[search] the rule", 'only "test"'), ("[search] test.", 'only "test"'),
                        ("[answer] 1 or 2", "one number and nothing else"),
                        ("[answer] The answer is 2", "one number and nothing else"),
                        ("[action] " + "9" * 400 + " 1 1 1", "finite")]:
        obs, reward, done, info = env.step(text)
        assert error in obs and reward == 0 and not done and info["error"], text
    assert "For numbers [1, 1, 2, 2]" in env.step("[action] 1e1 2 2")[0]
    assert "undefined" in env.step("[action] 1 2 2 1")[0]
    assert env.step("[action] 1 2 2 1")[3].get("error") is None  # an undefined value is an answer, not an error
    assert "the result is 0.3333." in env.step("[action] 1 5 2 0")[0]
    assert env.step("[answer] 2.0000004")[1] == 1.0  # within 1e-6
    huge = envs.make_env("function", {"id": "h", "rule": "a ** b ** c ** d", "test_case": [1, 1, 1, 1], "expected_result": 1})
    assert "undefined" in huge.step("[action] 10 10 10 10")[0]  # 10 ** 10 ** 10 ** 10 would never finish as an int


def test_rule_evaluator_follows_python_precedence_and_refuses_code():
    cases = [("-a ** 2", [3, 0, 0, 0], -9), ("a ** b ** c", [2, 3, 2, 0], 512), ("a - b - c", [10, 3, 2, 0], 5),
             ("a / b * c", [8, 2, 3, 0], 12), ("(a + b) * -c", [1, 2, 3, 0], -9), ("a ** -b", [2, 1, 0, 0], 0.5),
             ("2 * a + .5", [1, 0, 0, 0], 2.5)]
    for rule, xs, want in cases:
        assert fr.apply_rule(fr.compile_rule(rule), xs) == pytest.approx(want), rule
    for bad in ["__import__('os')", "a; b", "a +", "(a", "e", "", "a b", "a" * 400]:
        with pytest.raises(ValueError):
            fr.compile_rule(bad)
    assert fr.apply_rule(fr.compile_rule("(-a) ** 0.5"), [4, 0, 0, 0]) is None  # complex in Python: undefined here


def test_original_function_file_reproduces_every_expected_result():
    train = envs.load_tasks("function", "train", data_dir=TESTS_DATA)
    test = envs.load_tasks("function", "test", data_dir=TESTS_DATA)
    assert len(train) + len(test) == 538 and len(test) == 54
    assert not {t["id"] for t in train} & {t["id"] for t in test}
    for t in train + test:
        y = fr.apply_rule(fr.compile_rule(t["rule"]), t["test_case"])
        assert y is not None and abs(y - t["expected_result"]) <= 1e-6, t
    assert total(play(envs.make_env("function", test[0]), [f"[answer] {test[0]['expected_result']}"])) == 1.0


def test_generated_function_data_is_reproducible_and_correct():
    train, test = fr.function_tasks(seed=0)
    assert envs.load_tasks("function", "train") == train and envs.load_tasks("function", "test") == test
    assert (len(train), len(test)) == (460, 78)
    rules = [t["rule"] for t in train + test]
    assert len(set(rules)) == len(rules)
    # distinct as functions too: a test rule that is a train rule rewritten (a + b vs b + a) would leak it
    assert len({fr.signature(fr.compile_rule(r)) for r in rules}) == len(rules)
    assert fr.signature(fr.compile_rule("d + b + a + c")) == fr.signature(fr.compile_rule("a + d + b + c"))
    assert sum("**" in r for r in rules) > 100 and sum("/" in r for r in rules) > 50  # the original's mix of operators
    for t in train + test:
        assert sorted(c for c in t["rule"] if c in "abcd") == list("abcd")
        assert all(1 <= x <= 10 for x in t["test_case"]) and abs(t["expected_result"]) <= 5000
        assert fr.apply_rule(fr.compile_rule(t["rule"]), t["test_case"]) == pytest.approx(t["expected_result"], abs=1e-9)
    assert fr.function_tasks(seed=1)[0] != train


# ----------------------------------------------------------------------------------------------------------
# The dialogue gyms with the scripted user


def test_telepathy_episode_and_answer_rules():
    steps = play(envs.make_env("telepathy", TELE, show_reward=False),
                 ["[action] Is it an animal?", "[action] Is it a farm animal?", "[action] Is it blue?",
                  "[answer] a lion", "[answer] giraffe or lion", "[answer] I think it is a Camelopard!"])
    assert [o for o, *_ in steps] == ["Yes", "No", "Maybe", "No, that is not what I am thinking of.",
                                      "No, that is not what I am thinking of.", "Correct! I was thinking of giraffe."]
    assert [r for _, r, _, _ in steps] == [0, 0, 0, 0, 0, 1.0]
    bad = play(envs.make_env("telepathy", TELE, max_turns=4), ["[answer] elephant"] * 9)
    assert total(bad) == 0 and len(bad) == 4


def test_turtle_rewards_are_improvements_over_the_best_score():
    steps = play(envs.make_env("turtle", TURTLE),
                 ["[action] Was it about money?", "[action] Was it his son?", "[answer] It was a note from his son.",
                  "[answer] It was a note from his son.", "[answer] His son", "[answer] A note from his son about an exam."])
    assert [o.split("\n")[0] for o, *_ in steps[:2]] == ["No", "Yes"]
    rewards = [r for _, r, _, _ in steps]
    assert rewards == pytest.approx([0, 0, 0.6, 0, 0, 0.4])  # "His son" half-matches (0.3): below the best, pays 0
    assert steps[4][3]["score"] == pytest.approx(0.3) and steps[-1][2] and "solved" in steps[-1][0]
    assert total(play(envs.make_env("turtle", TURTLE, max_turns=3), ["[answer] It was raining."] * 5)) == 0
    partial = play(envs.make_env("turtle", TURTLE, success_threshold=0.5), ["[answer] a note from his son"])
    assert partial[-1][2]  # the success threshold is an override
    assert turtle.criterion_score("a ship sank", [["ship", "boat"], ["sank"], ["storm"]]) == 0.5
    assert turtle.criterion_score("a ship", [["ship"], ["sank"], ["storm"]]) == 0.0
    assert turtle.criterion_score("anything", []) == 0.0  # no keywords: the rule cannot judge, so no credit


def test_intention_rewards_by_importance_and_penalises_many_part_questions():
    steps = play(envs.make_env("intention", INTENT, show_reward=False),
                 ["[action] Which language?", "[action] Which language?", "[action] Which formats, and do you want a backup?"])
    assert steps[0][0] == "Python."  # the user answers only what was asked
    assert [r for _, r, _, _ in steps] == pytest.approx([0.7, 0.0, 0.8])  # 1.0 - 0.2 for the second detail
    assert steps[-1][2] and steps[-1][3]["covered"] == 2
    assert intention.clarification_reward([1, 1, 1, 1, 1, 1]) == 0.0 and intention.clarification_reward([]) == 0.0
    bad = play(envs.make_env("intention", INTENT, max_turns=4), ["[action] ok?", "[answer] done"] * 3)
    assert total(bad) == 0 and len(bad) == 4


def test_persuade_rewards_stance_moves_toward_disagreement():
    env = envs.make_env("persuade", PERSUADE, show_reward=False)
    steps = play(env, ["[answer] You are wrong.", "[answer] Think of reading at home.", "[answer] Reading again!",
                       "[answer] Habits matter, and a limit beats a ban."])
    assert [r for _, r, _, _ in steps] == pytest.approx([0, 2 / 6, 0, 4 / 6])
    assert steps[-1][3]["stance"] == "Strongly Disagree" and steps[-1][2]
    assert total(play(envs.make_env("persuade", PERSUADE, max_turns=3), ["[answer] Please change your mind."] * 5)) == 0
    assert persuade.stance_reward(3, 1) == 0 and persuade.stance_reward(1, 3) == pytest.approx(2 / 6)


# ----------------------------------------------------------------------------------------------------------
# What the user model writes: parsed robustly, never crashing the gym


class Canned:
    """A user that answers every role with a fixed text, as an LLM might."""

    def __init__(self, text):
        self.text = text

    def act(self, role, messages, **facts):
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        return self.text


@pytest.mark.parametrize("text, reward", [
    ('Sure!\n```json\n{"scores": [1, 1]}\n```', 1.0), ("<think>hmm</think>{'scores': [1, 0.5]}", 0.8),
    ('{"scores": [7, -3]}', 0.6), ('{"scores": [1]}', None), ("no idea", None), ('{"scores": [true, 1]}', None),
    ('{"thought": "both nearly", "scores": [0.8, 0.8]}', 0.8)])  # raw scores, as the original: not solved
def test_turtle_judge_outputs_are_parsed_or_fall_back_to_zero(text, reward):
    obs, r, done, info = envs.make_env("turtle", TURTLE, user=Canned(text)).step("[answer] a story")
    if reward is None:
        assert r == 0 and info["user_fallback"] and not done
    else:
        assert r == pytest.approx(reward) and "user_fallback" not in info and done == (reward == 1.0)


def test_llm_style_replies_for_every_role():
    assert envs.make_env("telepathy", TELE, user=Canned("**Yes.** It is.")).step("[action] tall?")[0].startswith("Yes")
    # the roles reason in a "thought" first: its words are not the answer
    reasoned = Canned('{"thought": "No doubt about it, it is tall.", "answer": "Yes"}')
    assert envs.make_env("turtle", TURTLE, user=reasoned).step("[action] tall?")[0].startswith("Yes")
    tele = envs.make_env("telepathy", TELE, user=Canned("I refuse"))
    assert tele.step("[action] tall?")[3]["user_fallback"] and tele.step("[answer] x")[3]["user_fallback"]
    assert envs.make_env("telepathy", TELE, user=Canned('{"correct": "true"}')).step("[answer] x")[1] == 1.0
    intent = envs.make_env("intention", INTENT, user=Canned('```json\n{"covered": [1, "3", 9, true], "task_related": true}\n```'))
    intent.reset()
    assert intent.step("[action] q")[1] == pytest.approx(0.8) and len(intent.remaining) == 1
    off_task = envs.make_env("intention", INTENT, user=Canned('{"covered": [1], "task_related": false}'))
    off_task.reset()
    assert off_task.step("[action] q")[1] == 0
    persuade = envs.make_env("persuade", PERSUADE, user=Canned('{"response": "Hm.", "stance": "partly  DISAGREE"}'))
    persuade.reset()
    assert persuade.step("[answer] x")[1] == pytest.approx(4 / 6)
    persuade = envs.make_env("persuade", PERSUADE, user=Canned('{"response": "Hm.", "stance": "kind of"}'))
    persuade.reset()
    obs, r, done, info = persuade.step("[answer] x")
    assert r == 0 and info["user_fallback"] and persuade.stance == 0


def test_openings_show_what_the_originals_show():
    persuade = envs.make_env("persuade", PERSUADE).reset()  # the claim, not the persuadee's reasons or stance
    assert PERSUADE["claim"] in persuade and PERSUADE["argument"] not in persuade and "agree" not in persuade.lower()
    intent = envs.make_env("intention", INTENT).reset()  # the category, then the vague task
    assert intent.index(INTENT["category"]) < intent.index(INTENT["task"])


def test_user_error_propagates_out_of_step():
    class Down:
        def act(self, role, messages, **facts):
            raise users.UserError("endpoint down")

    env = envs.make_env("turtle", TURTLE, user=Down())
    env.reset()
    with pytest.raises(users.UserError):
        env.step("[action] is it a son?")
    assert env.step("not a tool call")[3]["missing_tool_call"]  # agent errors still never reach the user


def test_role_prompts_carry_the_hidden_facts_only_where_the_original_does():
    seen = {}

    class Spy(users.ScriptedUser):
        def act(self, role, messages, **facts):
            seen[role] = messages
            return super().act(role, messages, **facts)

    play(envs.make_env("intention", INTENT, user=Spy()), ["[action] Which language?"])
    assert "Which language?" == seen["intention.user"][-1]["content"]
    # as in the original, the answering user's prompt holds the whole task, missing details included
    assert all(d["description"] in seen["intention.user"][0]["content"] for d in INTENT["missing_details"])
    assert "backup" in seen["intention.evaluator"][0]["content"]
    play(envs.make_env("turtle", TURTLE, user=Spy()), ["[action] son?", "[answer] x"])
    assert TURTLE["bottom"] in seen["turtle.host"][0]["content"] and "The son passed" in seen["turtle.judge"][0]["content"]


# ----------------------------------------------------------------------------------------------------------
# The tool-backed gyms with the scripted user (their worlds' own mechanics are tested in test_worlds.py)


def travel_turns(task, good=True):
    """Search every aspect with all its details, ask about every preference (good), choose one id per aspect:
    the best (good) or one that misses a preference (bad). At most 4 aspects, so no search fails on purpose."""
    turns = []
    for a in task["aspects"]:
        args = {k: v if k in ("origin", "destination", "city") else travel.pretty_date(v) for k, v in a["arguments"].items()}
        turns.append("[search] " + {"flight": "flight from {origin} to {destination} on {date}",
                                    "hotel": "hotel in {city} from {check_in} to {check_out}",
                                    "apartment": "apartment in {city} from {check_in} to {check_out}",
                                    "car": "rental car in {city} from {pickup_date} to {return_date}",
                                    "restaurant": "restaurant in {city} on {date}"}[a["aspect"]].format(**args))
        if good:
            turns += [f"[action] For the {a['aspect']}, how do you feel about {p['keywords'][0]}?" for p in a["preferences"]]
    return turns + ["[answer] " + ", ".join(a["best_id"] if good else a["wrong_ids"][0] for a in task["aspects"])]


def tool_call(name, **arguments):
    return "[answer] " + json.dumps({"name": name, "arguments": arguments})


def tau_turns(task, act=True, report=True):
    """Identify the customer, perform the task's expected actions (`act`), then tell the customer it is done."""
    c = task["customer"]
    turns = ["[action] Could you give me your email, or your name and zip code, so I can verify your identity?"]
    if c["identify_by"] == "email":
        turns.append(tool_call("find_user_id_by_email", email=c["email"]))
    else:
        turns.append(tool_call("find_user_id_by_name_zip", first_name=c["first_name"], last_name=c["last_name"], zip=c["zip"]))
    turns += [tool_call(a["name"], **a["arguments"]) for a in task["actions"]] if act else []
    keys = [r.get("order_id") or "address" for r in c["requests"]]
    said = f"You paid {task['outputs'][0]} in total." if task["outputs"] else f"{' and '.join(keys)}: done successfully."
    return turns + ([f"[action] {said}"] if report else [])


def test_travel_episode_good_and_bad_policy_in_training_and_evaluation_settings():
    def expected(search_reward, preference_reward):  # per aspect a search, then one question per preference
        return [r for a in TRAVEL["aspects"] for r in [search_reward] + [preference_reward] * len(a["preferences"])]

    n = len(TRAVEL["aspects"])
    env = envs.make_env("travel", TRAVEL)
    assert env.reset() == TRAVEL["request"]
    steps = play(env, travel_turns(TRAVEL))
    assert [r for _, r, _, _ in steps] == expected(0.0, 0.8) + [n]  # the paper's training rewards
    assert steps[-1][2] and env.episode_score() == 1.0 and steps[0][0].endswith("Reward: 0.0")
    ev = envs.make_env("travel", TRAVEL, eval_mode=True)
    steps = play(ev, travel_turns(TRAVEL))
    assert [r for _, r, _, _ in steps] == pytest.approx(expected(0.2, 0.6) + [n])  # its evaluation rewards
    assert ev.episode_score() == 1.0 and "Reward" not in steps[0][0]  # and no reward line in evaluation
    assert envs.make_env("travel", TRAVEL, eval_mode=True, preference_reward=0.5).preference_reward == 0.5
    bad = envs.make_env("travel", TRAVEL)
    assert total(play(bad, travel_turns(TRAVEL, good=False))) == 0 and bad.episode_score() == 0
    second = envs.make_env("travel", TRAVEL)
    play(second, [f"[answer] {[i for i in a['correct_ids'] if i != a['best_id']][0]}" for a in TRAVEL["aspects"]])
    assert second.episode_score() == pytest.approx(0.8)  # correct but not the cheapest, in every aspect
    obs, r, done, info = envs.make_env("travel", TRAVEL).step("[answer] the cheap hotel")
    assert "not an option id" in obs and r == 0 and not done
    for task in envs.load_tasks("travel", "test"):  # the error names no concrete id: it could be the answer
        obs = envs.make_env("travel", task).step("[answer] the cheap hotel")[0]
        assert not [i for i in task["best_ids"] if i.lower() in obs.lower()]


def test_tau_episode_pays_the_tau_reward_at_every_kind_of_end():
    env = envs.make_env("tau", TAU)
    assert env.reset().startswith("Hi")  # the customer opens
    steps = play(env, ["[search] tools"] + tau_turns(TAU))
    assert "find_user_id_by_email" in steps[0][0] and steps[-1][2] and not steps[-1][3].get("truncated")
    assert [r for _, r, _, _ in steps] == [0.0] * (len(steps) - 1) + [1.0] and env.episode_score() == 1.0
    claims = envs.make_env("tau", TAU)  # says it is done without doing it: the customer leaves, reward 0
    assert total(play(claims, tau_turns(TAU, act=False))) == 0 and claims.episode_score() == 0
    # The turn limit and [finish] end an episode too; as in the original they pay 0, even with the work done.
    turns = tau_turns(TAU, report=False)
    cut = play(envs.make_env("tau", TAU, max_turns=len(turns) + 2), turns + ["[search] tools"] * 5)
    assert cut[-1][3]["truncated"] and total(cut) == 0
    finished = play(envs.make_env("tau", TAU), turns + ["[finish]"])
    assert finished[-1][2] and total(finished) == 0
    idle = play(envs.make_env("tau", TAU, max_turns=3), ["[search] tools"] * 5)
    assert total(idle) == 0 and idle[-1][3]["truncated"]
    obs, r, done, _ = envs.make_env("tau", TAU).step('[answer] {"name": "drop_all_tables", "arguments": {}}')
    assert obs.startswith("Error: unknown tool") and r == 0 and not done
    with pytest.raises(ValueError, match="different database"):
        envs.make_env("tau", {**TAU, "db_sha": "0000"})


def test_search_episode_limits_and_backends(monkeypatch):
    env = envs.make_env("search", SEARCH)
    assert env.reset().startswith(SEARCH["question"])
    steps = expert_episode(env, random.Random(0))  # (text, observation, reward, done, info)
    assert steps[0][1].startswith("1. ") and steps[-1][2] == 1.0 and env.episode_score() == 1.0
    bad = play(envs.make_env("search", SEARCH, max_turns=4), [f"[answer] {SEARCH['answer']} or Paris"] * 9)
    assert total(bad) == 0 and bad[-1][3]["truncated"]
    few = play(envs.make_env("search", SEARCH, max_searches=2), ["[search] a", "[search] b", "[search] c"])
    assert "used all 2 searches" in few[-1][0]
    assert "not allowed" in envs.make_env("search", SEARCH).step("[action] what do you think?")[0]

    class Canned:  # any object with search(query) is a backend
        def search(self, query):
            return [{"title": "Almanac", "snippet": f"About {query}: the answer is {SEARCH['answer']}."}]

    steps = play(envs.make_env("search", SEARCH, backend=Canned()), ["[search] who?", f"[answer] {SEARCH['answer']}"])
    assert steps[0][0].startswith("1. Almanac\nAbout who?") and steps[-1][1] == 1.0
    monkeypatch.delenv("NO_SERPER_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SERPER_KEY"):
        envs.make_env("search", SEARCH, backend="serper", backend_options={"api_key_env": "NO_SERPER_KEY"})
    with pytest.raises(ValueError, match="unknown search backend"):
        envs.make_env("search", SEARCH, backend="bing")


def test_search_gym_queries_a_web_search_api_on_loopback(monkeypatch):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.headers.get("X-API-KEY"), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            data = json.dumps({"organic": [{"title": "Web page", "snippet": "A snippet from the web."}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_SERPER_KEY", "k-123")
        env = envs.make_env("search", SEARCH, backend="serper", backend_options={
            "url": f"http://127.0.0.1:{server.server_port}/search", "api_key_env": "TEST_SERPER_KEY"})
        env.reset()
        obs, r, done, _ = env.step("[search] river towns")
    finally:
        server.shutdown()
        server.server_close()
    assert obs.startswith("1. Web page\nA snippet from the web.") and seen == [("k-123", {"q": "river towns", "num": 5})]


def test_episode_score_is_the_sum_of_turn_rewards_per_episode_and_eval_mode_hides_the_reward():
    env = envs.make_env("intention", INTENT)
    assert env.episode_score() == 0.0
    play(env, ["[action] Which language?", "[action] Which formats, and do you want a backup?"])
    assert env.episode_score() == pytest.approx(1.5)  # intention's sum can exceed 1, as in the paper
    play(env, ["[action] Which language?"])  # reset starts a new episode
    assert env.episode_score() == pytest.approx(0.7)
    assert "Reward" not in envs.make_env("function", FUNC, eval_mode=True).step("[search] test")[0]
    assert "Reward: 0.0" in envs.make_env("function", FUNC, eval_mode=True, show_reward=True).step("[search] test")[0]
    assert "Reward" not in envs.make_env("function", FUNC, show_reward=False).step("[search] test")[0]


def test_tool_backed_task_files_and_their_sizes():
    sizes = {g: tuple(len(envs.load_tasks(g, split)) for split in ("train", "test")) for g in ("travel", "tau", "search")}
    assert sizes == {"travel": (300, 100), "tau": (150, 50), "search": (200, 80)}
    for gym in ("travel", "tau", "search"):
        train, test = (envs.load_tasks(gym, split) for split in ("train", "test"))
        assert not {t["id"] for t in train} & {t["id"] for t in test}
        for task in train[:3] + test[:3]:
            envs.make_env(gym, task)  # every required field is there


# Original UserRL data for the tool-backed gyms. The travel layout follows the original's preprocessing (one
# object of scenarios per structure file, per dimension: preferences, arguments, options by kind, ids).

def original_travel_scenario(i):
    def option(oid, kind, price):
        return {"id": oid, "price": price, "type": kind, "reason": "annotation the agent must not see"}

    return {"scenario": "A weekend in Rome.", "initial_description": "I need a flight from Oslo to Rome on 2025-05-02 "
            "and a rental car in Rome that day.", "dimensions": ["flight", "rental_car"], "wanted_num": "22",
            "flight": {"preferences": [["flight", "time", "Departs after 9.", "Mornings are hard for me.", "extra"],
                                       ["flight", "stops", "Nonstop.", "I hate changing planes."]],
                       "arguments": {"origin": "Oslo", "destination": "Rome", "date": "2025-05-02"},
                       "options": {"correct": [option("F1", "correct", 300), option("F2", "correct", 250)],
                                   "wrong": [option(f"F{i + 3}", "wrong", 100)], "noise": [option("F99", "noise", 90)]},
                       "correct_ids": ["F1", "F2"], "best_id": "F2"},
            "rental_car": {"preferences": [["rental_car", "gear", "Automatic.", "I never learned to use a clutch."],
                                           ["rental_car", "seats", "Seven seats.", "We are seven."]],
                           "arguments": {"city": "Rome", "pickup_date": "2025-05-02", "days": 3},
                           "options": {"correct": [option("C5", "correct", 60)], "wrong": [option("C6", "wrong", 40)],
                                       "noise": []},
                           "correct_ids": ["C5"], "best_id": "C5"}}


def test_original_travel_files(tmp_path):
    (tmp_path / "travelgym_data_22.json").write_text(json.dumps({f"flight:2-{i}|rental_car:2-{i}": original_travel_scenario(i)
                                                                for i in range(20)}))
    train, test = (envs.load_tasks("travel", split, data_dir=tmp_path) for split in ("train", "test"))
    assert (len(train), len(test)) == (17, 3) and not {t["id"] for t in train} & {t["id"] for t in test}  # 85 / 15
    task = train[0]
    assert [a["aspect"] for a in task["aspects"]] == ["flight", "car"] and task["structure"] == "22"
    flight = task["aspects"][0]
    assert sorted(o["id"] for o in flight["options"])[:2] == ["F1", "F2"] and "type" not in flight["options"][0]
    assert flight["preferences"][0]["hint"] == "Mornings are hard for me." and "cheapest" in task["request"]
    assert task["aspects"][1]["arguments"]["days"] == "3"
    # With the scripted user the original preferences (no keywords) are only volunteered; the gym still plays.
    env = envs.make_env("travel", task)
    steps = play(env, ["[search] flight from Oslo to Rome on May 2", "[action] Any news?", "[action] Nice weather.",
                       "[action] How are you?", "[answer] F2", "[answer] C5"])
    assert '"id":"F1"' in steps[0][0] and "mornings are hard for me" in steps[3][0]  # volunteered
    assert steps[-1][2] and env.episode_score() == 1.0
    broken = original_travel_scenario(0)
    broken["flight"]["best_id"] = "F42"
    (tmp_path / "travelgym_data_33.json").write_text(json.dumps({"flight:3-1": broken}))
    with pytest.raises(ValueError, match="travelgym_data_33.json: scenario 'flight:3-1'.*best_id"):
        envs.load_tasks("travel", "train", data_dir=tmp_path)
    (tmp_path / "travelgym_data_33.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="travelgym_data_33.json: not valid JSON"):
        envs.load_tasks("travel", "test", data_dir=tmp_path)
    with pytest.raises(envs.TaskDataError, match="travelgym_data_22.json.*nowhere does not exist"):
        envs.load_tasks("travel", "train", data_dir=tmp_path / "nowhere")


def test_original_tau_and_search_data(tmp_path):
    with pytest.raises(ValueError, match="tau-bench's own retail and airline databases"):
        envs.load_tasks("tau", "test", data_dir=tmp_path)
    (tmp_path / "questions.json").write_text(json.dumps([
        {"id": "Bamboogle-1", "question": "Who was the first person to walk on the moon?", "answer": "neil armstrong"},
        {"id": "Bamboogle-2", "question": "In what year did the Berlin Wall fall?", "answer": 1989},
        {"id": "Other-1", "question": "Not part of the paper's evaluation.", "answer": "x"}]))
    tasks = envs.load_tasks("search", "test", data_dir=tmp_path)
    assert [t["id"] for t in tasks] == ["Bamboogle-1", "Bamboogle-2"] and tasks[1]["answer"] == "1989"
    with pytest.raises(ValueError, match="evaluation only"):
        envs.load_tasks("search", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="backend='serper'"):
        envs.make_env("search", tasks[0])  # the web questions have no local corpus

    class Web:
        def search(self, query):
            return [{"title": "Apollo 11", "snippet": "Neil Armstrong stepped onto the moon in 1969."}]

    steps = play(envs.make_env("search", tasks[0], backend=Web()), ["[search] first moon walk", "[answer] Neil Armstrong."])
    assert steps[-1][1] == 1.0


# ----------------------------------------------------------------------------------------------------------
# Fuzz: nothing the agent writes raises or runs


def adversarial_turns(rng: random.Random, marker: Path) -> list[str]:
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    fixed = [
        "", " ", "[answer]", "[action]   ", "[search]", "[finish]", "[ANSWER] 16", "[bogus] x", "answer: 16",
        "<tool_call>", "<tool_call>{", "<tool_call>{}</tool_call>", "<tool_call>null</tool_call>",
        '<tool_call>{"name": "interact_with_env", "arguments": "{not json"}</tool_call>',
        '<tool_call>{"name": "interact_with_env", "arguments": {"choice": 5, "content": []}}</tool_call>',
        '<tool_call>{"name": "interact_with_env", "arguments": {"choice": "answer", "content": "' + "9" * 5000 + '"}}</tool_call>',
        '<tool_call>{"name": "x", "arguments": {}, "n": ' + "1" * 5000 + "}</tool_call>",
        "<tool_call>" + "[" * 100_000 + "</tool_call>", "[action] " + "a " * 200_000, "[answer] " + "{" * 10_000,
        f"[action] {code}", f"[answer] {code}", f"[search] {code}", code, "[action] {task} {0} {{}}",
        "[action] nan nan nan nan", "[action] -0 -0 -0 -0", "[action] 1e308 1e308 1e308 1e308",
        "[action] 10 10 10 10", "[answer] 1e-400", "[action] \x00\x01\x02", "[answer] \u202e\ufeff\U0001f600 ñ 中文",
        "<think>" * 1000, "<think>unclosed [answer] 3", "[action] " + "\n" * 5000,
        '<tool_call>{"name": "interact_with_env", "arguments": {"choice": "finish", "content": ""}}</tool_call>',
    ]
    alphabet = "[]{}()<>\"':,\\/*-+.0123456789 abcdyesno\n\t_é中\U0001f600" + "actionsearchanswerfinish"
    randoms = []
    for _ in range(220):
        prefix = rng.choice(["", "[action] ", "[answer] ", "[search] ", '<tool_call>{"name": "interact_with_env", "arguments": '])
        randoms.append(prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))))
    return fixed + randoms


@pytest.mark.parametrize("gym", EIGHT)
def test_fuzz_agent_text_never_raises_or_executes(gym, tmp_path):
    task = TASKS[gym]
    marker = tmp_path / "pwned"
    turns = adversarial_turns(random.Random(gym), marker)
    assert len(turns) > 250
    episodes = 0
    env = envs.make_env(gym, task, malformed="retry")  # episodes alternate: malformed calls answered / ending them
    env.reset()
    for text in turns:
        obs, reward, done, info = env.step(text)
        assert isinstance(obs, str) and isinstance(reward, float) and isinstance(done, bool) and isinstance(info, dict)
        assert 0.0 <= reward <= (len(task["aspects"]) if gym == "travel" else 1.0)  # a travel answer may pick several
        assert isinstance(env.episode_score(), float)
        if done:
            episodes += 1
            env = envs.make_env(gym, task, malformed=("end", "retry")[episodes % 2])
            env.reset()
    assert not marker.exists()


def test_too_long_content_is_refused_before_it_reaches_the_user():
    obs, reward, done, info = envs.make_env("turtle", TURTLE).step("[answer] " + "x" * (envs.MAX_CONTENT_CHARS + 1))
    assert "too long" in obs and reward == 0 and not done


def test_reward_line_and_truncation():
    env = envs.make_env("telepathy", TELE, max_turns=2)
    env.reset()
    obs, _, done, info = env.step("[action] Is it a pet?")
    assert obs == "No\nReward: 0.0" and not done
    obs, _, done, info = env.step("[action] Is it a bird?")
    assert done and info["truncated"]


# ----------------------------------------------------------------------------------------------------------
# Original UserRL data for the dialogue gyms (field layouts from the issue; hand-written records)


def test_original_dialogue_data_loaders(tmp_path):
    def write(name, records):
        (tmp_path / name).write_text(json.dumps(records))

    write("all_entities_refined.json", [{"id": f"e{i}", "title": "t", "description": "A striped horse.", "goal": "g",
                                         "target_entity": "zebra", "category": "animal"} for i in range(20)])
    # TurtleGym's file is an object keyed by story id, and the original plays only stories judged "Yes"
    write("all_stories_refined.json", {str(i): {"new_title": f"S{i}", "new_surface": "s", "new_bottom": "b",
                                                "judgment": "No" if i == 3 else "Yes", "evaluation": [
                                                    {"statement": "x", "score": 0.7}, {"statement": "y", "score": 0.3}]}
                                       for i in range(20)})
    write("all_intentions_train.json", [{"id": "u1", "category": "c", "task": "Do it.", "missing_details": [
        {"description": "d", "importance": "2", "inquiry": "q?", "options": ["a", "b", "c"]}]}])
    write("all_intentions_test.json", [])
    write("all_statements_refined.json", [{"id": "GXQ", "claim": "c", "argument": "a"}])
    tele = envs.load_tasks("telepathy", "train", data_dir=tmp_path) + envs.load_tasks("telepathy", "test", data_dir=tmp_path)
    assert len(tele) == 20 and len(envs.load_tasks("telepathy", "test", data_dir=tmp_path)) == 2
    assert tele[0]["entity"] == "zebra" and tele[0]["attributes"] == {"yes": [], "no": []}
    turtles = [t for split in ("train", "test") for t in envs.load_tasks("turtle", split, data_dir=tmp_path)]
    assert sorted(int(t["id"]) for t in turtles) == [i for i in range(20) if i != 3]
    turtle = turtles[0]
    assert [c["weight"] for c in turtle["criteria"]] == [0.7, 0.3] and turtle["title"] == f"S{turtle['id']}"
    intent = envs.load_tasks("intention", "train", data_dir=tmp_path)
    assert intent[0]["missing_details"][0]["importance"] == 2 and envs.load_tasks("intention", "test", data_dir=tmp_path) == []
    assert envs.load_tasks("persuade", "train", data_dir=tmp_path) == []  # one record: it goes to test
    assert envs.load_tasks("persuade", "test", data_dir=tmp_path)[0]["claim"] == "c"
    for gym, task in [("telepathy", tele[0]), ("turtle", turtle), ("intention", intent[0])]:
        env = envs.make_env(gym, task)
        assert env.reset() and isinstance(env.step("[action] is it?")[0], str)  # plays, earning nothing by keywords
    write("all_statements_refined.json", [{"id": "GXQ", "claim": "c"}])
    with pytest.raises(ValueError, match="record 0 does not have the original persuade layout.*argument"):
        envs.load_tasks("persuade", "train", data_dir=tmp_path)
    with pytest.raises(envs.TaskDataError, match="functions.json or functiongym-functions.json in data_dir; .* holds"):
        envs.load_tasks("function", "train", data_dir=tmp_path)
    shutil.copy(TESTS_DATA / "functiongym-functions.json", tmp_path / "functions.json")  # the original's own name
    assert len(envs.load_tasks("function", "train", data_dir=tmp_path)) == 484


# ----------------------------------------------------------------------------------------------------------
# The original's rules, each on a hand-made case


def call(choice, content):
    """One tool call as a policy writes it."""
    return "<tool_call>\n" + json.dumps({"name": "interact_with_env",
                                         "arguments": {"choice": choice, "content": content}}) + "\n</tool_call>"


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "interact_with_env", "arguments": {"choice": "answer", "content": "16"\n</tool_call>',
    '<tool_call>\n{"name": "calculator", "arguments": {"choice": "answer", "content": "16"}}\n</tool_call>',
    '<tool_call>\n{"name": "interact_with_env", "arguments": "[answer] 16"}\n</tool_call>'])
def test_a_malformed_tool_call_ends_the_episode_unless_retry(text):
    env = envs.make_env("function", FUNC)  # the original's rule is the default
    env.reset()
    obs, r, done, info = env.step(text)
    assert done and r == 0 and info["end_reason"] == "malformed_call" and info["malformed_call"]
    assert obs.startswith("Error") and "ends" in obs and not info.get("truncated")
    retry = envs.make_env("function", FUNC, malformed="retry")
    retry.reset()
    obs, r, done, info = retry.step(text)
    assert obs.startswith("Error") and r == 0 and not done and "end_reason" not in info
    assert retry.step(call("answer", "16"))[1:3] == (1.0, True)
    with pytest.raises(ValueError, match="malformed"):
        envs.make_env("function", FUNC, malformed="ignore")


def test_mistakes_that_are_not_malformed_calls_never_end_the_episode():
    env = envs.make_env("function", FUNC)
    env.reset()
    # no tool call at all (the rollout ends that episode, not the env), an unknown choice, empty content, a
    # content the gym refuses: each an error observation, reward 0, and the episode goes on
    for text in ["I think it is 16.", call("guess", "16"), call("Answer", "16"), call(3, "16"), call("answer", ""),
                 call("search", "the rule"), call("action", "1 2"),
                 call("answer", None).replace(', "content": null', "")]:  # no content at all: as ""
        obs, r, done, info = env.step(text)
        assert obs.startswith("Error") and r == 0 and not done and "end_reason" not in info, text
    assert env.step("I think it is 16.")[3]["missing_tool_call"]
    refused = envs.make_env("search", SEARCH)  # the original's SearchGym refuses an [action] too
    obs, r, done, info = refused.step(call("action", "What do you think?"))
    assert "not allowed" in obs and not done and "end_reason" not in info


def test_tool_arguments_are_read_as_strings_as_the_original_tool_reads_them():
    env = envs.make_env("function", FUNC, show_reward=False)
    env.reset()
    obs, r, done, _ = env.step(call("answer", 0))  # a number is its text: "0" is a wrong answer, not an empty one
    assert r == 0 and not done and "empty" not in obs
    assert env.step(call("answer", 16))[1:3] == (1.0, True)
    turtle = envs.make_env("turtle", TURTLE, show_reward=False)  # an unknown choice plays as the gym's default
    turtle.reset()
    obs, r, done, info = turtle.step(call("Answer", "Was it raining?"))
    assert info["choice"] == "Answer" and not obs.startswith("Error") and not done


def test_evaluation_runs_only_the_first_call_of_a_turn():
    env = envs.make_env("intention", INTENT, eval_mode=True)
    env.reset()
    obs, r, done, info = env.step(call("action", "Which formats?") + call("action", "Which language?"))
    assert "calls" not in info and len(env.remaining) == 2 and r == pytest.approx(1.0) and obs == "JPEG only."


def test_several_calls_in_one_turn_all_run_and_the_last_reward_counts():
    env = envs.make_env("intention", INTENT, show_reward=False)
    env.reset()
    obs, r, done, info = env.step(call("action", "Which formats?") + call("action", "Which language?"))
    assert info["calls"] == 2 and len(env.remaining) == 1  # both questions ran (1.0 and 0.7 earned) ...
    assert r == pytest.approx(0.7) and env.rewards == [pytest.approx(0.7)]  # ... and the turn keeps the last reward
    assert obs == "JPEG only.\n\nPython."
    # A broken call beside usable ones is dropped; a call after the one that ends the episode does not run.
    func = envs.make_env("function", FUNC, show_reward=False)
    func.reset()
    obs, r, done, info = func.step(call("search", "test") + "<tool_call>{broken</tool_call>" + call("answer", "16")
                                   + call("answer", "0"))
    assert done and r == 1.0 and info["calls"] == 3 and obs == "The test case is [3, 7, 2, 5].\n\nCorrect!"


def test_travel_ends_only_when_every_best_option_is_chosen():
    best = [a["best_id"] for a in TRAVEL["aspects"]]
    wrong = TRAVEL["aspects"][0]["wrong_ids"][0]
    env = envs.make_env("travel", TRAVEL, max_turns=len(best) + 1)
    env.reset()
    steps = [env.step(f"[answer] {wrong}")] + [env.step(f"[answer] {i}") for i in best[1:]]
    assert not any(done for _, _, done, _ in steps)  # every aspect has a choice, but one is not the best
    obs, r, done, info = env.step("[action] Anything else?")
    assert done and info["truncated"] and r == 0  # ... so only the turn limit ends it
    finished = envs.make_env("travel", TRAVEL)
    finished.reset()
    finished.step(f"[answer] {wrong}")
    obs, r, done, info = finished.step("[finish]")
    assert done and r == 0 and not info.get("truncated")
    split = envs.make_env("travel", TRAVEL)  # the best options over two answers: done at the second
    split.reset()
    assert not split.step(f"[answer] {best[0]}")[2]
    assert split.step("[answer] " + ", ".join(best[1:]))[2] and split.episode_score() == 1.0


def test_tau_pays_only_when_the_tau_episode_is_done():
    transfer = play(envs.make_env("tau", TAU), tau_turns(TAU, report=False)
                    + [tool_call("transfer_to_human_agents", summary="handled")])
    assert transfer[-1][2] and transfer[-1][1] == 1.0  # a transfer is an end: tau-bench's reward is paid
    early = play(envs.make_env("tau", TAU), [tool_call("transfer_to_human_agents", summary="help")])
    assert early[-1][2] and total(early) == 0
    assert total(play(envs.make_env("tau", TAU, max_turns=3), ["[finish]"])) == 0


def test_turtle_a_perfect_story_ends_the_puzzle_despite_float_weights():
    task = {"id": "w", "title": "t", "surface": "s", "bottom": "alpha beta gamma",
            "criteria": [{"statement": s, "weight": w, "keywords": [[s]]}
                         for s, w in [("alpha", 0.7), ("beta", 0.2), ("gamma", 0.1)]]}
    assert 0.7 + 0.2 + 0.1 < 1.0  # 0.9999999999999999: the original's `score >= 1.0` never ends this puzzle
    obs, r, done, info = envs.make_env("turtle", task, show_reward=False).step("[answer] alpha beta gamma")
    assert done and r == pytest.approx(1.0) and info["score"] < 1.0
    assert obs == "Points you have right: alpha beta gamma You solved it!"  # no numeric score, as in the original
    obs = envs.make_env("turtle", task, show_reward=False).step("[answer] delta")[0]
    assert obs == "None of the key points is right yet. Something is still missing: keep asking."


def test_a_choice_the_gym_does_not_offer_is_played_as_the_original_plays_it():
    def first(gym, task, text):
        return envs.make_env(gym, task, show_reward=False).step(text)

    assert first("telepathy", TELE, "[search] Is it a mammal?")[0] == "Yes"  # a question
    assert first("turtle", TURTLE, "[search] Was it his son?")[0] == "Yes"
    intent = envs.make_env("intention", INTENT, show_reward=False)
    intent.reset()
    assert intent.step("[answer] Which language?")[:2] == ("Python.", pytest.approx(0.7))
    argue = envs.make_env("persuade", PERSUADE, show_reward=False)
    argue.reset()
    assert argue.step("[action] Think of reading at home.")[1] == pytest.approx(2 / 6)  # an argument


# ----------------------------------------------------------------------------------------------------------
# Task data validated when loaded


def test_task_files_are_checked_record_by_record(tmp_path, monkeypatch):
    monkeypatch.setattr(envs, "DATA_DIR", tmp_path)
    (tmp_path / "function").mkdir()
    path = tmp_path / "function" / "train.jsonl"
    cases = [("{broken", "not valid JSON"),
             (json.dumps({k: v for k, v in FUNC.items() if k != "rule"}), "missing field 'rule'"),
             (json.dumps({**FUNC, "test_case": "3 7 2 5"}), "field 'test_case' must be a list, not str"),
             (json.dumps({**FUNC, "expected_result": True}), "field 'expected_result' must be a number, not bool"),
             (json.dumps({**FUNC, "test_case": [1, 2]}), "field 'test_case' must be four numbers"),
             (json.dumps({**FUNC, "rule": "a + import"}), r"field 'rule': rule 'a \+ import'"),
             ("[1, 2]", "a task must be a JSON object")]
    for line, message in cases:
        path.write_text(json.dumps(FUNC) + "\n\n" + line + "\n")
        with pytest.raises(envs.TaskDataError, match=f"{path}, line 3.*{message}"):
            envs.load_tasks("function", "train")
    path.write_text(json.dumps(FUNC) + "\n")
    assert envs.load_tasks("function", "train") == [FUNC]
    with pytest.raises(envs.TaskDataError, match="test.jsonl: no such task file"):
        envs.load_tasks("function", "test")
    (tmp_path / "turtle").mkdir()
    broken = {**TURTLE, "criteria": [{"statement": "x", "weight": "half"}]}
    (tmp_path / "turtle" / "test.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(envs.TaskDataError, match="line 1 .turtle task 'u'.: field 'criteria': item 0"):
        envs.load_tasks("turtle", "test")
    assert issubclass(envs.TaskDataError, ValueError)


def test_original_files_are_checked_when_loaded(tmp_path):
    records = json.loads((TESTS_DATA / "functiongym-functions.json").read_text())
    records[7]["rule"] = "a + * b"
    (tmp_path / "functions.json").write_text(json.dumps(records))
    bad_rule = r"functions.json: record 7 \('func-8'\): field 'rule': rule 'a \+ \* b'"
    with pytest.raises(envs.TaskDataError, match=bad_rule):
        envs.load_tasks("function", "test", data_dir=tmp_path)  # at load time, whichever split holds it
    (tmp_path / "all_stories_refined.json").write_text(json.dumps([{"new_title": "S", "new_surface": "s",
                                                                    "new_bottom": "b", "evaluation": "none"}]))
    with pytest.raises(envs.TaskDataError, match="all_stories_refined.json: record 0 does not have the original turtle"):
        envs.load_tasks("turtle", "train", data_dir=tmp_path)
    expected = r"all_intentions_train.json in data_dir; .* holds \['all_stories_refined"
    with pytest.raises(envs.TaskDataError, match=expected):
        envs.load_tasks("intention", "train", data_dir=tmp_path)  # the wrong layout names what it expected there


# ----------------------------------------------------------------------------------------------------------
# Experts: oracles that play each gym the way a good agent would


def expert_episode(env, rng):
    env.reset()
    steps = []
    while not steps or not steps[-1][3]:  # (text, observation, reward, done, info)
        text = env.expert_action(rng)
        assert text.startswith("<think>\n") and text.count("<tool_call>") == 1 and len(envs.parse_actions(text)) == 1
        steps.append((text, *env.step(text)))
    return steps


def full_reward(gym, task):
    """What the best episode earns: 1 (function, telepathy, persuade, tau, search; travel: its score, every best
    option chosen), the criteria's weights (turtle), every detail asked about on its own (intention)."""
    if gym == "turtle":
        return sum(c["weight"] for c in task["criteria"])
    if gym == "intention":
        return sum({3: 1.0, 2: 0.7, 1: 0.4}[d["importance"]] for d in task["missing_details"])
    return 1.0


@pytest.mark.parametrize("gym", EIGHT)
def test_the_expert_reaches_full_reward_on_every_shipped_task(gym):
    """The project's data and the scripted rules agree: on every task of both splits, in training and evaluation
    settings, the expert ends the episode (never by the turn limit) with the gym's full reward."""
    for split in ("train", "test"):
        for k, task in enumerate(envs.load_tasks(gym, split)):
            for eval_mode in (False, True):
                env = envs.make_env(gym, task, eval_mode=eval_mode)
                steps = expert_episode(env, random.Random(k))
                assert not steps[-1][4].get("truncated"), (gym, task["id"], eval_mode)
                assert env.episode_score() == pytest.approx(full_reward(gym, task), abs=1e-9), (gym, task["id"])
                assert env.max_score() == pytest.approx(full_reward(gym, task), abs=1e-9)
                if gym == "travel":
                    chosen = {a: choice[0] for a, choice in env.session.chosen.items()}
                    assert chosen == {a["aspect"]: a["best_id"] for a in task["aspects"]}


def transcript(gym, task, seed):
    return tuple(text for text, *_ in expert_episode(envs.make_env(gym, task), random.Random(seed)))


@pytest.mark.parametrize("gym", EIGHT)
def test_the_expert_varies_with_its_seed(gym):
    tasks = envs.load_tasks(gym, "test")[:3]
    assert [transcript(gym, t, 0) for t in tasks] != [transcript(gym, t, 1) for t in tasks]
    assert transcript(gym, tasks[0], 5) == transcript(gym, tasks[0], 5)
    assert len({transcript(gym, tasks[0], seed) for seed in range(8)}) >= 3  # many demonstrations per task


def test_expert_agent_plays_through_the_agent_interface():
    puzzle = envs.load_tasks("turtle", "test")[0]

    def run(agent):
        out = []
        for env in [envs.make_env("turtle", puzzle), envs.make_env("turtle", puzzle), envs.make_env("function", FUNC)]:
            env.reset()
            messages, done = [{"role": "user", "content": "go"}], False
            while not done:
                reply = agent.complete(messages, [envs.TOOL_SCHEMA], env=env)
                assert reply["role"] == "assistant"
                obs, _, done, _ = env.step(reply["content"])
                messages += [reply, {"role": "tool", "content": obs}]
            out.append((messages, env.episode_score()))
        return out

    first = run(envs.ExpertAgent(seed=3))
    assert [score for _, score in first] == [1.0, 1.0, 1.0]
    assert run(envs.ExpertAgent(seed=3)) == first  # a seed gives the same episodes
    assert len({json.dumps(m) for m, _ in run(envs.ExpertAgent(seed=4)) + first}) > 3  # and another seed others
    with pytest.raises(ValueError, match="env=env"):
        envs.ExpertAgent(0).complete([], [envs.TOOL_SCHEMA])


# ----------------------------------------------------------------------------------------------------------
# Import order: gyms/<name>.py and envs.py import each other; every order works, in a fresh process


PLAY_EVERY_GYM = """
for name in envs.GYMS:
    task = envs.load_tasks(name, "test")[0]
    env = envs.make_env(name, task, user=user)
    env.reset()
    rng, done = random.Random(0), False
    while not done:
        done = env.step(env.expert_action(rng))[2]
    assert env.episode_score() == env.max_score() > 0, name
print("ok")
"""


@pytest.mark.parametrize("imports", [
    "import gyms.travel\nimport envs\nassert envs.GYMS['travel'] is gyms.travel.TravelGym",
    "import envs\nimport gyms.tau\nassert envs.GYMS['tau'] is gyms.tau.TauGym",
    "from gyms import search\nimport envs\nassert envs.GYMS['search'] is search.SearchGym",
])
def test_any_import_order_works_and_the_scripted_user_needs_none(imports):
    # the scripted user is made before any gym is imported: it runs the rules the gyms hand it
    code = "import random\nimport users\nuser = users.make_user('scripted')\n" + imports + PLAY_EVERY_GYM
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_the_readme_example_of_a_new_gym_runs(monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = text[text.index("# gyms/echo.py"):]
    namespace = {}
    exec(code[:code.index("```")], namespace)
    monkeypatch.setitem(envs.GYMS, "echo", namespace["EchoGym"])
    env = envs.make_env("echo", {"id": "e", "word": "lantern"})
    steps = play(env, ["[answer] kettle", env.expert_action(random.Random(0))])
    assert [r for _, r, _, _ in steps] == [0.0, 1.0] and steps[-1][2]
    with pytest.raises(ValueError, match="missing field 'word'"):
        envs.make_env("echo", {"id": "e"})
