"""The gyms: full scripted episodes, reward rules, the safe rule evaluator, original-data loaders, and a fuzz
test that no agent text can crash a gym or run code."""
import json
import random
import shutil
from pathlib import Path

import pytest

import envs
import function_rules as fr
import search
import travel
import users

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
    for text, error in [("[action] 1 3 2 1", "test case itself"), ("[action] 1 2 3", "exactly four"),
                        ("[search] the rule", 'only "test"'), ("[answer] 1 or 2", "exactly one"),
                        ("[action] 1e999 1 1 1", "finite")]:
        obs, reward, done, info = env.step(text)
        assert error in obs and reward == 0 and not done and info["error"], text
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
    assert "not allowed" in envs.make_env("telepathy", TELE).step("[search] giraffe")[0]


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


def test_intention_rewards_by_importance_and_penalises_many_part_questions():
    steps = play(envs.make_env("intention", INTENT, show_reward=False),
                 ["[action] Which language?", "[action] Which language?", "[action] Which formats, and do you want a backup?"])
    assert steps[0][0] == "Python."  # the user answers only what was asked
    assert [r for _, r, _, _ in steps] == pytest.approx([0.7, 0.0, 0.8])  # 1.0 - 0.2 for the second detail
    assert steps[-1][2] and steps[-1][3]["covered"] == 2
    assert envs.clarification_reward([1, 1, 1, 1, 1, 1]) == 0.0 and envs.clarification_reward([]) == 0.0
    bad = play(envs.make_env("intention", INTENT, max_turns=4), ["[action] ok?", "[answer] done"] * 3)
    assert total(bad) == 0 and "not allowed" in bad[1][0]


def test_persuade_rewards_stance_moves_toward_disagreement():
    env = envs.make_env("persuade", PERSUADE, show_reward=False)
    steps = play(env, ["[answer] You are wrong.", "[answer] Think of reading at home.", "[answer] Reading again!",
                       "[answer] Habits matter, and a limit beats a ban."])
    assert [r for _, r, _, _ in steps] == pytest.approx([0, 2 / 6, 0, 4 / 6])
    assert steps[-1][0].endswith("(My stance: Strongly Disagree.)") and steps[-1][2]
    assert total(play(envs.make_env("persuade", PERSUADE, max_turns=3), ["[answer] Please change your mind."] * 5)) == 0
    assert envs.stance_reward(3, 1) == 0 and envs.stance_reward(1, 3) == pytest.approx(2 / 6)


@pytest.mark.parametrize("gym", ["function", "telepathy", "turtle", "intention", "persuade"])
def test_every_task_file_plays_to_a_reward_with_a_good_policy(gym):
    """The project's data and the scripted rules agree: a policy that knows the task earns reward on every task."""
    for split in ("train", "test"):
        for task in envs.load_tasks(gym, split):
            if gym == "function":
                turns = ["[search] test", f"[answer] {task['expected_result']}"]
            elif gym == "telepathy":
                turns = [f"[action] Is it {task['attributes']['yes'][0]}?", f"[answer] {task['entity']}"]
            elif gym == "turtle":
                turns = [f"[answer] {task['bottom']}"]
            elif gym == "intention":
                turns = [f"[action] {d['inquiry']}" for d in task["missing_details"]]
            else:
                turns = [f"[answer] {c['point']}" for c in task["counterpoints"]]
            assert total(play(envs.make_env(gym, task), turns)) > 0, (gym, task["id"])


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
    ('{"scores": [7, -3]}', 0.6), ('{"scores": [1]}', None), ("no idea", None), ('{"scores": [true, 1]}', None)])
def test_turtle_judge_outputs_are_parsed_or_fall_back_to_zero(text, reward):
    obs, r, done, info = envs.make_env("turtle", TURTLE, user=Canned(text)).step("[answer] a story")
    if reward is None:
        assert r == 0 and info["user_fallback"] and not done
    else:
        assert r == pytest.approx(reward) and "user_fallback" not in info


def test_llm_style_replies_for_every_role():
    assert envs.make_env("telepathy", TELE, user=Canned("**Yes.** It is.")).step("[action] tall?")[0].startswith("Yes")
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
    assert "backup" not in json.dumps(seen["intention.user"])  # the answering user never sees the detail list
    assert "backup" in seen["intention.evaluator"][0]["content"]
    play(envs.make_env("turtle", TURTLE, user=Spy()), ["[action] son?", "[answer] x"])
    assert TURTLE["bottom"] in seen["turtle.host"][0]["content"] and "The son passed" in seen["turtle.judge"][0]["content"]


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
    alphabet = "[]{}()<>\"':,\\/*-+.0123456789 abcdyesno\n\t_é中\U0001f600" + "".join(envs.CHOICES)
    randoms = []
    for _ in range(220):
        prefix = rng.choice(["", "[action] ", "[answer] ", "[search] ", '<tool_call>{"name": "interact_with_env", "arguments": '])
        randoms.append(prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))))
    return fixed + randoms


@pytest.mark.parametrize("gym, task", [("function", FUNC), ("telepathy", TELE), ("turtle", TURTLE),
                                       ("intention", INTENT), ("persuade", PERSUADE)])
def test_fuzz_agent_text_never_raises_or_executes(gym, task, tmp_path):
    marker = tmp_path / "pwned"
    turns = adversarial_turns(random.Random(gym), marker)
    assert len(turns) > 250
    env = envs.make_env(gym, task)
    env.reset()
    for text in turns:
        obs, reward, done, info = env.step(text)
        assert isinstance(obs, str) and isinstance(reward, float) and isinstance(done, bool) and isinstance(info, dict)
        assert 0.0 <= reward <= 1.0
        if done:
            env = envs.make_env(gym, task)
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
    write("all_stories_refined.json", [{"new_title": f"S{i}", "new_surface": "s", "new_bottom": "b",
                                        "evaluation": [{"statement": "x", "score": 0.7}, {"statement": "y", "score": 0.3}]}
                                       for i in range(20)])
    write("all_intentions_train.json", [{"id": "u1", "category": "c", "task": "Do it.", "missing_details": [
        {"description": "d", "importance": "2", "inquiry": "q?", "options": ["a", "b", "c"]}]}])
    write("all_intentions_test.json", [])
    write("all_statements_refined.json", [{"id": "GXQ", "claim": "c", "argument": "a"}])
    tele = envs.load_tasks("telepathy", "train", data_dir=tmp_path) + envs.load_tasks("telepathy", "test", data_dir=tmp_path)
    assert len(tele) == 20 and len(envs.load_tasks("telepathy", "test", data_dir=tmp_path)) == 2
    assert tele[0]["entity"] == "zebra" and tele[0]["attributes"] == {"yes": [], "no": []}
    turtle = envs.load_tasks("turtle", "train", data_dir=tmp_path)[0]
    assert [c["weight"] for c in turtle["criteria"]] == [0.7, 0.3] and turtle["title"] == turtle["id"]
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
    with pytest.raises(FileNotFoundError, match="functions.json"):
        envs.load_tasks("function", "train", data_dir=tmp_path)
    shutil.copy(TESTS_DATA / "functiongym-functions.json", tmp_path / "functions.json")  # the original's own name
    assert len(envs.load_tasks("function", "train", data_dir=tmp_path)) == 484
