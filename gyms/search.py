"""SearchGym: multi-hop questions answered with a search backend: a local corpus with BM25 search, or a web search
client (UserRL, arXiv 2509.19736, section 3, SearchGym; the original asks Bamboogle questions and searches Google via
Serper).

The local corpus is a small encyclopedia of an invented world (countries, towns, rivers, people, companies,
works), generated from a seed with one short article per entity. Questions chain two or three of its facts
("In which country was the founder of Drelmor Optics born?"), so their answers are exact and no pretrained
model can know them. Each split has its own world, so training on one teaches nothing about the other's facts.

    python -m gyms.search   # regenerate data/search/{train,test}.jsonl and corpus-{train,test}.jsonl

Backends share one method, `search(query) -> [{"title", "snippet"}]`: `LocalSearch` (BM25 over a corpus file,
numpy only) and `SerperSearch` (a Serper-compatible JSON web search over HTTP; the key comes from an
environment variable and never appears in logs or errors). `SearchSession` holds one episode's mechanics
(at most 5 searches, exact match then a judge); its LLM role is "search.judge", with its prompt and rule here.
"""
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import requests

import users
from envs import FOOTER, Env, TaskDataError, expert_turn, pick

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "search"
SPLITS = {"train": (1, 200), "test": (2, 80)}  # split -> (seed, number of questions)

# ----------------------------------------------------------------------------------------------------------
# The invented world

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
CODAS = ["", "", "", "", "", "n", "r", "l", "s", "m"]
CREATIVE = {"painter": "painting", "novelist": "novel", "composer": "symphony", "architect": "building design",
            "poet": "poetry collection", "astronomer": "star atlas"}
OTHER_JOBS = ["engineer", "merchant", "chemist", "shipbuilder", "physician", "cartographer"]
INDUSTRIES = {"Instruments": "precision instrument", "Textiles": "textile", "Shipping": "shipping",
              "Optics": "optics", "Press": "publishing", "Foundry": "metalworking", "Mills": "flour milling",
              "Chemicals": "chemical", "Railways": "railway", "Ceramics": "ceramics"}
KNOWN_FOR = ["glassblowing", "cheese markets", "shipyards", "wool trade", "clock making", "salt mines",
             "spring festival", "stone bridges", "vineyards", "printing houses", "copper mines", "horse fairs"]
CURRENCIES = ["crown", "mark", "florin", "thaler", "ducat", "sol", "riel", "lira"]
FORMS = ["Republic of", "Kingdom of", "Federation of", "Commonwealth of"]
TITLE_ADJ = ["Silent", "Amber", "Broken", "Northern", "Hollow", "Golden", "Distant", "Winter", "Crimson", "Quiet",
             "Lost", "Glass", "Iron", "Seventh", "Wandering", "Pale", "Burning", "Hidden", "Drowned", "Last"]
TITLE_NOUN = ["Orchard", "Harbour", "Lantern", "Meridian", "Tide", "Garden", "Tower", "Mirror", "Compass",
              "Violin", "Season", "Archive", "Bridge", "Meadow", "Citadel", "Comet", "Ferry", "Chorus", "Atlas",
              "Kingdom"]


def _word(rng, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def make_world(seed: int) -> dict:
    """Entities and their facts, a pure function of `seed`. Every name is unique across the whole world."""
    rng = random.Random(seed)
    taken = set()  # lower-cased

    def fresh(make):
        while True:
            name = make()
            if name.lower() not in taken:
                taken.add(name.lower())
                return name

    rivers = [fresh(lambda: _word(rng, 2)) for _ in range(15)]
    countries = [{"name": fresh(lambda: _word(rng, rng.randint(1, 2)) + rng.choice(["ria", "land", "mora", "vesh"])),
                  "form": rng.choice(FORMS), "currency": rng.choice(CURRENCIES)} for _ in range(10)]
    towns = []
    for c in countries:
        for _ in range(4):
            towns.append({"name": fresh(lambda: _word(rng, 2) + rng.choice(["", "", "holm", "vale", "ford", "wick"])),
                          "country": c["name"], "river": rng.choice(rivers), "founded": rng.randint(900, 1650),
                          "known_for": rng.choice(KNOWN_FOR)})
        c["capital"] = towns[-rng.randint(1, 4)]["name"]
    people = []
    for _ in range(130):
        people.append({"name": fresh(lambda: f"{_word(rng, 2)} {_word(rng, rng.randint(2, 3))}"),
                       "born": rng.randint(1760, 1940), "town": rng.choice(towns)["name"],
                       "job": rng.choice(list(CREATIVE) * 2 + OTHER_JOBS), "mentor": None, "org": None, "works": []})
    for p in people:  # a teacher is 15-45 years older
        elders = [q["name"] for q in people if 15 <= p["born"] - q["born"] <= 45]
        if elders and rng.random() < 0.7:
            p["mentor"] = rng.choice(elders)
    orgs = []
    for founder in rng.sample(people, 40):
        kind = rng.choice(list(INDUSTRIES))
        org = {"name": fresh(lambda: f"{_word(rng, 2)} {kind}"), "industry": INDUSTRIES[kind],
               "founder": founder["name"], "founded": founder["born"] + rng.randint(25, 50),
               "town": rng.choice(towns)["name"]}
        founder["org"] = org["name"]
        orgs.append(org)
    works = []
    creators = [p for p in people if p["job"] in CREATIVE]
    for p in rng.sample(creators, min(80, len(creators))):
        title = fresh(lambda: f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)} of {_word(rng, 2)}")
        works.append({"title": title, "kind": CREATIVE[p["job"]], "creator": p["name"],
                      "year": p["born"] + rng.randint(20, 55)})
        p["works"].append(title)
    return {"rivers": rivers, "countries": countries, "towns": towns, "people": people, "orgs": orgs, "works": works}


def articles(world: dict) -> list:
    """One short article per entity: {"title", "text"}."""
    docs = []
    for c in world["countries"]:
        docs.append({"title": c["name"], "text": f"The {c['form']} {c['name']}, usually just called {c['name']}, is "
                     f"a country whose capital is {c['capital']}. Its currency is the {c['currency']}."})
    for r in world["rivers"]:
        through = [t["name"] for t in world["towns"] if t["river"] == r]
        banks = f"flows through {_join(through)}." if through else "has no town on its banks."
        docs.append({"title": f"{r} River", "text": f"The {r} River is a river that {banks}"})
    for t in world["towns"]:
        docs.append({"title": t["name"], "text": f"{t['name']} is a town in {t['country']} on the {t['river']} "
                     f"River. It was founded in {t['founded']} and is known for its {t['known_for']}."})
    for p in world["people"]:
        text = f"{p['name']} was {_a(p['job'])}, born in {p['born']} in {p['town']}."
        if p["mentor"]:
            text += f" {p['name']} was taught by {p['mentor']}."
        if p["org"]:
            text += f" {p['name']} founded {p['org']}."
        if p["works"]:
            text += f" {p['name']} is remembered for {_join(p['works'])}."
        docs.append({"title": p["name"], "text": text})
    for o in world["orgs"]:
        docs.append({"title": o["name"], "text": f"{o['name']} is {_a(o['industry'])} company founded in "
                     f"{o['founded']} by {o['founder']}. Its headquarters are in {o['town']}."})
    for w in world["works"]:
        docs.append({"title": w["title"],
                     "text": f"{w['title']} is {_a(w['kind'])} by {w['creator']}, completed in {w['year']}."})
    return docs


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(names: list) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------------------------------------------------
# Multi-hop questions: each template follows links between articles and records the titles it visits.


def questions(world: dict, rng, n: int, corpus: str, first_id: int) -> list:
    person = {p["name"]: p for p in world["people"]}
    town = {t["name"]: t for t in world["towns"]}
    country = {c["name"]: c for c in world["countries"]}
    org = {o["name"]: o for o in world["orgs"]}

    def country_answer(name):
        c = country[name]
        return name, [f"{c['form']} {name}"]

    candidates = []
    for o in world["orgs"]:
        f, hq = person[o["founder"]], town[o["town"]]
        candidates += [
            (f"In which country was the founder of {o['name']} born?", *country_answer(town[f["town"]]["country"]),
             [o["name"], f["name"], f["town"]]),
            (f"What is the capital of the country where {o['name']} has its headquarters?",
             country[hq["country"]]["capital"], [], [o["name"], hq["name"], hq["country"]]),
            (f"What was the profession of the person who founded {o['name']}?", f["job"], [], [o["name"], f["name"]]),
            (f"Which river flows through the town where {o['name']} has its headquarters?", f"{hq['river']} River",
             [hq["river"]], [o["name"], hq["name"]]),
        ]
    for w in world["works"]:
        c = person[w["creator"]]
        candidates += [
            (f"Which river flows through the birthplace of the creator of {w['title']}?",
             f"{town[c['town']]['river']} River", [town[c["town"]]["river"]], [w["title"], c["name"], c["town"]]),
            (f"In which country was the creator of {w['title']} born?", *country_answer(town[c["town"]]["country"]),
             [w["title"], c["name"], c["town"]]),
        ]
        if c["mentor"]:
            candidates.append((f"Who taught the creator of {w['title']}?", c["mentor"], [], [w["title"], c["name"]]))
        if c["org"]:
            candidates.append((f"In what year was the company founded by the creator of {w['title']} established?",
                               str(org[c["org"]]["founded"]), [], [w["title"], c["name"], c["org"]]))
    for p in world["people"]:
        if p["mentor"]:
            m = person[p["mentor"]]
            candidates.append((f"In what year was the teacher of {p['name']} born?", str(m["born"]), [],
                               [p["name"], m["name"]]))
            if m["org"]:
                candidates.append((f"In which town are the headquarters of the company founded by the teacher of "
                                   f"{p['name']}?", org[m["org"]]["town"], [], [p["name"], m["name"], m["org"]]))
    rng.shuffle(candidates)
    if len(candidates) < n:
        raise RuntimeError(f"only {len(candidates)} questions in this world, {n} asked for")
    return [{"id": f"search-{first_id + i:04d}", "question": q, "answer": a, "aliases": al, "corpus": corpus,
             "hops": h} for i, (q, a, al, h) in enumerate(candidates[:n])]


def generate(split: str) -> tuple:
    """(questions, articles) of one split."""
    seed, n = SPLITS[split]
    world = make_world(seed)
    first = 1 if split == "train" else SPLITS["train"][1] + 1
    return questions(world, random.Random(seed), n, split, first), articles(world)


def dumps(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------------------
# BM25 (Robertson and Zaragoza's Okapi weighting) over a dense term-count matrix: a few hundred short
# articles make a matrix of well under a megabyte, so plain numpy beats any sparse machinery here.

STOPWORDS = set("a an and are as at be by for from has have in is it its of on or that the to was were what which "
                "who whom whose when where how did does do in into this with".split())


def tokenize(text: str) -> list:
    return [t for t in re.findall(r"[a-z0-9]+", text.lower()) if t not in STOPWORDS]


class BM25:
    def __init__(self, docs: list, k1: float = 1.2, b: float = 0.75):
        self.docs, self.k1 = docs, k1
        tokens = [tokenize(d["title"] + " " + d["text"]) for d in docs]
        self.vocab = {t: i for i, t in enumerate(sorted({t for ts in tokens for t in ts}))}
        tf = np.zeros((len(docs), len(self.vocab)), np.float32)
        for row, ts in enumerate(tokens):
            np.add.at(tf[row], [self.vocab[t] for t in ts], 1.0)
        df = (tf > 0).sum(0)
        self.idf = np.log(1.0 + (len(docs) - df + 0.5) / (df + 0.5)).astype(np.float32)  # never negative
        length = tf.sum(1)
        self.tf, self.norm = tf, k1 * (1.0 - b + b * length / length.mean())

    def scores(self, query: str) -> np.ndarray:
        cols = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        tf = self.tf[:, cols]
        return (self.idf[cols] * tf * (self.k1 + 1.0) / (tf + self.norm[:, None])).sum(1)

    def search(self, query: str, k: int = 5) -> list:
        s = self.scores(query)
        top = np.argsort(-s, kind="stable")[:k]  # stable: ties keep corpus order, so results are reproducible
        return [self.docs[i] for i in top if s[i] > 0]


# ----------------------------------------------------------------------------------------------------------
# Backends


class SearchError(RuntimeError):
    """A search backend could not answer (after its retries). The message never contains an API key."""


@lru_cache(maxsize=4)
def load_index(corpus: str) -> BM25:
    path = DATA_DIR / f"corpus-{corpus}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no search corpus {corpus!r}: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return BM25([json.loads(line) for line in f])


@dataclass
class LocalSearch:
    """BM25 over data/search/corpus-<corpus>.jsonl; snippets are the articles (they are short)."""

    corpus: str = "test"
    """which corpus file: a split name"""
    k: int = 5
    """results per search (the original's 5)"""

    def search(self, query: str) -> list:
        return [{"title": d["title"], "snippet": d["text"]} for d in load_index(self.corpus).search(query, self.k)]


@dataclass
class SerperSearch:
    """A Serper-compatible web search: POST {"q": query, "num": k} with the key in an X-API-KEY header; the
    reply's answer box (if any) and organic results become the results."""

    url: str = "https://google.serper.dev/search"
    """endpoint of the search API"""
    api_key_env: str = "SERPER_API_KEY"
    """environment variable that holds the key"""
    k: int = 5
    """results per search (the original's 5)"""
    timeout: float = 15.0
    """seconds per request"""
    max_retries: int = 3
    """retries after the first attempt, on timeouts, connection errors, 429 and 5xx"""
    backoff: float = 1.0
    """seconds before the first retry, doubling after each (a Retry-After header can ask for longer)"""

    def __post_init__(self):
        if not os.environ.get(self.api_key_env):
            raise ValueError(f"serper search: the environment variable {self.api_key_env} is not set")

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "")

    def _fail(self, message: str, reason: str = "") -> SearchError:  # users.post_with_retries names a reason too
        key = self._key()
        return SearchError(message.replace(key, "***") if key else message)

    def search(self, query: str) -> list:
        key = self._key()
        headers = {"X-API-KEY": key, "Content-Type": "application/json"}
        return users.post_with_retries(requests.post, self.url, {"q": query, "num": self.k}, headers,
                                       timeout=self.timeout, max_retries=self.max_retries, backoff=self.backoff,
                                       read=self._read, fail=self._fail, where=f"search API at {self.url}",
                                       secret=key)

    def _read(self, r) -> list:
        try:
            return self._results(r.json())
        except (ValueError, TypeError, AttributeError):
            raise self._fail(f"search API at {self.url}: malformed reply {users.shown(r.text, self._key())}") from None

    def _results(self, body: dict) -> list:
        out = []
        box = body.get("answerBox")
        if isinstance(box, dict) and (box.get("answer") or box.get("snippet")):
            out.append({"title": str(box.get("title") or "Answer box"),
                        "snippet": str(box.get("answer") or box["snippet"])})
        for item in body.get("organic") or []:
            out.append({"title": str(item.get("title", "")), "snippet": str(item.get("snippet", ""))})
        return out[:self.k]


BACKENDS = {"local": LocalSearch, "serper": SerperSearch}


def make_backend(kind: str = "local", **kwargs):
    if kind not in BACKENDS:
        raise ValueError(f"unknown search backend {kind!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[kind](**kwargs)


def format_results(results: list) -> str:
    if not results:
        return "No results."
    return "\n".join(f"{i}. {r['title']}\n{r['snippet']}" for i, r in enumerate(results, 1))


# ----------------------------------------------------------------------------------------------------------
# Answers: normalised exact match, then a judge for paraphrases


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual open-domain QA normalisation)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def exact_match(answer: str, gold: list) -> bool:
    return normalize(answer) in {normalize(g) for g in gold}


def judge_rule(question: str, answer: str, gold: list) -> str:
    """The scripted judge: Yes when the answer contains a gold answer as whole words, is not much longer than
    it, and does not hedge between options ("X or Y"); else No."""
    said = f" {normalize(answer)} "
    for g in gold:
        g = normalize(g)
        if g and f" {g} " in said and len(said.split()) <= len(g.split()) + 8 and " or " not in said:
            return "Yes"
    return "No"


def judge_messages(question: str, answer: str, gold: list) -> list:
    return [{"role": "system", "content": "You grade answers to quiz questions against the reference answer."},
            {"role": "user", "content":
             f"Question: {question}\nReference answer: {' / '.join(gold)}\nCandidate answer: {answer}\n\n"
             "Does the candidate give the same answer as the reference? Wording may differ; a hedge between "
             "several answers or a different entity is wrong. Reply with Yes or No only."}]


# ----------------------------------------------------------------------------------------------------------
# One episode


class SearchSession:
    """The mechanics of one SearchGym episode. `backend` has `search(query)`; None means the local BM25 over
    the task's corpus. search / answer return (observation, reward, done)."""

    def __init__(self, task: dict, user, backend=None, max_searches: int = 5):
        self.task, self.user, self.max_searches = task, user, max_searches
        self.backend = backend if backend is not None else LocalSearch(task["corpus"])
        self.searches = 0

    def search(self, query: str):
        if self.searches >= self.max_searches:
            return f"You have used all {self.max_searches} searches. Give your answer now.", 0.0, False
        self.searches += 1
        try:
            results = self.backend.search(query)
        except SearchError as e:
            return f"The search failed: {e}", 0.0, False
        return format_results(results), 0.0, False

    def answer(self, text: str):
        gold = [self.task["answer"], *self.task["aliases"]]
        if not exact_match(text, gold):
            reply = self.user.act("search.judge", judge_messages(self.task["question"], text, gold), rule=judge_rule,
                                  question=self.task["question"], answer=text, gold=gold)
            if users.extract_yes_no(reply) != "Yes":
                return "That answer is not correct.", 0.0, False
        return "Correct.", 1.0, True


# ----------------------------------------------------------------------------------------------------------
# The gym

PROMPT = """Answer the user's question. It chains several facts (for example: who founded a company, then where that person was born), so find them one at a time.

Call interact_with_env with one of these choices:
- search: a search query; you get the top results, each a title and a text. You have at most {max_searches} searches, so make every query specific.
- answer: your answer, short: just the name, place, number or date asked for. A right answer ends the task; a wrong one costs a turn.
Work out the chain of facts first, search for one link at a time, and answer from what the results say.""" + FOOTER


class SearchGym(Env):
    name = "search"
    choices = ("search", "answer")  # the original refuses an [action] here too ("Invalid action format")
    fields = {"id": str, "question": str, "answer": str, "aliases": list}
    optional_fields = {"corpus": str, "hops": list}
    system_prompt = PROMPT
    original_files = ("questions.json",)

    def __init__(self, task, user=None, backend="local", backend_options: dict | None = None,
                 max_searches: int = 5, **kwargs):
        """`backend`: "local" (BM25 over the task's own corpus), "serper" (a web search API; `backend_options`
        go to SerperSearch, e.g. url, api_key_env), or any object with `search(query)`."""
        super().__init__(task, user, **kwargs)
        if isinstance(backend, str):
            options = dict(backend_options or {})
            if backend == "local":
                if not task.get("corpus"):
                    raise ValueError(f"search task {task.get('id', '?')!r} has no local corpus (original Bamboogle "
                                     "questions are answered from the web): use backend='serper'")
                options["corpus"] = task["corpus"]
            backend = make_backend(backend, **options)
        self.backend, self.max_searches = backend, max_searches
        self.session = self._session()

    def _session(self):
        return SearchSession(self.task, self.user, backend=self.backend, max_searches=self.max_searches)

    def system(self):
        return self.system_prompt.format(max_turns=self.max_turns, max_searches=self.max_searches)

    def opening(self):
        self.session = self._session()
        return f"{self.task['question']}\nPlease look it up step by step and tell me the answer."

    def act(self, choice, content):
        return self.session.search(content) if choice == "search" else self.session.answer(content)

    def expert_action(self, rng):
        """Search each link of the question's chain (its `hops`; the question itself for a web question), then give
        the answer, short. Full reward: 1."""
        hops = self.task.get("hops") or [self.task["question"]]
        searched = self.session.searches
        if searched < min(len(hops), self.max_searches) and self.turns_left() > 1:
            hop = hops[searched]
            query = rng.choice([hop, f"{hop} facts", f"who or what is {hop}"]) if hop != self.task["question"] else hop
            think = ("Start from the entity the question names." if searched == 0 else
                     rng.choice([f"That result points to {hop}; look it up next.", f"Next link in the chain: {hop}."]))
            return expert_turn(think, "search", query)
        answer = self.task["answer"]
        forms = [answer, f"The answer is {answer}.", f"{answer}."]
        gold = [answer, *self.task["aliases"]]
        reply = pick(rng, forms, lambda a: exact_match(a, gold) or judge_rule(self.task["question"], a, gold) == "Yes",
                     default=answer)
        think = rng.choice(["The results complete the chain; answer with just the name or number.",
                            f"Following the links gives {answer}.", "I have every link now."])
        return expert_turn(think, "answer", reply)

    @classmethod
    def load_original(cls, data_dir, split):
        """The original's SearchGym is evaluation only: the Bamboogle records of `questions.json`
        (`{id: "Bamboogle-N", question, answer}`) are all test tasks. They are answered from the web, so they play
        with backend="serper" only."""
        if split != "test":
            raise TaskDataError("search: the original SearchGym data (Bamboogle) is for evaluation only; it has no "
                                "train split")
        path = cls.original_path(data_dir)
        tasks = [t for t in cls.read_original(path) if t["id"].lower().startswith("bamboogle")]
        if not tasks:
            raise TaskDataError(f"{path}: no Bamboogle records (ids such as 'Bamboogle-1')")
        return tasks

    @staticmethod
    def from_original(record):
        if not isinstance(record["question"], str):
            raise ValueError("question must be a string")
        return {"id": str(record["id"]), "question": record["question"], "answer": str(record["answer"]), "aliases": []}


if __name__ == "__main__":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        qs, docs = generate(split)
        (DATA_DIR / f"{split}.jsonl").write_text(dumps(qs), encoding="utf-8")
        (DATA_DIR / f"corpus-{split}.jsonl").write_text(dumps(docs), encoding="utf-8")
        print(f"data/search/{split}: {len(qs)} questions, corpus of {len(docs)} articles", file=sys.stderr)
