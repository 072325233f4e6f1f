"""The simulated user's own server: the fault-injecting OpenAI-compatible test server (tests/openai_server.py)
seen through the http user; users.UserServer starting, health-checking and stopping a server command; and
train.py's --user.serve_cmd: a server that fails to start, serves another model or dies stops the run with its
log's last lines, and SIGTERM stops the run and the server (normal end and Ctrl-C: tests/test_distributed.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import envs
import train
import users
from dist_train import add_comma_gym
from openai_server import OpenAIServer
from test_train import CommaEnv

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


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_does_not_leave_its_user_server_behind(tmp_path):
    """SIGKILL gives the run no chance to stop its server; the kernel does it (the server holds GPUs)."""
    cmd = f"{sys.executable} {ROOT / 'tests' / 'openai_server.py'} --port {{port}} --model served-model"
    run = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import users; "
        "srv = users.UserServer(sys.argv[2], sys.argv[3], timeout=60); srv.start(); "
        "print(srv.proc.pid, srv.base_url, flush=True); time.sleep(600)"),
        str(ROOT), cmd, str(tmp_path / "user-server.log")], stdout=subprocess.PIPE, text=True)
    pid, base_url = run.stdout.readline().split()
    assert requests.get(base_url + "/models", timeout=5).status_code == 200
    run.send_signal(signal.SIGKILL)
    run.wait()
    for _ in range(100):
        try:  # gone, or a zombie nobody reaped yet (the state after the command's name in /proc/PID/stat)
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(int(pid), signal.SIGKILL)
        raise AssertionError("the user server outlived the run that started it")


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


# ----------------------------------------------------------------------------------------------------------
# train.py --user.serve_cmd: the server lives exactly as long as the run


SERVE = ["--user.backend", "http", "--user.model", "fake-user", "--user.serve_cmd"]
SERVER = f"{sys.executable} tests/openai_server.py --port {{port}} --model fake-user"


def run_main(monkeypatch, tmp_path, *argv) -> str:
    """`python tests/dist_train.py ARGV` in this process (the comma gym, one process); its exit message."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # main sets it for training, not for the server
    monkeypatch.setitem(envs.GYMS, "comma", CommaEnv)  # first, so that the test's end removes it again
    monkeypatch.setattr(envs, "load_tasks", add_comma_gym(envs.GYMS, envs.load_tasks))
    with pytest.raises(SystemExit) as e:
        train.main(["--algo", "grpo", "--gyms", '{"comma": 1}', "--rollout.progress", "false", "--save_every", "0",
                    "--out_dir", str(tmp_path / "run"), *argv])
    return str(e.value.code)


def port_closed(log: Path) -> bool:
    port = int(log.read_text().split("http://127.0.0.1:")[1].split("/")[0])
    try:
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_a_server_that_fails_to_start_stops_the_run_before_any_model_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    dying = (f"{sys.executable} -c \"import os; print('CUDA out of memory on port {{port}}', "
             "repr(os.environ.get('CUDA_VISIBLE_DEVICES')), os.environ.get('PYTORCH_CUDA_ALLOC_CONF')); "
             "raise SystemExit(3)\"")
    line = run_main(monkeypatch, tmp_path, *SERVE, dying)
    assert line.startswith("user server exited with code 3 before it was healthy") and "CUDA out of memory" in line
    assert "'' None" in line  # no GPUs kept for it (--user.serve_gpus 0), and none of train.py's allocator setting
    assert not (tmp_path / "run" / "train.lock").exists() and not (tmp_path / "run" / "config.json").exists()
    # a server of another model: the probe names both
    line = run_main(monkeypatch, tmp_path, *SERVE, SERVER.replace("fake-user", "other-model"))
    assert line.startswith("user server: ") and "does not serve 'fake-user'; it serves ['other-model']" in line, line
    assert port_closed(tmp_path / "run" / "user-server.log")


def test_a_server_that_dies_during_the_run_stops_it_with_its_last_lines(monkeypatch, tmp_path):
    dies = (f"{sys.executable} -c \"import sys, time; sys.path.insert(0, 'tests'); import openai_server; "
            "openai_server.OpenAIServer(int(sys.argv[1]), 'fake-user'); print('serving, then the GPU fell off', "
            "flush=True); time.sleep(4); raise SystemExit(7)\" {port}")
    t0 = time.monotonic()
    line = run_main(monkeypatch, tmp_path, "--steps", "1000", *SERVE, dies)
    assert line.startswith("user server exited with code 7 during the run") and "the GPU fell off" in line, line
    assert time.monotonic() - t0 < 60  # not 1,000 steps: stopped when the server died
    assert not (tmp_path / "run" / "train.lock").exists()


def test_sigterm_stops_the_run_and_its_server_with_one_line(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "tests/dist_train.py", "--steps", "1000", "--gyms", '{"comma": 1}',
                          "--rollout.progress", "false", "--save_every", "0", "--out_dir", str(out), *SERVE, SERVER],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=60)
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("steps")]
    assert p.returncode == 128 + signal.SIGTERM and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("interrupted by SIGTERM during step "), stderr[-2000:]
    assert port_closed(out / "user-server.log") and not (out / "train.lock").exists()
