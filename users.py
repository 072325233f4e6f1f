"""Simulated users: the other side of every conversation the agent has (UserRL, arXiv 2509.19736, section 3).

A gym never talks to a model directly. For each LLM-backed role it plays (a quiz host, a judge, a person to
persuade) it calls

    user.act(role, messages, **facts)      # e.g. role "turtle.host", facts task=..., question=...

`messages` is the role's prompt (written in envs.py, next to the gym). An LLM backend answers it; the
scripted backend ignores it and applies the deterministic rule registered for `role` in ROLES to `facts`,
returning text in the same format the prompt asks the LLM for, so both go through the gym's same parser.
The tool-backed gyms keep their roles' prompts and rules next to their worlds (travel.py, retail.py, search.py),
which use this module's parsers, keyword matching and HTTP retries; envs.py adds their rules to ROLES.

    user = make_user("scripted")                                         # offline: rules, for tests and demos
    user = make_user("http", base_url="http://localhost:8000/v1",        # vLLM / SGLang / OpenAI
                     model="Qwen/Qwen3-32B", max_concurrency=64)
    user = make_user("hf", model="Qwen/Qwen3-4B")                        # a transformers model in-process

Every way an endpoint can fail after its retries raises UserError (the rollout catches it per episode).
Its message never contains the API key.
"""
import ast
import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import requests


class UserError(RuntimeError):
    """A simulated user could not reply (endpoint down, stalled, rate-limited or returning junk, after retries)."""


# ----------------------------------------------------------------------------------------------------------
# Reading what an LLM role wrote. Models wrap JSON in ```json fences, think first, or write Python literals;
# none of that may crash a gym (the gym falls back with reward 0 when these return None).

THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.S)
FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
MAX_PARSE_CHARS = 20_000


def strip_think(text: str) -> str:
    return THINK_RE.sub("", text or "").strip()


def extract_json(text: str):
    """The first JSON object in `text` (fenced or bare) as a dict, or None."""
    text = strip_think(text)[:MAX_PARSE_CHARS]
    candidates = FENCE_RE.findall(text)
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start:end + 1])
    for c in candidates:
        for parse in (json.loads, ast.literal_eval):  # literal_eval reads {'a': True} and never runs code
            try:
                value = parse(c.strip())
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                continue
            if isinstance(value, dict):
                return value
    return None


def extract_yes_no(text: str):
    """"Yes", "No" or "Maybe": the first of those words in the reply, or None."""
    m = re.search(r"\b(yes|no|maybe)\b", strip_think(text)[:MAX_PARSE_CHARS], re.I)
    return m.group(1).capitalize() if m else None


# ----------------------------------------------------------------------------------------------------------
# Keyword matching: the scripted rules' only tool. Whole words or phrases, case-insensitive.


@lru_cache(maxsize=8192)
def _keyword_re(keyword: str, plural: bool = False):
    words = [re.escape(w) for w in keyword.lower().split()]
    # lookarounds instead of \b so that keywords such as "c++" or "after-school" still match whole
    end = r"(?:s|es)?(?!\w)" if plural else r"(?!\w)"
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + end, re.I) if words else None


def keyword_spans(text: str, keywords) -> list:
    spans = []
    for kw in keywords:
        pattern = _keyword_re(kw)
        if pattern is not None:
            spans += [m.span() for m in pattern.finditer(text)]
    return spans


def mentions(text: str, keywords, plural: bool = False) -> bool:
    """Does `text` contain one of `keywords` (with `plural`, also "bags" for "bag", "buses" for "bus")?"""
    return any((p := _keyword_re(kw, plural)) is not None and p.search(text) for kw in keywords)


def keyword_answer(question: str, yes, no) -> str:
    """Yes / No / Maybe to a yes-no question from lists of phrases that are true / false of the hidden thing.

    A match inside a longer match is ignored ("farm animal" is false even though "animal" is true); then any
    false phrase makes the answer No (a question usually conjoins its conditions), else any true one Yes."""
    spans = [(s, e, True) for s, e in keyword_spans(question, yes)] + [(s, e, False) for s, e in keyword_spans(question, no)]
    kept = [a for a in spans if not any(b[0] <= a[0] and a[1] <= b[1] and b[1] - b[0] > a[1] - a[0] for b in spans)]
    if any(not truth for _, _, truth in kept):
        return "No"
    return "Yes" if kept else "Maybe"


# ----------------------------------------------------------------------------------------------------------
# Scripted roles: one function per role, registered in ROLES. Each returns what the role's prompt asks an LLM
# to return. A later gym adds its roles the same way (a function and a line).


def telepathy_answerer(task, question):
    names = [task["entity"], *task.get("synonyms", [])]
    return keyword_answer(question, [*names, *task["attributes"]["yes"]], task["attributes"]["no"])


def telepathy_judge(task, guess):
    # A guess names the thing and is short; "lion or giraffe" hedges, and a long list is not a guess.
    names = [task["entity"], *task.get("synonyms", [])]
    hit = [n for n in names if mentions(guess, [n])]
    rest = guess
    for n in hit:
        rest = _keyword_re(n).sub(" ", rest)
    correct = bool(hit) and len(rest.split()) <= 6 and not mentions(rest, ["or"])
    return json.dumps({"correct": correct})


def turtle_host(task, question):
    return keyword_answer(question, task["host_facts"]["yes"], task["host_facts"]["no"])


def criterion_score(story: str, groups) -> float:
    """1 when every keyword group is matched, 0.5 when at least half are, else 0 (no groups: 0, unjudgeable)."""
    if not groups:
        return 0.0
    matched = sum(mentions(story, group) for group in groups)
    return 1.0 if matched == len(groups) else 0.5 if 2 * matched >= len(groups) else 0.0


def turtle_judge(task, story):
    return json.dumps({"scores": [criterion_score(story, c.get("keywords", [])) for c in task["criteria"]]})


def intention_user(task, question):
    # The person answers what was asked, picking their first option for every detail the question touches.
    picks = [d["options"][0] for d in task["missing_details"] if d.get("options") and mentions(question, d.get("keywords", []))]
    if not picks:
        return "I don't have a particular preference about that."
    return " ".join(p[0].upper() + p[1:] + "." for p in picks)


def intention_evaluator(task, remaining, question):
    covered = [i + 1 for i, d in enumerate(remaining) if mentions(question, d.get("keywords", []))]
    return json.dumps({"covered": covered, "task_related": bool(covered)})


def persuade_persuadee(task, stance, scale, history, argument):
    # Moves toward disagreement by ceil(levels / counterpoints) per counterpoint raised for the first time,
    # so raising every counterpoint reaches the far end of the scale; repetition and pressure move nothing.
    points = task.get("counterpoints", [])
    heard = {i for i, cp in enumerate(points) for h in history if mentions(h, cp["keywords"])}
    new = [i for i, cp in enumerate(points) if i not in heard and mentions(argument, cp["keywords"])]
    level = scale.index(stance)
    if new:
        level = min(len(scale) - 1, level + math.ceil((len(scale) - 1) / len(points)) * len(new))
        response = "That is a point I had not weighed properly, and it does make me less sure."
    else:
        response = "I don't hear anything new in that, so I stay where I was."
    return json.dumps({"response": response, "stance": scale[level]})


ROLES = {
    "telepathy.answerer": telepathy_answerer,
    "telepathy.judge": telepathy_judge,
    "turtle.host": turtle_host,
    "turtle.judge": turtle_judge,
    "intention.user": intention_user,
    "intention.evaluator": intention_evaluator,
    "persuade.persuadee": persuade_persuadee,
}
# The tool-backed gyms' roles (travel.py, retail.py, search.py) are added by envs.py: those modules import this
# one, so importing them here would be circular.


class ScriptedUser:
    """Deterministic rules per role; needs no model and no network."""

    def act(self, role: str, messages: list, **facts) -> str:
        if role not in ROLES:
            raise KeyError(f"no scripted rule for role {role!r}; known roles: {sorted(ROLES)}")
        return ROLES[role](**facts)

    def reply(self, messages: list) -> str:
        raise UserError("the scripted user has no free-form reply: it answers only a role, through act()")

    def reply_batch(self, batch: list) -> list:
        return [self.reply(m) for m in batch]


# ----------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint (vLLM, SGLang, OpenAI, ...)


def post_with_retries(post, url: str, body: dict, headers: dict, *, timeout: float, max_retries: int,
                      backoff: float, read, fail, where: str = ""):
    """POST `body` as JSON to `url` with `post` (requests.post or a Session's) and return `read(response)` of a
    200 reply. Timeouts, connection errors, 429, 5xx and a reply that `read` finds malformed (it returns None)
    are retried after `backoff` seconds, doubling each time (longer when a Retry-After header asks, up to 60 s);
    any other status is final. Every failure raises `fail(message)`, the caller's error with its key hidden;
    `where` names the endpoint in messages (default: the url). Shared by HTTPUser and search.SerperSearch."""
    where = where or url
    attempts = max_retries + 1
    for attempt in range(attempts):
        wait = backoff * 2 ** attempt
        try:
            r = post(url, json=body, headers=headers, timeout=timeout)
        except requests.Timeout:
            problem = f"no reply within {timeout} s"
        except requests.RequestException as e:
            problem = f"connection failed ({type(e).__name__})"
        else:
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"HTTP {r.status_code}: {r.text[:200]!r}"
                retry_after = r.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, min(float(retry_after), 60.0))
            elif r.status_code != 200:  # 400, 401, 404...: asking again will not help
                raise fail(f"{where}: HTTP {r.status_code}: {r.text[:300]!r}")
            else:
                result = read(r)
                if result is not None:
                    return result
                problem = f"malformed response: {r.text[:200]!r}"
        if attempt + 1 < attempts:
            time.sleep(wait)
    raise fail(f"{where}: {problem} (gave up after {attempts} attempts)")


def _assistant_message(r):
    """The assistant message of a chat-completions reply, or None when the reply is malformed (retried)."""
    try:
        message = r.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return {"role": "assistant", **message} if isinstance(message, dict) else None


@dataclass
class HTTPUser:
    """POST {base_url}/chat/completions, thread-safe, with at most `max_concurrency` requests in flight."""

    model: str = ""
    """model name the server serves, e.g. Qwen/Qwen3-32B or gpt-4o"""
    base_url: str = ""
    """e.g. http://localhost:8000/v1; empty means $OPENAI_BASE_URL"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the key (sent as a Bearer token; none sent when it is unset)"""
    temperature: float = 0.0
    """sampling temperature of the simulated user (the original uses 0)"""
    max_tokens: int = 2048
    """reply length limit (the original's)"""
    timeout: float = 60.0
    """seconds per request; the original's 10 s cuts off long replies from a busy local server"""
    max_retries: int = 3
    """retries after the first attempt, on timeouts, connection errors, 429, 5xx and malformed replies"""
    backoff: float = 1.0
    """seconds before the first retry, doubling after each (a Retry-After header can ask for longer)"""
    max_concurrency: int = 32
    """requests in flight at once from this object, across all threads that share it"""
    extra_body: dict = field(default_factory=dict)
    """merged into every request, e.g. {"chat_template_kwargs": {"enable_thinking": false}} for Qwen3"""

    def __post_init__(self):
        self.base_url = (self.base_url or os.environ.get("OPENAI_BASE_URL", "")).rstrip("/")
        if not self.base_url:
            raise ValueError("http user: no base_url given and OPENAI_BASE_URL is not set")
        if not self.model:
            raise ValueError("http user: model is required (the name the server serves)")
        if self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError("http user: max_concurrency must be >= 1 and max_retries >= 0")
        self.url = self.base_url + "/chat/completions"
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._local = threading.local()  # one requests.Session per thread: sessions are not thread-safe

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "")

    def _fail(self, message: str) -> UserError:
        key = self._key()
        return UserError(message.replace(key, "***") if key else message)

    def complete(self, messages: list, tools: list | None = None, env=None) -> dict:
        """The assistant message (a dict with `content` and maybe `tool_calls`) the endpoint returns."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        if tools:
            body["tools"] = tools
        headers = {"Authorization": f"Bearer {self._key()}"} if self._key() else {}
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        with self._slots:  # held through the backoff too, so a struggling server gets fewer requests, not more
            return post_with_retries(self._local.session.post, self.url, body, headers, timeout=self.timeout,
                                     max_retries=self.max_retries, backoff=self.backoff, read=_assistant_message,
                                     fail=self._fail)

    def reply(self, messages: list) -> str:
        content = self.complete(messages).get("content")
        return strip_think(content if isinstance(content, str) else "")

    def reply_batch(self, batch: list) -> list:
        if not batch:
            return []
        with ThreadPoolExecutor(max_workers=min(len(batch), self.max_concurrency)) as pool:
            return list(pool.map(self.reply, batch))

    def act(self, role: str, messages: list, **facts) -> str:
        return self.reply(messages)


# ----------------------------------------------------------------------------------------------------------
# A transformers causal LM in this process


@dataclass
class HFUser:
    """A causal LM loaded with `models.load_model`, replying greedily; batched, one generation at a time."""

    model: str = "tiny"
    """hub id, local folder, or "tiny" (the offline test model)"""
    max_new_tokens: int = 512
    """reply length limit"""
    device: str = ""
    """torch device; empty means cuda when available, else cpu"""
    dtype: str = ""
    """float32 or bfloat16; empty means bfloat16 on cuda, float32 on cpu"""
    enable_thinking: bool = False
    """passed to the chat template: Qwen3 users answer directly instead of reasoning first"""
    seed: int = 0
    """initialisation seed of the tiny model"""

    def __post_init__(self):
        import torch

        from models import load_model

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"hf user: dtype must be float32 or bfloat16, not {dtype!r}")
        self.lm, self.tokenizer = load_model(self.model, seed=self.seed, dtype=getattr(torch, dtype))
        self.lm.to(self.device).eval()
        self._lock = threading.Lock()

    def reply_batch(self, batch: list) -> list:
        import torch

        if not batch:
            return []
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=self.enable_thinking) for m in batch]
        # left padding keeps every prompt's end next to its reply
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=False).to(self.device)
        with self._lock:  # one generate at a time on the shared model
            with torch.no_grad():
                out = self.lm.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [strip_think(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def reply(self, messages: list) -> str:
        return self.reply_batch([messages])[0]

    def act(self, role: str, messages: list, **facts) -> str:
        return self.reply(messages)


BACKENDS = {"scripted": ScriptedUser, "http": HTTPUser, "hf": HFUser}


def make_user(backend: str = "scripted", **kwargs):
    """A simulated user: `scripted` (no arguments), `http` (see HTTPUser's fields) or `hf` (see HFUser's)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown user backend {backend!r}; known: {sorted(BACKENDS)}")
    try:
        return BACKENDS[backend](**kwargs)
    except TypeError as e:
        raise TypeError(f"{backend} user: {e}") from None
