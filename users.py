"""Simulated users: the other side of every conversation the agent has (UserRL, arXiv 2509.19736, section 3).

A gym never talks to a model directly. For each LLM-backed role it plays (a quiz host, a judge, a person to
persuade) it calls

    user.act(role, messages, rule=fn, **facts)   # e.g. role "turtle.host", rule host_rule, task=..., question=...

`messages` is the role's prompt and `rule` the role's deterministic stand-in, both written in the gym's module
(gyms/<name>.py). An LLM backend answers `messages` and ignores `rule`; the scripted backend ignores `messages`
and returns `rule(**facts)`, text in the same format the prompt asks the LLM for, so both go through the gym's
same parser. This module also holds what the gyms share for that: parsers of what an LLM wrote, keyword
matching for the scripted rules, and HTTP retries.

    user = make_user("scripted")                                         # offline: rules, for tests and demos
    user = make_user("http", base_url="http://localhost:8000/v1",        # vLLM / SGLang / OpenAI
                     model="Qwen/Qwen3-32B", max_concurrency=64)
    user = make_user("hf", model="Qwen/Qwen3-4B")                        # a transformers model in-process

The hf user is a whole model in the trainer's process: in training, every rank loads its own copy onto its own
GPU (a 32B user is 64 GB per rank, beside the policy). For large users, serve them once instead: train.py's
`--user.serve_cmd "vllm serve Qwen/Qwen3-32B --port {port}" --user.serve_gpus 2` starts an OpenAI-compatible server
on GPUs of its own (UserServer, below) and points the http user at it.

Every way an endpoint can fail after its retries raises UserError (the rollout catches it per episode), with a
short stable `reason` (http_500, timeout, ...: REASONS) that train.py counts per step. Its message never contains
the API key, and the key is read only from the environment (`api_key_env`), never from a flag or a file.
"""
import _thread
import ast
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

import requests


REASONS = {
    "http_<status>": "the endpoint answered with that status: 429 or 5xx after every retry, any other at once",
    "timeout": "no reply within the timeout, every attempt",
    "connection": "the connection was refused or dropped, every attempt",
    "malformed_json": "a 200 reply whose body is not JSON, every attempt",
    "empty_choices": "a 200 reply without an assistant message (no choices), every attempt",
    "no_rule": "the scripted user was asked for a free-form reply",
    "server": "the user server started for the run failed (train.py stops)",
    "other": "anything else",
}
"""UserError.reason codes. A role's reply in the wrong format is not among them: the gyms read it as a reply that
says nothing (reward 0), and the episode goes on."""


class UserError(RuntimeError):
    """A simulated user could not reply (endpoint down, stalled, rate-limited or returning junk, after retries).
    `reason` is one of REASONS. The text starts with it ("http_500: http://...: HTTP 500 ..."), so a failure kept
    as text (rollout's info["error"]) still says why: failure_reason reads it back."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(f"{reason}: {message}")
        self.message, self.reason = message, reason

    def __reduce__(self):  # pickled as its two fields (the default would re-prefix the text)
        return type(self), (self.message, self.reason)


REASON_RE = re.compile(r"(?:^|UserError: )(http_\d{3}|[a-z][a-z_]*): ")


def failure_reason(error: str) -> str:
    """The reason code of a failed episode's error text: a UserError's, or the rollout's own ("env_timeout: ...");
    "other" when the text names none."""
    m = REASON_RE.search(error or "")
    return m.group(1) if m else "other"


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
    """"Yes", "No" or "Maybe": the reply's JSON "answer" when it has one (the roles are asked to reason in a "thought"
    first, which may well say "no" on the way), else the first of those words in the reply; or None."""
    verdict = extract_json(text)
    if verdict is not None and isinstance(verdict.get("answer"), str):
        text = verdict["answer"]
    m = re.search(r"\b(yes|no|maybe)\b", strip_think(text)[:MAX_PARSE_CHARS], re.I)
    return m.group(1).capitalize() if m else None


# ----------------------------------------------------------------------------------------------------------
# Keyword matching: the scripted rules' only tool. Whole words or phrases, case-insensitive.


@lru_cache(maxsize=8192)
def keyword_re(keyword: str, plural: bool = False):
    words = [re.escape(w) for w in keyword.lower().split()]
    # lookarounds instead of \b so that keywords such as "c++" or "after-school" still match whole
    end = r"(?:s|es)?(?!\w)" if plural else r"(?!\w)"
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + end, re.I) if words else None


def keyword_spans(text: str, keywords) -> list:
    spans = []
    for kw in keywords:
        pattern = keyword_re(kw)
        if pattern is not None:
            spans += [m.span() for m in pattern.finditer(text)]
    return spans


def mentions(text: str, keywords, plural: bool = False) -> bool:
    """Does `text` contain one of `keywords` (with `plural`, also "bags" for "bag", "buses" for "bus")?"""
    return any((p := keyword_re(kw, plural)) is not None and p.search(text) for kw in keywords)


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
# The scripted backend


class ScriptedUser:
    """Deterministic rules, no model and no network: `act` runs the rule the gym hands it for the role."""

    def act(self, role: str, messages: list, rule=None, **facts) -> str:
        if rule is None:
            raise ValueError(f"scripted user: no rule for role {role!r}; a gym passes its rule as "
                             "act(role, messages, rule=fn, **facts)")
        return rule(**facts)

    def reply(self, messages: list) -> str:
        raise UserError("the scripted user has no free-form reply: it answers only a role, through act()", "no_rule")

    def reply_batch(self, batch: list) -> list:
        return [self.reply(m) for m in batch]


# ----------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint (vLLM, SGLang, OpenAI, ...)


def shown(text: str, secret: str = "", n: int = 200) -> str:
    """A reply body for an error message: the secret masked first, then cut to n characters (cut first, a key that
    straddles the cut would leave its first characters in the message)."""
    return repr((text.replace(secret, "***") if secret else text)[:n])


def post_with_retries(post, url: str, body: dict, headers: dict, *, timeout: float, max_retries: int,
                      backoff: float, read, fail, where: str = "", secret: str = ""):
    """POST `body` as JSON to `url` with `post` (requests.post or a Session's) and return `read(response)` of a
    200 reply. Timeouts, connection errors, 429, 5xx and a reply that `read` finds malformed (it returns None)
    are retried after `backoff` seconds, doubling each time (longer when a Retry-After header asks, up to 60 s);
    any other status is final. Every failure raises `fail(message, reason)`, the caller's error with its key hidden
    (`reason`: a REASONS code); `where` names the endpoint in messages (default: the url); `secret`, the key, is
    masked in the reply bodies quoted. Shared by HTTPUser and search.SerperSearch."""
    where = where or url
    attempts = max_retries + 1
    for attempt in range(attempts):
        wait = backoff * 2 ** attempt
        try:
            r = post(url, json=body, headers=headers, timeout=timeout)
        except requests.Timeout:
            problem, reason = f"no reply within {timeout} s", "timeout"
        except requests.RequestException as e:
            problem, reason = f"connection failed ({type(e).__name__})", "connection"
        else:
            if r.status_code == 429 or r.status_code >= 500:
                problem, reason = f"HTTP {r.status_code}: {shown(r.text, secret)}", f"http_{r.status_code}"
                retry_after = r.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, min(float(retry_after), 60.0))
            elif r.status_code != 200:  # 400, 401, 404...: asking again will not help
                raise fail(f"{where}: HTTP {r.status_code}: {shown(r.text, secret, 300)}", f"http_{r.status_code}")
            else:
                result = read(r)
                if result is not None:
                    return result
                problem, reason = f"malformed response: {shown(r.text, secret)}", _malformed_reason(r)
        if attempt + 1 < attempts:
            time.sleep(wait)
    raise fail(f"{where}: {problem} (gave up after {attempts} attempts)", reason)


def _malformed_reason(r) -> str:
    """malformed_json for a body that is not JSON, else empty_choices (JSON without an assistant message)."""
    try:
        r.json()
    except ValueError:
        return "malformed_json"
    return "empty_choices"


CUT = "cut_by_max_tokens"
"""a key _assistant_message adds (True) to a reply max_tokens ended (finish_reason "length"); the HTTP-agent loop
pops it before the message joins the conversation (rollout.py counts the turn in cut_turns)"""


def _assistant_message(r):
    """The assistant message of a chat-completions reply, or None when the reply is malformed (retried)."""
    try:
        choice = r.json()["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    return {"role": "assistant", **message, **({CUT: True} if choice.get("finish_reason") == "length" else {})}


@dataclass
class HTTPSettings:
    """The fields of an OpenAI-compatible endpoint's client: HTTPUser's, and (through UserConfig) train.py's
    --user.* keys. One definition, so the trainer and the client cannot drift apart."""

    model: str = ""
    """http: the model name the server serves, e.g. Qwen/Qwen3-32B or gpt-4o; hf: a hub id or local folder"""
    base_url: str = ""
    """e.g. http://localhost:8000/v1; empty means $OPENAI_BASE_URL"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the key (sent as a Bearer token; none sent when it is unset; never logged)"""
    temperature: float = 0.0
    """sampling temperature of the simulated user (the original's users and judges are greedy)"""
    max_tokens: int = 2048
    """reply length limit (the original's)"""
    timeout: float = 60.0
    """seconds per request; the original's 10 s cuts off long replies from a busy local server"""
    max_retries: int = 3
    """retries after the first attempt, on timeouts, connection errors, 429, 5xx and malformed replies"""
    backoff: float = 1.0
    """seconds before the first retry, doubling after each (a Retry-After header can ask for longer)"""
    max_concurrency: int = 64
    """requests in flight at once from this client, across all threads that share it (per rank in training)"""
    extra_body: dict = field(default_factory=dict)
    """merged into every request, e.g. {"chat_template_kwargs": {"enable_thinking": false}} for Qwen3"""


@dataclass
class HTTPUser(HTTPSettings):
    """POST {base_url}/chat/completions, thread-safe, with at most `max_concurrency` requests in flight."""

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

    def _fail(self, message: str, reason: str) -> UserError:
        key = self._key()
        return UserError(message.replace(key, "***") if key else message, reason)

    def probe(self, timeout: float = 10.0) -> list:
        """Check once, before any work, that GET {base_url}/models answers and lists `model`; returns the served
        names. Raises UserError naming the endpoint (never the key): a run against a dead endpoint would otherwise
        "succeed" with every episode failed."""
        url = self.base_url + "/models"
        headers = {"Authorization": f"Bearer {self._key()}"} if self._key() else {}
        try:
            r = requests.get(url, headers=headers, timeout=timeout)
        except requests.RequestException as e:
            raise self._fail(f"cannot reach {url} ({type(e).__name__}): is the server running?", "connection") from None
        if r.status_code != 200:
            raise self._fail(f"{url} answered HTTP {r.status_code}: {shown(r.text, self._key())}",
                             f"http_{r.status_code}")
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise self._fail(f"{url} did not answer with a model list: {shown(r.text, self._key())}",
                             "malformed_json") from None
        if self.model not in served:
            raise self._fail(f"{url} does not serve {self.model!r}; it serves {served[:20]}", "other")
        return served

    def complete(self, messages: list, tools: list | None = None, env=None) -> dict:
        """The assistant message (a dict with `content` and maybe `tool_calls`) the endpoint returns. `env` is
        ignored: rollout's agent loop passes it to every agent (envs.ExpertAgent reads it)."""
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
                                     fail=self._fail, secret=self._key())

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
    """A causal LM loaded with `models.load_model`, replying greedily; batched, one generation at a time. One copy
    per process: in training that is one per rank, on the rank's GPU (see the module docstring for large users)."""

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


@dataclass
class UserConfig(HTTPSettings):
    """The simulated user as a config (train.py's --user.*): a backend, HTTPUser's fields for http; the hf user
    takes `model` and `max_tokens` (greedy, as the original's users)."""

    backend: str = "scripted"
    """scripted (offline rules), http (any OpenAI-compatible endpoint), hf (a transformers model in-process: one
    copy per rank, on the rank's GPU; for a large user use serve_cmd)"""
    probe: bool = True
    """http: check at start that GET {base_url}/models answers and serves `model`; false for endpoints that have
    no /models route"""
    serve_cmd: str = ""
    """http: a command that serves the OpenAI API, started by train.py for the run and stopped at its end, e.g.
    "vllm serve Qwen/Qwen3-32B --port {port} --tensor-parallel-size 2"; {port} becomes a free port and the http
    user talks to it (base_url is then ignored). Its output goes to user-server.log in the run folder"""
    serve_gpus: int = 0
    """GPUs the started server gets: the LAST N visible ones (its CUDA_VISIBLE_DEVICES); training uses the others.
    0 on a machine without GPUs"""
    serve_timeout: float = 1800.0
    """seconds the started server may take to answer GET /models (loading a 32B model takes minutes)"""


def from_config(cfg: UserConfig):
    """The user a UserConfig describes; None for scripted (envs.make_env builds one per env)."""
    if cfg.backend == "scripted":
        return None
    if cfg.backend == "hf":
        return make_user("hf", model=cfg.model, max_new_tokens=cfg.max_tokens)
    return make_user("http", **{f.name: getattr(cfg, f.name) for f in fields(HTTPSettings)})


# ----------------------------------------------------------------------------------------------------------
# Starting the simulated user's own server (train.py --user.serve_cmd): the paper's user, Qwen3-32B, needs GPUs
# of its own, so a one-box run starts it beside the trainer and points the http user at it.


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race with another process is possible but rare)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _term_when_parent_dies():
    """Runs in the server's process before its command (Linux): the kernel sends it SIGTERM when the process that
    started it dies, even by SIGKILL or the OOM killer, when `close()` never runs. Without it the server (and the
    GPUs it holds) outlives a killed run. prctl option 1 is PR_SET_PDEATHSIG."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class UserServer:
    """Runs `cmd`, any command that serves the OpenAI API on 127.0.0.1 (e.g. "vllm serve Qwen/Qwen3-32B --port
    {port}"), as a child process in its own process group, with `env` applied to this process's environment (a
    value of None removes the variable; train.py sets CUDA_VISIBLE_DEVICES to the GPUs kept for it). "{port}" in
    `cmd` becomes a free port. Its output goes to `log_path`. `start()` returns the base url once
    `GET {base_url}/models` answers 200; a server that exits or is not healthy within `timeout` seconds raises
    UserError with the last lines of its log. `close()` stops the whole process group (SIGTERM, then SIGKILL after
    `grace` seconds); it is safe to call twice. Use it as a context manager so every exit path stops it, and
    `watch(on_exit)` to hear of a server that dies during the run."""

    def __init__(self, cmd: str, log_path, env: dict | None = None, timeout: float = 1800.0, grace: float = 30.0):
        if not cmd.strip():
            raise ValueError("user server: empty command")
        self.port = free_port()
        self.cmd = cmd.replace("{port}", str(self.port))
        self.log_path, self.env, self.timeout, self.grace = log_path, dict(env or {}), timeout, grace
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = None
        self._closed = threading.Event()

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return "(no log)"

    def start(self) -> str:
        import shlex
        import subprocess

        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
        self.proc = subprocess.Popen(shlex.split(self.cmd), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True,
                                     preexec_fn=_term_when_parent_dies if sys.platform == "linux" else None)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise UserError(f"user server exited with code {self.proc.returncode} before it was healthy: "
                                f"{self.cmd!r}; last lines of {self.log_path}:\n{self.tail()}", "server")
            try:
                if requests.get(self.base_url + "/models", timeout=5).status_code == 200:
                    return self.base_url
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise UserError(f"user server not healthy after {self.timeout:.0f} s ({self.base_url}/models): {self.cmd!r}; "
                        f"last lines of {self.log_path}:\n{self.tail()}", "server")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def watch(self, on_exit, every: float = 1.0):
        """Call `on_exit()` (from a daemon thread) if the server exits before `close()`."""
        def loop():
            while not self._closed.wait(every):
                if not self.alive() and not self._closed.is_set():
                    on_exit()
                    return

        threading.Thread(target=loop, daemon=True, name="user-server-watch").start()

    def close(self):
        import signal
        import subprocess

        self._closed.set()
        if self.proc is not None:
            # The whole group: servers such as vLLM start worker processes of their own.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(self.grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM, the leader or a worker
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def serve(cfg: UserConfig, log_path, gpus: list, env: dict | None = None):
    """The server `cfg.serve_cmd` for the length of a `with` block (train.py: the whole run) on `gpus` (its
    CUDA_VISIBLE_DEVICES; `env`: more of its environment, as UserServer takes it), its output in `log_path`;
    yields its base URL, or None when there is no command. It is started and probed (it must serve `cfg.model`)
    before the block and stopped on every way out of it. If it exits while the block runs, the main thread is
    interrupted as by Ctrl-C, and the block ends with UserError and the last lines of its log, however the
    interruption was handled on its way out."""
    if not cfg.serve_cmd:
        yield None
        return
    server = UserServer(cfg.serve_cmd, log_path, env={"CUDA_VISIBLE_DEVICES": ",".join(gpus), **(env or {})},
                        timeout=cfg.serve_timeout)
    print(f"user server: {server.cmd} (GPUs: {','.join(gpus) or 'none'}; output in {log_path}) ...", flush=True)
    died = []
    with server:
        try:
            from_config(replace(cfg, base_url=server.base_url)).probe()
        except UserError as e:
            raise UserError(f"user server: {e.message}; check --user.model against the command ({server.cmd!r})",
                            "server") from None
        print(f"user server: ready at {server.base_url}", flush=True)
        server.watch(lambda: (died.append(server.proc.returncode), _thread.interrupt_main()))
        try:
            yield server.base_url
        finally:
            if died:
                raise UserError(f"user server exited with code {died[0]} during the run: {server.cmd!r}; last lines "
                                f"of {log_path}:\n{server.tail()}", "server") from None
