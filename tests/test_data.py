"""Schema and quality checks for the project's own task data (data/<gym>/{train,test}.jsonl).

The gyms, the scripted user and these files are written against one pinned schema; these tests keep the
files honest: exact fields and types, unique ids, disjoint splits, weights and importances in range, and
keywords that the scripted rules can actually match (lower-case, word-bounded, present where they must be).
"""
import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"

# gym -> (id prefix, exact field set, minimum number of tasks over both splits)
SPEC = {
    "telepathy": ("tele", {"id", "category", "entity", "synonyms", "description", "attributes"}, 72),
    "turtle": ("turtle", {"id", "title", "surface", "bottom", "criteria", "host_facts"}, 36),
    "intention": ("intent", {"id", "category", "task", "missing_details"}, 48),
    "persuade": ("persuade", {"id", "claim", "argument", "counterpoints"}, 48),
}


def load(gym, split):
    with open(DATA / gym / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tasks(gym):
    return load(gym, "train") + load(gym, "test")


def matches(keyword, text):
    # the scripted users match keywords this way: whole words, any case
    return re.search(r"\b" + re.escape(keyword) + r"\b", text, re.IGNORECASE) is not None


def check_text(value, where, min_len=1):
    assert isinstance(value, str) and len(value.strip()) >= min_len, f"{where}: expected text of >= {min_len} chars, got {value!r}"


def check_keywords(kws, where, min_n=1, max_n=None):
    assert isinstance(kws, list) and len(kws) >= min_n, f"{where}: expected a list of >= {min_n} keywords, got {kws!r}"
    assert max_n is None or len(kws) <= max_n, f"{where}: {len(kws)} keywords, at most {max_n} allowed"
    for k in kws:
        assert isinstance(k, str) and k == k.lower() and k == k.strip(), f"{where}: keyword {k!r} must be lower-case, stripped text"
        # a keyword must start and end on a word character, or the word-boundary match can never fire
        assert re.fullmatch(r"\w(.*\w)?", k), f"{where}: keyword {k!r} must start and end with a letter or digit"
    assert len(set(kws)) == len(kws), f"{where}: duplicate keywords in {kws!r}"


def weighted_score(criteria, story):
    """The scripted turtle judge's rule: per criterion 1 if every keyword group matches, 0.5 if at least half do."""
    total = 0.0
    for c in criteria:
        hit = sum(any(matches(k, story) for k in group) for group in c["keywords"])
        judged = 1.0 if hit == len(c["keywords"]) else 0.5 if 2 * hit >= len(c["keywords"]) else 0.0
        total += c["weight"] * judged
    return total


# ---------------------------------------------------------------------------- every gym

@pytest.mark.parametrize("gym", sorted(SPEC))
def test_fields_ids_and_splits(gym):
    prefix, fields, minimum = SPEC[gym]
    train, test = load(gym, "train"), load(gym, "test")
    assert train and test, f"{gym}: both splits must be non-empty"
    assert len(train) + len(test) >= minimum, f"{gym}: {len(train) + len(test)} tasks, need >= {minimum}"
    assert 0.15 <= len(test) / (len(train) + len(test)) <= 0.25, f"{gym}: test split should be about 20%"
    for t in train + test:
        assert isinstance(t, dict) and set(t) == fields, f"{gym} {t.get('id')}: fields {sorted(t)} != {sorted(fields)}"
        assert re.fullmatch(prefix + r"-\d{3}", t["id"]), f"{gym}: bad id {t['id']!r}"
    train_ids, test_ids = [t["id"] for t in train], [t["id"] for t in test]
    assert len(set(train_ids)) == len(train_ids) and len(set(test_ids)) == len(test_ids), f"{gym}: duplicate ids"
    assert not set(train_ids) & set(test_ids), f"{gym}: ids in both splits: {sorted(set(train_ids) & set(test_ids))}"


# ---------------------------------------------------------------------------- telepathy

def test_telepathy_entities():
    entities = tasks("telepathy")
    seen = {}
    for t in entities:
        where = t["id"]
        for key in ("category", "entity"):
            check_text(t[key], f"{where}.{key}")
        check_text(t["description"], f"{where}.description", min_len=80)
        assert isinstance(t["synonyms"], list) and all(isinstance(s, str) and s.strip() for s in t["synonyms"]), where
        assert set(t["attributes"]) == {"yes", "no"}, f"{where}: attributes must have exactly 'yes' and 'no'"
        yes, no = t["attributes"]["yes"], t["attributes"]["no"]
        check_keywords(yes, f"{where}.yes", 8, 15)
        check_keywords(no, f"{where}.no", 8, 15)
        assert not set(yes) & set(no), f"{where}: keywords both yes and no: {sorted(set(yes) & set(no))}"
        for name in [t["entity"]] + t["synonyms"]:
            # a guess must identify one entity only, across both splits
            assert name.lower() not in seen, f"{where}: name {name!r} also used by {seen.get(name.lower())}"
            seen[name.lower()] = where
            assert not any(matches(k, name) for k in no), f"{where}: a no-keyword matches its own name {name!r}"
    categories = {t["category"] for t in entities}
    assert len(categories) >= 12, f"need >= 12 categories, got {sorted(categories)}"


# ---------------------------------------------------------------------------- turtle

def test_turtle_puzzles():
    puzzles = tasks("turtle")
    assert len({t["title"] for t in puzzles}) == len(puzzles), "duplicate turtle titles"
    for t in puzzles:
        where = t["id"]
        check_text(t["title"], f"{where}.title")
        check_text(t["surface"], f"{where}.surface", min_len=40)
        check_text(t["bottom"], f"{where}.bottom", min_len=120)
        crit = t["criteria"]
        assert isinstance(crit, list) and 2 <= len(crit) <= 5, f"{where}: needs 2-5 criteria"
        for i, c in enumerate(crit):
            assert set(c) == {"statement", "weight", "keywords"}, f"{where}.criteria[{i}]: fields {sorted(c)}"
            check_text(c["statement"], f"{where}.criteria[{i}].statement", min_len=10)
            assert isinstance(c["weight"], float) and 0 < c["weight"] <= 1, f"{where}.criteria[{i}]: weight {c['weight']!r}"
            assert isinstance(c["keywords"], list) and c["keywords"], f"{where}.criteria[{i}]: needs keyword groups"
            for j, group in enumerate(c["keywords"]):
                check_keywords(group, f"{where}.criteria[{i}].keywords[{j}]")
                assert any(matches(k, t["bottom"]) for k in group), f"{where}.criteria[{i}]: no keyword of {group} occurs in the bottom"
        assert abs(sum(c["weight"] for c in crit) - 1.0) <= 1e-6, f"{where}: weights sum to {sum(c['weight'] for c in crit)}"
        assert set(t["host_facts"]) == {"yes", "no"}, f"{where}: host_facts must have exactly 'yes' and 'no'"
        check_keywords(t["host_facts"]["yes"], f"{where}.host_facts.yes", 5)
        check_keywords(t["host_facts"]["no"], f"{where}.host_facts.no", 5)
        assert not set(t["host_facts"]["yes"]) & set(t["host_facts"]["no"]), f"{where}: host fact both yes and no"
        # retelling the hidden story earns full credit; retelling the visible surface must not
        assert weighted_score(crit, t["bottom"]) == pytest.approx(1.0), f"{where}: the bottom itself does not score 1.0"
        assert weighted_score(crit, t["surface"]) < 0.3, f"{where}: the surface alone scores {weighted_score(crit, t['surface'])}"


def test_turtle_judge_rule_can_fail():
    crit = [{"statement": "s", "weight": 0.6, "keywords": [["drown"], ["ship", "boat"]]},
            {"statement": "t", "weight": 0.4, "keywords": [["storm"]]}]
    assert weighted_score(crit, "He drowned when the boat sank") == pytest.approx(0.3)
    assert weighted_score(crit, "A storm came and he would drown off the boat") == pytest.approx(1.0)


# ---------------------------------------------------------------------------- intention

def test_intention_requests():
    requests = tasks("intention")
    assert len({t["task"] for t in requests}) == len(requests), "duplicate intention tasks"
    for t in requests:
        where = t["id"]
        check_text(t["category"], f"{where}.category")
        check_text(t["task"], f"{where}.task", min_len=10)
        details = t["missing_details"]
        # restating the request asks nothing, so it must not cover a hidden detail
        echo = [k for d in details for k in d["keywords"] if matches(k, t["task"])]
        assert not echo, f"{where}: the task text already contains detail keywords {echo}"
        assert isinstance(details, list) and 2 <= len(details) <= 5, f"{where}: needs 2-5 missing details"
        for i, d in enumerate(details):
            w = f"{where}.missing_details[{i}]"
            assert set(d) == {"description", "importance", "inquiry", "options", "keywords"}, f"{w}: fields {sorted(d)}"
            check_text(d["description"], f"{w}.description", min_len=5)
            assert type(d["importance"]) is int and 1 <= d["importance"] <= 3, f"{w}: importance {d['importance']!r} not an int in 1..3"
            check_text(d["inquiry"], f"{w}.inquiry")
            assert d["inquiry"].rstrip().endswith("?"), f"{w}: the inquiry should be a question"
            assert isinstance(d["options"], list) and len(d["options"]) >= 2, f"{w}: needs >= 2 options"
            for o in d["options"]:
                check_text(o, f"{w}.options")
            check_keywords(d["keywords"], f"{w}.keywords", 3)
            # the model inquiry covers its own detail and no other, so asking it earns the full single-detail reward
            assert any(matches(k, d["inquiry"]) for k in d["keywords"]), f"{w}: its inquiry matches none of its keywords"
            for j, other in enumerate(details):
                if j != i:
                    hit = [k for k in other["keywords"] if matches(k, d["inquiry"])]
                    assert not hit, f"{w}: its inquiry also covers detail {j} via {hit}"
    assert len({t["category"] for t in requests}) >= 8, "intention needs >= 8 categories"


# ---------------------------------------------------------------------------- persuade

def test_persuade_claims():
    claims = tasks("persuade")
    assert len({t["claim"] for t in claims}) == len(claims), "duplicate persuade claims"
    for t in claims:
        where = t["id"]
        check_text(t["claim"], f"{where}.claim", min_len=10)
        check_text(t["argument"], f"{where}.argument", min_len=80)
        sentences = re.findall(r"[^.!?]+[.!?]", t["argument"])
        assert 2 <= len(sentences) <= 4, f"{where}: the argument should be 2-4 sentences, has {len(sentences)}"
        points = t["counterpoints"]
        assert isinstance(points, list) and 3 <= len(points) <= 6, f"{where}: needs 3-6 counterpoints"
        for i, p in enumerate(points):
            w = f"{where}.counterpoints[{i}]"
            assert set(p) == {"point", "keywords"}, f"{w}: fields {sorted(p)}"
            check_text(p["point"], f"{w}.point", min_len=20)
            assert len(re.findall(r"[.!?](\s|$)", p["point"])) == 1, f"{w}: the point should be one sentence"
            check_keywords(p["keywords"], f"{w}.keywords", 3)
            # stating the point itself must register with the scripted persuadee
            assert any(matches(k, p["point"]) for k in p["keywords"]), f"{w}: the point matches none of its keywords"
            # echoing the persuadee's own words is not a counter-argument and must move nothing
            echo = [k for k in p["keywords"] if matches(k, t["claim"] + " " + t["argument"])]
            assert not echo, f"{w}: keywords {echo} already occur in the claim or argument"
            for j, other in enumerate(points):
                if j != i:
                    hit = [k for k in other["keywords"] if matches(k, p["point"])]
                    assert not hit, f"{w}: the point also raises counterpoint {j} via {hit}"
