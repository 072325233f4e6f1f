"""Simulated users: reply parsing, keyword rules, the scripted roles, the http backend against a real loopback
server (healthy, failing, stalling, rate-limiting, junk-returning), and the in-process hf backend."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import envs
import models
import users

KEY = "sk-test-SECRET-4242"


# ----------------------------------------------------------------------------------------------------------
# Parsing and keyword rules


def test_extract_json_and_yes_no():
    assert users.extract_json('Here:\n```json\n{"a": 1}\n```\nbye') == {"a": 1}
    assert users.extract_json("<think>{\"a\": 0}</think> {'a': True, 'b': None}") == {"a": True, "b": None}
    assert users.extract_json('prefix {"x": [1, 2]} suffix') == {"x": [1, 2]}
    for junk in ["", "no json", "{broken", "[1, 2]", "{__import__('os')}", "{" * 5000 + "}" * 5000]:
        assert users.extract_json(junk) is None, junk
    assert users.extract_yes_no("<think>no, wait</think>**Yes**, it is.") == "Yes"
    assert users.extract_yes_no("MAYBE") == "Maybe" and users.extract_yes_no("Nothing to say") is None


def test_keyword_matching_is_whole_word_and_longest_match_wins():
    assert users.mentions("Is it a cat?", ["cat"]) and not users.mentions("Which category?", ["cat"])
    assert users.mentions("Does it have a long\nneck?", ["long neck"]) and users.mentions("C++ code", ["c++"])
    yes, no = ["animal", "grows on a plant"], ["farm animal", "plant", "tree"]
    assert users.keyword_answer("Is it an animal?", yes, no) == "Yes"
    assert users.keyword_answer("Is it a farm animal?", yes, no) == "No"
    assert users.keyword_answer("Does it grow on a tree?", yes, no) == "No"
    assert users.keyword_answer("Does it grows on a plant?", yes, no) == "Yes"  # "plant" inside the longer phrase
    assert users.keyword_answer("Is it an animal that lives in a tree?", yes, no) == "No"
    assert users.keyword_answer("Is it red?", yes, no) == "Maybe"


def test_scripted_user_runs_the_rule_it_is_handed_and_errors():
    user = users.make_user("scripted")  # no gym imported for it: it holds no table of roles
    assert user.act("weather.oracle", [{"role": "user", "content": "rain?"}], rule=lambda city: f"Rain in {city}.",
                    city="Oslo") == "Rain in Oslo."
    with pytest.raises(ValueError, match="no rule for role 'weather.oracle'"):
        user.act("weather.oracle", [])
    with pytest.raises(users.UserError, match="act"):
        user.reply([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown user backend"):
        users.make_user("telepathic")
    with pytest.raises(TypeError, match="scripted"):
        users.make_user("scripted", model="x")


# ----------------------------------------------------------------------------------------------------------
# A real OpenAI-shaped HTTP server on 127.0.0.1


class Server:
    """Answers POST /v1/chat/completions. `mode`: ok | fail | stall | junk | bad_request | rate_limit | flaky."""

    def __init__(self, mode="ok", hold=0.0, fail_first=0):
        self.mode, self.hold, self.fail_first = mode, hold, fail_first
        self.bodies, self.headers = [], []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    n = len(outer.bodies)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    outer.release.wait(outer.hold if outer.mode != "stall" else 10)
                finally:  # out of flight before the reply is written: the client may send its next request on it
                    with outer.lock:
                        outer.in_flight -= 1
                outer.respond(self, body, n)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def respond(self, handler, body, n):
        mode = "fail" if self.mode == "flaky" and n <= self.fail_first else self.mode
        if mode == "stall":
            return
        if mode in ("fail", "rate_limit", "bad_request"):
            status = {"fail": 500, "rate_limit": 429, "bad_request": 400}[mode]
            # a careless server that echoes the credentials it got, across the point where error messages cut a
            # reply short (200 characters): no part of them may reach an error message
            payload = f"server error; {'.' * 166}you sent {handler.headers.get('Authorization')}".encode()
            handler.send_response(status)
            if mode == "rate_limit":
                handler.send_header("Retry-After", "3")
        elif mode == "junk":
            payload = b"<html>not json</html>"
            handler.send_response(200)
        else:
            message = {"role": "assistant", "content": "<think>let me see</think>echo: " + body["messages"][-1]["content"]}
            if body.get("tools"):
                message["tool_calls"] = [{"id": "c1", "type": "function", "function": {
                    "name": "interact_with_env", "arguments": '{"choice": "answer", "content": "16"}'}}]
            payload = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(mode="ok", **kw):
        servers.append(Server(mode, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Backoff sleeps, recorded instead of slept."""
    slept = []
    monkeypatch.setattr(users.time, "sleep", slept.append)
    return slept


def http_user(server, **kw):
    return users.make_user("http", base_url=server.url, model="user-model", api_key_env="TEST_USER_KEY", **kw)


MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it big?"}]


def test_http_reply_request_shape_and_key(serve, monkeypatch):
    monkeypatch.setenv("TEST_USER_KEY", KEY)
    s = serve()
    user = http_user(s, max_tokens=77)
    assert user.reply(MSG) == "echo: Is it big?"  # the reasoning block is not part of the reply
    body, headers = s.bodies[0], s.headers[0]
    assert body["model"] == "user-model" and body["temperature"] == 0.0 and body["max_tokens"] == 77
    assert body["messages"] == MSG and "tools" not in body
    assert headers["Authorization"] == f"Bearer {KEY}"
    message = user.complete(MSG, tools=[envs.TOOL_SCHEMA])
    assert s.bodies[1]["tools"] == [envs.TOOL_SCHEMA] and message["role"] == "assistant"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"choice": "answer", "content": "16"}
    assert user.reply_batch([MSG[:1] + [{"role": "user", "content": str(i)}] for i in range(5)]) == [f"echo: {i}" for i in range(5)]


def test_http_base_url_from_environment_and_config_errors(serve, monkeypatch):
    s = serve()
    monkeypatch.setenv("OPENAI_BASE_URL", s.url + "/")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    user = users.make_user("http", model="m")
    assert user.reply(MSG) == "echo: Is it big?" and "Authorization" not in s.headers[0]  # no key: no header
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        users.make_user("http", model="m")
    with pytest.raises(ValueError, match="model"):
        users.make_user("http", base_url=s.url)
    with pytest.raises(TypeError, match="http user"):
        users.make_user("http", base_url=s.url, model="m", temprature=0.5)


def test_http_failing_server_retries_with_exponential_backoff_and_hides_the_key(serve, sleeps, monkeypatch):
    monkeypatch.setenv("TEST_USER_KEY", KEY)
    s = serve("fail")
    with pytest.raises(users.UserError) as err:
        http_user(s, max_retries=3, backoff=0.5).reply(MSG)
    assert len(s.bodies) == 4 and sleeps == [0.5, 1.0, 2.0]
    assert "HTTP 500" in str(err.value) and "4 attempts" in str(err.value)
    assert KEY[:8] not in str(err.value) and KEY[:8] not in repr(err.value) and "***" in str(err.value)


def test_http_flaky_server_recovers_and_rate_limit_honours_retry_after(serve, sleeps):
    s = serve("flaky", fail_first=2)
    assert http_user(s, max_retries=3, backoff=0.1).reply(MSG) == "echo: Is it big?"
    assert len(s.bodies) == 3 and sleeps == [0.1, 0.2]
    sleeps.clear()
    limited = serve("rate_limit")
    with pytest.raises(users.UserError, match="HTTP 429"):
        http_user(limited, max_retries=2, backoff=0.1).reply(MSG)
    assert sleeps == [3.0, 3.0]  # the server's Retry-After beats a shorter backoff


def test_http_stalling_server_times_out_per_attempt(serve, sleeps):
    s = serve("stall")
    with pytest.raises(users.UserError, match="no reply within 0.2 s"):
        http_user(s, timeout=0.2, max_retries=1, backoff=0.0).reply(MSG)
    assert len(s.bodies) == 2


def test_http_junk_bad_request_and_refused_connection(serve, sleeps, monkeypatch):
    monkeypatch.setenv("TEST_USER_KEY", KEY)
    junk = serve("junk")
    with pytest.raises(users.UserError, match="malformed response"):
        http_user(junk, max_retries=1, backoff=0).reply(MSG)
    assert len(junk.bodies) == 2
    bad = serve("bad_request")
    with pytest.raises(users.UserError, match="HTTP 400") as err:
        http_user(bad, max_retries=3).reply(MSG)
    assert len(bad.bodies) == 1 and KEY not in str(err.value)  # a 400 is not retried
    closed = serve()
    closed.close()
    with pytest.raises(users.UserError, match="connection failed"):
        http_user(closed, max_retries=1, backoff=0).reply(MSG)


def test_http_concurrency_is_bounded_across_threads(serve):
    s = serve(hold=0.05)
    user = http_user(s, max_concurrency=3)
    replies = [None] * 12

    def call(i):
        replies[i] = user.reply([{"role": "user", "content": str(i)}])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == [f"echo: {i}" for i in range(12)]
    assert 1 <= s.max_in_flight <= 3


def test_gym_over_http_user_and_failure_propagates(serve, sleeps):
    class Judge(Server):
        def respond(self, handler, body, n):
            text = '```json\n{"correct": true}\n```' if "judge" in body["messages"][0]["content"] else "Yes."
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)

    s = Judge()
    try:
        env = envs.make_env("telepathy", {"id": "x", "category": "animal", "entity": "okapi", "description": "d"},
                            user=http_user(s))
        env.reset()
        assert env.step("[action] Is it striped?")[0].startswith("Yes")
        assert env.step("[answer] okapi")[1:3] == (1.0, True)
        assert "okapi" in s.bodies[0]["messages"][0]["content"]
    finally:
        s.close()
    down = serve("fail")
    env = envs.make_env("telepathy", {"id": "x", "category": "animal", "entity": "okapi", "description": "d"},
                        user=http_user(down, max_retries=1))
    env.reset()
    with pytest.raises(users.UserError):
        env.step("[action] Is it striped?")


# ----------------------------------------------------------------------------------------------------------
# In-process transformers model


def test_hf_user_batches_and_is_thread_safe(tiny, monkeypatch):
    _, tok = tiny  # the session's tiny tokenizer (training one takes seconds), with a fresh model
    monkeypatch.setattr(models, "load_model", lambda name, seed, dtype: (models.build_tiny_model(tok, seed=seed), tok))
    user = users.make_user("hf", model="tiny", max_new_tokens=4, device="cpu")
    batch = [[{"role": "user", "content": f"question {i}" * (i + 1)}] for i in range(3)]
    out = user.reply_batch(batch)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert user.act("turtle.host", batch[0], task={}) == user.reply(batch[0])  # greedy: the same text twice
    results = []
    threads = [threading.Thread(target=lambda: results.append(user.reply(batch[1]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert tok.padding_side == "right"  # the shared tokenizer is left as it was
    with pytest.raises(ValueError, match="dtype"):
        users.make_user("hf", model="tiny", dtype="int8")
