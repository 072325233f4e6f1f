"""The simulated user's own server: the fault-injecting OpenAI-compatible test server (tests/openai_server.py)
seen through the http user, and users.UserServer starting, health-checking and stopping a server command."""
import os
import sys
import time
from pathlib import Path

import pytest
import requests

import users
from openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parent.parent
MSG = [{"role": "system", "content": "Answer Yes or No."}, {"role": "user", "content": "Is it big?"}]


@pytest.fixture
def server():
    made = []

    def start(**kw):
        made.append(OpenAIServer(**kw))
        return made[-1]

    yield start
    for s in made:
        s.close()


def client(srv, **kw):
    return users.make_user("http", base_url=srv.url, model=srv.model, **{"backoff": 0.01, "timeout": 2.0, **kw})


def test_healthy_server_lists_its_model_and_replies_in_every_roles_format(server):
    srv = server(model="m1")
    assert requests.get(srv.url + "/models", timeout=5).json()["data"][0]["id"] == "m1"
    reply = client(srv).reply(MSG)
    assert users.extract_yes_no(reply) == "Maybe" and users.extract_json(reply)["stance"] == "Strongly Agree"
    assert srv.counts == {"ok": 1} and srv.bodies[0]["messages"] == MSG


@pytest.mark.parametrize("kind", ["500", "429", "stall", "drop", "malformed", "empty_choices"])
def test_every_fault_kind_is_retried_and_then_a_user_error(server, kind):
    srv = server(faults={kind: 1.0}, retry_after=0.01, stall_s=3.0)
    with pytest.raises(users.UserError, match="gave up after 2 attempts"):
        client(srv, max_retries=1, timeout=0.3).reply(MSG)
    assert srv.counts == {kind: 2}


def test_bad_format_is_a_reply_the_roles_cannot_parse(server):
    reply = client(server(faults={"bad_format": 1.0})).reply(MSG)
    assert users.extract_yes_no(reply) is None and users.extract_json(reply) is None


def test_fault_draws_are_seeded_and_match_their_rates(server):
    runs = []
    for _ in range(2):
        srv = server(faults={"500": 0.3, "429": 0.2}, seed=5)
        runs.append([srv.draw() for _ in range(2000)])
    assert runs[0] == runs[1]
    assert abs(runs[0].count("500") / 2000 - 0.3) < 0.04 and abs(runs[0].count("429") / 2000 - 0.2) < 0.04
    with pytest.raises(ValueError, match="unknown fault"):
        OpenAIServer(faults={"503": 0.1})


def test_user_server_starts_a_command_and_stops_it(tmp_path):
    log = tmp_path / "user-server.log"
    cmd = f"{sys.executable} {ROOT / 'tests' / 'openai_server.py'} --port {{port}} --model served-model"
    with users.UserServer(cmd, log, timeout=60) as srv:
        assert srv.base_url.endswith(f":{srv.port}/v1") and srv.alive()
        user = users.make_user("http", base_url=srv.base_url, model="served-model")
        assert users.extract_yes_no(user.reply(MSG)) == "Maybe"
    assert not srv.alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.base_url + "/models", timeout=2)
    assert "serving served-model" in log.read_text()


def test_a_server_that_dies_or_never_gets_healthy_stops_with_its_log(tmp_path):
    dying = f"{sys.executable} -c \"print('CUDA out of memory on port {{port}}'); raise SystemExit(3)\""
    with pytest.raises(users.UserError, match="exited with code 3") as err:
        users.UserServer(dying, tmp_path / "a.log", timeout=30).start()
    assert "CUDA out of memory" in str(err.value)
    # healthy never: a process that listens nowhere and ignores SIGTERM is killed anyway
    stubborn = users.UserServer(f"{sys.executable} -c \"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('loading weights', flush=True); time.sleep(60)\"", tmp_path / "b.log",
                                timeout=1.5, grace=0.5)
    t0 = time.monotonic()
    with pytest.raises(users.UserError, match="not healthy after 2 s") as err:
        stubborn.start()
    assert "loading weights" in str(err.value) and time.monotonic() - t0 < 10
    assert stubborn.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(stubborn.proc.pid, 0)
