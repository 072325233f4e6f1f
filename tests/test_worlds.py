"""The worlds behind the tool-backed gyms: travel scenarios, the retail store, the search corpus and backends.

Generation is deterministic and matches the shipped files; ground truth is consistent; every mechanic a gym
wrapper relies on (judging, failures, repeats, rewards, tool errors, ranking, the remote client) behaves.
"""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import users
from gyms import search, tau, travel

# ----------------------------------------------------------------------------------------------------------
# helpers


class Rules(users.ScriptedUser):
    """The scripted user, checking that every role gets a prompt an LLM could answer and recording the roles."""

    def __init__(self):
        self.calls = []

    def act(self, role, messages, rule=None, **facts):
        assert isinstance(messages, list) and messages and all("content" in m for m in messages)
        self.calls.append(role)
        return super().act(role, messages, rule=rule, **facts)


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
        assert travel.dumps(travel.generate(split)) == shipped, f"data/travel/{split}.jsonl: run python -m gyms.travel"
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
    user = Rules()
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
        s, rewards, done = play_travel(task, good=False)  # a wrong choice closes its aspect: the episode runs on
        assert not done and s.score() == 0.0 and sum(rewards) == 0.0


def test_travel_search_rules():
    task = travel.make_scenario(__import__("random").Random(3), "t")
    s = travel.TravelSession(task, Rules(), search_reward=0.2)
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
    written = "on 2025-04-10, Apr 11th, 12 April and the 13th of april"
    assert travel.dates_in(written) == {(4, 10), (4, 11), (4, 12), (4, 13)}
    assert travel.dates_in("May 3-7, june 1 to 4th, 8 - 9 July") == {(5, 3), (5, 7), (6, 1), (6, 4), (7, 8), (7, 9)}
    assert travel.dates_in("summer 10, mar, 2025-13") == set()


def test_travel_questions_and_volunteering():
    task = travel.make_scenario(__import__("random").Random(5), "t")
    s = travel.TravelSession(task, Rules())
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
    s = travel.TravelSession(task, Rules())
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
    # As the original: an id for an aspect already chosen, even earlier in the same answer, stops the answer and
    # zeroes it; the ids before it stay chosen, worth 0 in the score too.
    s = travel.TravelSession(task, Rules())
    obs, r, _ = s.answer(f"{b['best_id']}, {a['best_id']}, {second_correct}")
    assert r == 0.0 and "earns nothing" in obs and s.chosen[a["aspect"]] == (a["best_id"], 0.0)
    assert s.score() == 0.0 and b["aspect"] in s.chosen
    # As the original: a well-formed id that is not an option is a wrong choice for its aspect, which it closes.
    s = travel.TravelSession(task, Rules())
    unknown = a["best_id"][0] + "99999"
    obs, r, _ = s.answer(unknown)
    assert r == 0.0 and "wrong choice" in obs and s.chosen[a["aspect"]] == (unknown, 0.0)
    assert s.answer(a["best_id"])[1] == 0.0 and s.score() == 0.0


def test_travel_judge_and_llm_traveller_see_the_conversation_so_far():
    class Recording:  # answers as the rules do, and keeps the messages an LLM backend would get
        def __init__(self):
            self.calls = []

        def act(self, role, messages, rule=None, **facts):
            self.calls.append((role, messages))
            return rule(**facts)

    task = travel.make_scenario(__import__("random").Random(5), "t")
    user = Recording()
    s = travel.TravelSession(task, user)
    s.search("something vague")
    s.talk("Lovely weather today!")
    first_reply = s.history[-1][1]
    s.talk(f"Do you care about {s.remaining[0]['keywords'][0]}?")
    judge = [m for role, m in user.calls if role == "travel.question_judge"][-1][-1]["content"]
    traveller = [m for role, m in user.calls if role == "travel.user"][-1][-1]["content"]
    for prompt in (judge, traveller):  # the earlier turns, in order, before the latest message
        assert prompt.index("Assistant (search): something vague") < prompt.index("Database: No results") \
            < prompt.index("Assistant: Lovely weather today!") < prompt.index(f"Traveller: {first_reply}") \
            < prompt.index("now said: Do you care about")
    assert task["request"] in judge


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
        assert s.talk("q")[1] == 0.0
    pref = task["aspects"][0]["preferences"][0]["id"]
    s = travel.TravelSession(task, Fixed(f'{{"type": "2", "preference": "{pref}"}}'))
    assert s.talk("q")[1] == 0.8 and pref not in [p["id"] for p in s.remaining]


# ----------------------------------------------------------------------------------------------------------
# TauGym


@pytest.fixture(scope="module")
def tau_tasks():
    return {split: read(tau.DATA_DIR / f"{split}.jsonl") for split in tau.SPLITS}


def test_tau_files_are_the_generators_output(tau_tasks):
    for split in tau.SPLITS:
        shipped = (tau.DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
        assert tau.dumps(tau.generate(split)) == shipped, f"data/tau/{split}.jsonl: run python -m gyms.tau"
    assert len(tau_tasks["train"]) >= 100 and len(tau_tasks["test"]) >= 30
    customers = [{t["user_id"] for t in tau_tasks[s]} for s in tau.SPLITS]
    assert not customers[0] & customers[1]  # the splits are about different customers
    assert tau.make_db(0) == tau.make_db(0) != tau.make_db(1)


def tool(name, **arguments):
    return json.dumps({"name": name, "arguments": arguments})


def play_tau(task, actions):
    """An agent that identifies the customer, performs `actions`, and reports back."""
    s = tau.RetailSession(task, Rules())
    assert s.opening().startswith("Hi")
    c = task["customer"]
    obs, _, _ = s.talk("Could you give me your email, or your name and zip code, to verify your identity?")
    if c["identify_by"] == "email":
        assert c["email"] in obs
        found = s.call(tool("find_user_id_by_email", email=c["email"]))[0]
    else:
        assert c["zip"] in obs
        found = s.call(tool("find_user_id_by_name_zip", first_name=c["first_name"], last_name=c["last_name"],
                            zip=c["zip"]))[0]
    assert found == task["user_id"]
    # As the original: search takes exactly "tools" (listed once) or "help"
    assert "only" in s.tools("show me the tools please")[0] and "answer calls one tool" in s.tools("help")[0]
    assert "find_user_id_by_email" in s.tools("tools")[0] and "already" in s.tools(" Tools ")[0]
    for a in actions:
        assert not s.call(json.dumps(a))[0].startswith("Error")
    keys = [r.get("order_id") or "address" for r in c["requests"]]
    report = f"{' and '.join(keys)}: done successfully."
    if task["outputs"]:
        report = f"You paid {task['outputs'][0]} in total."
    obs, r, done = s.talk(report)
    return r, done


def test_tau_reward_correct_vs_wrong_actions(tau_tasks):
    tasks = tau_tasks["test"]
    assert all(play_tau(t, t["actions"]) == (1.0, True) for t in tasks)
    extra = {"name": "modify_user_address", "arguments": {"address1": "1 Extra Way", "address2": "", "city": "Dover",
                                                           "state": "DE", "country": "USA", "zip": "19901"}}
    writes = [t for t in tasks if t["actions"]]
    for t in writes[:8]:
        assert play_tau(t, [])[0] == 0.0  # claiming success without doing it
        more = [*t["actions"], {**extra, "arguments": {"user_id": t["user_id"], **extra["arguments"]}}]
        assert play_tau(t, more)[0] == 0.0  # a write nobody asked for
    for t in [t for t in writes if t["actions"][0]["name"] == "cancel_pending_order"][:5]:
        wrong = json.loads(json.dumps(t["actions"]))
        wrong[0]["arguments"]["reason"] = [r for r in tau.REASONS if r != wrong[0]["arguments"]["reason"]][0]
        assert play_tau(t, wrong)[0] == 0.0  # the right tool with the wrong argument
    for t in [t for t in writes if t["actions"][0]["name"] == "modify_pending_order_address"][:5]:
        wrong = json.loads(json.dumps(t["actions"]))
        wrong[0]["arguments"]["zip"] = "00000"
        assert play_tau(t, wrong)[0] == 0.0
    assert tau._base(0)[0] == tau.make_db(0)  # episodes copy records before writing: the original is intact
    info = next(t for t in tasks if t["outputs"])
    s = tau.RetailSession(info, Rules())
    s.opening()
    assert s.talk("You paid 0.01 in total.")[1:] == (0.0, False)  # a wrong value does not end the conversation
    assert s.reward() == 0.0


def test_tau_tool_errors_never_raise(tau_tasks):
    world = tau.RetailWorld(tau.fresh_db())
    users, orders = world.db["users"], world.db["orders"]
    uid = next(u for u, d in users.items() if {"pending", "delivered"} <= {orders[o]["status"] for o in d["orders"]})
    pending = next(o for o in users[uid]["orders"] if orders[o]["status"] == "pending")
    delivered = next(o for o in users[uid]["orders"] if orders[o]["status"] == "delivered")
    item = orders[delivered]["items"][0]
    foreign_item = next(i for p, d in world.db["products"].items() if p != item["product_id"] for i in d["variants"])
    someone_elses = next(o for o, d in orders.items() if d["user_id"] != uid)
    before = json.dumps(world.db, sort_keys=True)
    unidentified = [
        ("no_such_tool", {}, "unknown tool"),
        ("get_order_details", {"order_id": pending}, "identify the customer first"),
        ("get_user_details", {"user_id": uid}, "identify the customer first"),
        ("find_user_id_by_email", {"email": "nobody@example.com"}, "no user"),
        ("find_user_id_by_email", {}, "missing: email"),
        ("find_user_id_by_email", {"email": "x", "extra": 1}, "unexpected: extra"),
        ("find_user_id_by_email", {"email": 42}, "must be a string"),
        ("find_user_id_by_email", ["x"], "JSON object"),
        ("cancel_pending_order", {"order_id": pending, "reason": "no longer needed"}, "identify the customer first"),
    ]
    identified = [
        ("cancel_pending_order", {"order_id": delivered, "reason": "no longer needed"}, "not pending"),
        ("cancel_pending_order", {"order_id": pending, "reason": "bored"}, "reason must be"),
        ("cancel_pending_order", {"order_id": "#R0", "reason": "ordered by mistake"}, "not found"),
        ("get_order_details", {"order_id": someone_elses}, "identify the customer first"),
        ("modify_pending_order_address", {"order_id": pending, "zip": "1"}, "missing: address1"),
        ("return_delivered_order_items", {"order_id": pending, "item_ids": ["1"], "payment_method_id": "p"},
         "not delivered"),
        ("return_delivered_order_items", {"order_id": delivered, "item_ids": "x", "payment_method_id": "p"},
         "list of strings"),
        ("return_delivered_order_items", {"order_id": delivered, "item_ids": [], "payment_method_id": "p"}, "empty"),
        ("return_delivered_order_items", {"order_id": delivered, "item_ids": [foreign_item],
                                          "payment_method_id": "p"},
         "not in the order"),
        ("return_delivered_order_items", {"order_id": delivered, "item_ids": [item["item_id"]],
                                          "payment_method_id": "nope"}, "original payment method"),
        ("exchange_delivered_order_items", {"order_id": delivered, "item_ids": [item["item_id"]],
                                            "new_item_ids": [foreign_item], "payment_method_id": "nope"},
         "not another variant"),
        ("get_product_details", {"product_id": "P0"}, "not found"),
    ]
    for name, args, needle in unidentified:
        out = world.call(name, args)
        assert out.startswith("Error") and needle in out, (name, out)
    assert world.call("find_user_id_by_email", {"email": users[uid]["email"].upper()}) == uid
    for name, args, needle in identified:
        out = world.call(name, args)
        assert out.startswith("Error") and needle in out, (name, out)
    assert json.dumps(world.db, sort_keys=True) == before  # failed calls change nothing
    s = tau.RetailSession(tau_tasks["train"][0], Rules())
    for junk in ["", "{", "null", "[1]", '{"name": 3}', "cancel_pending_order", 'get_order_details {"order_id": 5}',
                 '{"name": "get_user_details", "arguments": "{broken"}', "x" * 10000, "__import__('os')",
                 '{"name": "get_user_details", "arguments": {"user_id": {"$ne": null}}}', "[" * 100000]:
        obs, r, done = s.call(junk)
        assert obs.startswith("Error") and r == 0.0 and not done
    call = ("get_order_details", {"order_id": "#R1"})
    assert tau.parse_tool_call('get_order_details: {"order_id": "#R1"}') == call
    for loose in ['get_order_details {"order_id": "#R1"}', "list_all_product_types"]:  # the original wants "name: {}"
        with pytest.raises(ValueError):
            tau.parse_tool_call(loose)
    assert tau.parse_tool_call('{"name": "get_order_details", "arguments": "{\\"order_id\\": \\"#R1\\"}"}') == call


def test_tau_task_for_another_database_is_refused(tau_tasks):
    task = dict(tau_tasks["test"][0], db_sha="0" * 16)
    with pytest.raises(ValueError, match="different database"):
        tau.RetailSession(task, Rules())


def test_tau_customer_prompt_alternates():
    msgs = tau.customer_messages("You are X.", ["agent 1", "agent 2"], ["hi", "reply 1"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "agent 2" and msgs[2]["content"] == "hi"


# ----------------------------------------------------------------------------------------------------------
# SearchGym


@pytest.fixture(scope="module")
def search_data():
    return {split: (read(search.DATA_DIR / f"{split}.jsonl"), read(search.DATA_DIR / f"corpus-{split}.jsonl"))
            for split in search.SPLITS}


def test_search_files_are_the_generators_output(search_data):
    for split in search.SPLITS:
        qs, docs = search.generate(split)
        assert search.dumps(qs) == (search.DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
        assert search.dumps(docs) == (search.DATA_DIR / f"corpus-{split}.jsonl").read_text(encoding="utf-8")
    qs, docs = search_data["test"]
    assert len(qs) >= 60 and 200 <= len(docs) <= 600
    titles = [{d["title"] for d in search_data[s][1]} for s in search.SPLITS]
    assert not titles[0] & titles[1]  # each split has a world of its own


def test_search_questions_are_answered_by_their_hops(search_data):
    for split, (qs, docs) in search_data.items():
        text = {d["title"]: d["text"] for d in docs}
        assert len({q["question"] for q in qs}) == len(qs)
        for q in qs:
            assert q["corpus"] == split and len(q["hops"]) >= 2 and all(h in text for h in q["hops"])
            assert q["hops"][0] in q["question"]
            assert not search.exact_match(q["question"], [q["answer"]]) and q["answer"] not in q["question"]
            last = search.normalize(text[q["hops"][-1]])
            assert any(search.normalize(g) in last for g in [q["answer"], *q["aliases"]]), q["id"]
            for a, b in zip(q["hops"], q["hops"][1:]):  # each hop's article names the next entity
                assert b.replace(" River", "") in text[a] or a in text[b], (q["id"], a, b)


def test_search_every_hop_is_findable(search_data):
    qs, _ = search_data["test"]
    backend = search.LocalSearch("test")
    for q in qs:
        for hop in q["hops"]:
            assert hop in [r["title"] for r in backend.search(hop)], (q["id"], hop)


def test_bm25_ranking():
    docs = [{"title": f"doc {i}", "text": "the harbour town trades wool and grain every spring"} for i in range(8)]
    docs.insert(5, {"title": "odd one", "text": "the harbour town trades wool and quillwort every spring"})
    index = search.BM25(docs)
    assert index.search("harbour quillwort")[0]["title"] == "odd one"  # the rare term decides
    assert index.search("wool")[:2] == docs[:2]  # equal scores keep corpus order
    assert index.search("nothing matches this") == [] and index.search("") == []
    short = search.BM25([{"title": "long", "text": "wool " + "filler " * 30}, {"title": "short", "text": "wool"}])
    assert short.search("wool")[0]["title"] == "short"  # length normalisation
    assert len(search.LocalSearch("test").search("river town country")) == 5


def test_search_session_limits_and_answers(search_data):
    q = search_data["test"][0][0]
    s = search.SearchSession(q, Rules())
    for _ in range(5):
        obs, r, done = s.search(q["hops"][0])
        assert obs.startswith("1. ") and r == 0.0 and not done
    assert "used all 5 searches" in s.search("more")[0]
    assert s.answer("I have no idea") == ("That answer is not correct.", 0.0, False)
    assert s.answer(f"Maybe {q['answer']} or somewhere else")[1] == 0.0  # hedging is not an answer
    assert s.answer(f"  the {q['answer'].upper()}!! ") == ("Correct.", 1.0, True)  # normalised exact match
    assert search.SearchSession(q, Rules()).answer(f"I believe it is {q['answer']}.")[1] == 1.0
    assert search.judge_rule("q", "1917", ["1917"]) == "Yes" and search.judge_rule("q", "19170", ["1917"]) == "No"

    class Fixed:
        def __init__(self, reply):
            self.reply = reply

        def act(self, role, messages, **facts):
            assert role == "search.judge" and q["answer"] in messages[-1]["content"]
            return self.reply

    assert search.SearchSession(q, Fixed("<think>no, wait</think> Yes.")).answer("paraphrase")[1] == 1.0
    for junk in ["No.", "", "I cannot tell", "{}"]:
        assert search.SearchSession(q, Fixed(junk)).answer("paraphrase")[1] == 0.0


class FakeSerper(BaseHTTPRequestHandler):
    """A loopback stand-in for the search API. `mode` picks the behaviour; `seen` records requests."""

    mode, seen = "ok", []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeSerper.seen.append((self.headers.get("X-API-KEY"), body))
        status, reply = {
            "ok": (200, {"answerBox": {"title": "Box", "answer": "Forty-two"},
                         "organic": [{"title": f"T{i}", "link": "http://x", "snippet": f"S{i}"} for i in range(7)]}),
            "fail": (503, {"message": "overloaded"}),
            "denied": (401, {"message": "bad key"}),
        }.get(FakeSerper.mode, (200, None))
        data = b"<html>not json" if reply is None else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def serper(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSerper)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("TEST_SERPER_KEY", "sekret-123")
    FakeSerper.seen = []
    yield search.make_backend("serper", url=f"http://127.0.0.1:{server.server_port}/search",
                              api_key_env="TEST_SERPER_KEY", max_retries=2, backoff=0.0, timeout=5.0)
    server.shutdown()
    server.server_close()


def test_serper_client_against_loopback(serper):
    FakeSerper.mode = "ok"
    results = serper.search("meaning of life")
    assert results[0] == {"title": "Box", "snippet": "Forty-two"}
    assert [r["title"] for r in results[1:]] == ["T0", "T1", "T2", "T3"]  # at most 5 results in all
    assert FakeSerper.seen == [("sekret-123", {"q": "meaning of life", "num": 5})]
    s = search.SearchSession({"question": "?", "answer": "x", "aliases": [], "corpus": "test"}, None, backend=serper)
    assert s.search("meaning of life")[0].startswith("1. Box\nForty-two")


@pytest.mark.parametrize("mode, attempts", [("fail", 3), ("denied", 1), ("junk", 1)])
def test_serper_client_failures(serper, mode, attempts):
    FakeSerper.mode = mode
    with pytest.raises(search.SearchError) as e:
        serper.search("q")
    assert len(FakeSerper.seen) == attempts  # only overload and server errors are retried
    assert "sekret-123" not in str(e.value)
    s = search.SearchSession({"question": "?", "answer": "x", "aliases": [], "corpus": "test"}, None, backend=serper)
    obs, r, done = s.search("q")
    assert obs.startswith("The search failed") and r == 0.0 and not done and "sekret" not in obs


def test_serper_client_needs_its_key_and_a_server(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        search.SerperSearch(api_key_env="NO_SUCH_KEY_VAR")
    monkeypatch.setenv("NO_SUCH_KEY_VAR", "k")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = search.SerperSearch(url=f"http://127.0.0.1:{port}/", api_key_env="NO_SUCH_KEY_VAR", max_retries=1,
                                 backoff=0.0)
    with pytest.raises(search.SearchError, match="connection failed"):
        client.search("q")
    with pytest.raises(ValueError, match="unknown search backend"):
        search.make_backend("bing")

