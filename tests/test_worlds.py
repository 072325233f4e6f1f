"""The worlds behind the tool-backed gyms: travel scenarios, the retail store, the search corpus and backends.

Generation is deterministic and matches the shipped files; ground truth is consistent; every mechanic a gym
wrapper relies on (judging, failures, repeats, rewards, tool errors, ranking, the remote client) behaves.
"""
import json

import pytest

import travel

# ----------------------------------------------------------------------------------------------------------
# helpers


class Rules:
    """A stand-in for the scripted user: dispatches a role to the rule a world module registers for it."""

    def __init__(self, roles):
        self.roles = roles
        self.calls = []

    def act(self, role, messages, **facts):
        assert isinstance(messages, list) and messages and all("content" in m for m in messages)
        self.calls.append(role)
        return self.roles[role](**facts)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------
# TravelGym


@pytest.fixture(scope="module")
def travel_tasks():
    return {split: read(travel.DATA_DIR / f"{split}.jsonl") for split in travel.SPLITS}


def test_travel_files_are_the_generators_output(travel_tasks):
    for split in travel.SPLITS:
        shipped = (travel.DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
        assert travel.dumps(travel.generate(split)) == shipped, f"data/travel/{split}.jsonl: run python travel.py"
    ids = [t["id"] for split in travel_tasks.values() for t in split]
    assert len(ids) == len(set(ids)) and len(travel_tasks["train"]) >= 200 and len(travel_tasks["test"]) >= 80


def test_travel_ground_truth(travel_tasks):
    for t in travel_tasks["train"] + travel_tasks["test"]:
        assert 2 <= len(t["aspects"]) <= 4 and len({a["aspect"] for a in t["aspects"]}) == len(t["aspects"])
        assert t["best_ids"] == [a["best_id"] for a in t["aspects"]]
        for a in t["aspects"]:
            prefs, opts = a["preferences"], {o["id"]: o for o in a["options"]}
            spec = travel.ASPECTS[a["aspect"]]
            assert 1 <= len(prefs) <= 4 and len({p["attr"] for p in prefs}) == len(prefs)
            assert set(a["arguments"]) == set(spec.args)
            assert all(oid[0] == spec.letter and oid[1:].isdigit() for oid in opts)
            assert set(a["correct_ids"]) | set(a["wrong_ids"]) | set(a["noise_ids"]) == set(opts)
            for oid in a["correct_ids"]:
                assert travel.misses(prefs, opts[oid]) == []
            for oid in a["wrong_ids"] + a["noise_ids"]:
                assert travel.misses(prefs, opts[oid]), f"{t['id']} {oid} meets every preference"
            prices = [o["price"] for o in opts.values()]
            assert len(set(prices)) == len(prices)
            best = min(a["correct_ids"], key=lambda i: opts[i]["price"])
            assert a["best_id"] == best
            # every preference matters: a cheaper option fails that preference alone
            for p in prefs:
                assert any(travel.misses(prefs, o) == [p["id"]] and o["price"] < opts[best]["price"]
                           for o in opts.values())
            # the user's hint is never empty and the keywords can be matched by the scripted judge
            assert all(p["hint"] and travel.mentions(" ".join(p["keywords"]), p["keywords"]) for p in prefs)
        for a in t["aspects"]:  # the vague opening states every search argument, but no preference
            assert all(travel.states(t["request"], v) for v in a["arguments"].values())
        assert "cheapest" in t["request"]


def test_travel_generation_is_deterministic():
    import random

    a = travel.make_scenario(random.Random(7), "x")
    b = travel.make_scenario(random.Random(7), "x")
    c = travel.make_scenario(random.Random(8), "x")
    assert a == b and a != c


def well_formed_query(aspect, args):
    d = {k: travel.pretty_date(v) if k not in ("origin", "destination", "city") else v for k, v in args.items()}
    return {"flight": "flight from {origin} to {destination} on {date}",
            "hotel": "hotel in {city} from {check_in} to {check_out}",
            "apartment": "apartment in {city} from {check_in} to {check_out}",
            "car": "rental car in {city} from {pickup_date} to {return_date}",
            "restaurant": "restaurant in {city} on {date}"}[aspect].format(**d)


def play_travel(task, good=True):
    user = Rules(travel.ROLES)
    s = travel.TravelSession(task, user)
    rewards = []
    for a in task["aspects"]:
        obs, r, done = s.search(well_formed_query(a["aspect"], a["arguments"]))
        if obs == travel.SEARCH_FAILED:
            obs, r, done = s.search(well_formed_query(a["aspect"], a["arguments"]))
        assert a["options"][0]["id"] in obs
        if good:
            for p in a["preferences"]:
                obs, r, done = s.talk(f"For the {a['aspect']}, how do you feel about {p['keywords'][0]}?")
                assert obs == p["hint"] and r == 0.8
                rewards.append(r)
    ids = [a["best_id"] if good else a["wrong_ids"][0] for a in task["aspects"]]
    obs, r, done = s.answer(", ".join(ids))
    return s, rewards + [r], done


def test_travel_good_and_bad_policies(travel_tasks):
    for task in travel_tasks["test"][:20]:
        s, rewards, done = play_travel(task, good=True)
        assert done and s.score() == 1.0 and rewards[-1] == len(task["aspects"])
        s, rewards, done = play_travel(task, good=False)
        assert done and s.score() == 0.0 and sum(rewards) == 0.0


def test_travel_search_rules():
    task = travel.make_scenario(__import__("random").Random(3), "t")
    s = travel.TravelSession(task, Rules(travel.ROLES), search_reward=0.2)
    a = task["aspects"][0]
    good = well_formed_query(a["aspect"], a["arguments"])
    other = task["aspects"][1]
    both = good + " and " + well_formed_query(other["aspect"], other["arguments"])
    assert s.search(both)[1] == 0.0 and "No results" in s.search(both)[0]  # two requests in one query
    missing_date = good.rsplit(" on ", 1)[0] if a["aspect"] in ("flight", "restaurant") else good.rsplit(" to ", 1)[0]
    assert "No results" in s.search(missing_date)[0]
    obs, r, _ = s.search(good)
    assert r == 0.2 and all(o["id"] in obs for o in a["options"])
    assert s.search(good) == (travel.SEARCH_FAILED, 0.0, False)  # the 5th search fails on purpose
    assert "already searched" in s.search(good)[0]
    if a["aspect"] == "flight":  # origin and destination swapped
        args = dict(a["arguments"], origin=a["arguments"]["destination"], destination=a["arguments"]["origin"])
        assert json.loads(travel.search_judge_rule(well_formed_query("flight", args), s.arguments))["aspect"] is None
    assert travel.dates_in("on 2025-04-10, Apr 11th, 12 April and the 13th of april") == {(4, 10), (4, 11), (4, 12), (4, 13)}


def test_travel_questions_and_volunteering():
    task = travel.make_scenario(__import__("random").Random(5), "t")
    s = travel.TravelSession(task, Rules(travel.ROLES))
    first = s.remaining[0]
    assert s.talk("What are your preferences?") == (travel.TOO_VAGUE, 0.0, False)
    assert s.talk("Lovely weather today!")[1] == 0.0
    held = {k for p in s.remaining for k in p["keywords"]}
    unheld = next(k for k in travel.ALL_KEYWORDS if not travel.mentions(k, held) and " " not in k)
    obs, r, _ = s.talk(f"Do you care about {unheld}?")
    assert r == 0.0 and obs.startswith(travel.NO_PREFERENCE) and first["hint"][1:] in obs  # 3rd quiet turn
    assert first not in s.remaining


def test_travel_answer_errors_and_one_choice_per_aspect():
    task = travel.make_scenario(__import__("random").Random(11), "t")
    s = travel.TravelSession(task, Rules(travel.ROLES))
    for bad in ["hotel please", "X12", "F12; DROP TABLE", "", "F1," * 20]:
        obs, r, done = s.answer(bad)
        assert obs.startswith("Error") and r == 0.0 and not done
    a, b = task["aspects"][0], task["aspects"][1]
    second_correct = [i for i in a["correct_ids"] if i != a["best_id"]][0]
    obs, r, done = s.answer(second_correct)
    assert r == 0.8 and not done
    obs, r, done = s.answer(a["best_id"])  # a second choice for the same aspect does not count
    assert r == 0.0 and "already chose" in obs
    assert not any(p["id"].startswith(a["aspect"] + ".") for p in s.remaining)
    s.answer(b["best_id"])
    assert s.score() == pytest.approx((0.8 + 1.0) / len(task["aspects"]))


def test_travel_llm_replies_are_parsed_leniently():
    class Fixed:
        def __init__(self, reply):
            self.reply = reply

        def act(self, role, messages, **facts):
            return self.reply

    task = travel.make_scenario(__import__("random").Random(2), "t")
    name = task["aspects"][0]["aspect"]
    s = travel.TravelSession(task, Fixed(f'<think>hmm {{</think>```json\n{{"aspect": "{name}"}}\n```'))
    assert task["aspects"][0]["options"][0]["id"] in s.search("anything")[0]
    for junk in ["no json here", "{broken", '{"aspect": ["x"]}', '["a"]']:
        s = travel.TravelSession(task, Fixed(junk))
        assert "No results" in s.search("q")[0]
