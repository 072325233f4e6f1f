"""Errors before work (config.py, train.py): every user mistake is one line naming the key (or the file), printed
before the run folder exists and before any model loads; a step whose episodes mostly failed says so."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import config
import distributed
import envs
import train
import users
from test_train import CommaEnv, read_metrics, small_cfg


def fails_before_work(monkeypatch, tmp_path, *argv) -> str:
    """The error line `python train.py --algo grpo ARGV` exits with; asserts that no model loaded and no run folder
    exists."""
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(["--algo", "grpo", *argv, "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    line = str(e.value.code)
    assert "\n" not in line and len(line) < 600, line
    return line


def test_a_model_that_does_not_exist(monkeypatch, tmp_path):
    line = fails_before_work(monkeypatch, tmp_path, "--model", "/nonexistent")
    assert line.startswith("config error: --model: /nonexistent is neither a model folder"), line
    (tmp_path / "empty").mkdir()
    line = fails_before_work(monkeypatch, tmp_path, "--model", str(tmp_path / "empty"))
    assert line.startswith("config error: --model:") and "without a config.json" in line, line


def test_a_hub_model_that_is_not_cached_without_internet(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = fails_before_work(monkeypatch, tmp_path, "--model", "example-org/no-such-model")
    assert line.startswith("config error: --model: example-org/no-such-model is not in the Hugging Face cache"), line
    assert "huggingface-cli download example-org/no-such-model" in line


def test_cuda_asked_for_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: [])
    assert fails_before_work(monkeypatch, tmp_path, "--device", "cuda").startswith("config error: --device: cuda")


def plan(*argv, visible=()):
    return config.plan_ranks(train.parse_config(list(argv)), list(visible))


def test_python_train_py_plans_one_rank_per_gpu_and_the_users_gpus():
    gpus = [str(i) for i in range(8)]
    assert plan(visible=gpus) == (8, True, gpus, [])
    # the user server on the last 2, 6 ranks on the rest; CUDA_VISIBLE_DEVICES names (here UUIDs) are kept
    assert plan("--user.backend", "http", "--user.model", "m", "--user.serve_cmd", "serve --port {port}",
                "--user.serve_gpus", "2", visible=gpus) == (6, True, gpus[:6], ["6", "7"])
    assert plan("--nproc", "2", visible=["GPU-a", "GPU-b", "GPU-c"]) == (2, True, ["GPU-a", "GPU-b"], [])
    assert plan(visible=["0"]) == (1, False, ["0"], [])                 # one GPU: this process trains
    assert plan("--fsdp", "true", visible=["0"]) == (1, True, ["0"], [])  # FSDP: a group of one, launched
    assert plan() == (1, False, None, []) and plan("--nproc", "2") == (2, True, None, [])  # the CPU: gloo ranks
    assert plan("--device", "cpu", visible=gpus) == (1, False, None, [])


@pytest.mark.parametrize("argv, visible, needle", [
    (["--nproc", "4"], ["0", "1"], "--nproc: 4 ranks need one GPU each, but 2 are left for training"),
    (["--user.serve_gpus", "1"], [], "--user.serve_gpus: 1 GPU(s) for the user server, but 0 visible here; use 0"),
    (["--user.serve_gpus", "2"], ["0", "1"], "--user.serve_gpus: all 2 visible GPU(s) go to the user server"),
    (["--user.serve_gpus", "3"], ["0", "1"], "--user.serve_gpus: 3 GPU(s) for the user server, but 2 visible"),
])
def test_rank_and_gpu_counts_that_do_not_fit_the_machine(argv, visible, needle):
    serve = ["--user.backend", "http", "--user.model", "m", "--user.serve_cmd", "s --port {port}"]
    with pytest.raises(config.ConfigError, match=re.escape(needle)):
        plan(*argv, *(serve if "--user.serve_gpus" in argv else []), visible=visible)


@pytest.mark.parametrize("argv, needle", [
    (["--user.serve_cmd", "vllm serve m"], "--user.serve_cmd: the started server is reached by the http user"),
    (["--user.backend", "http", "--user.model", "m", "--user.serve_cmd", "vllm serve m --port 8000"],
     "--user.serve_cmd: put {port} where the command takes its port"),
    (["--user.serve_gpus", "2"], "--user.serve_gpus: GPUs kept for a user server, but no --user.serve_cmd"),
    (["--nproc", "-1"], "--nproc: must be >= 0"),
    (["--dist_timeout_min", "0"], "--dist_timeout_min: must be > 0"),
])
def test_bad_launch_and_user_server_settings(monkeypatch, tmp_path, argv, needle):
    assert fails_before_work(monkeypatch, tmp_path, *argv).startswith(f"config error: {needle}")


def test_fsdp_is_launched_as_ranks_and_refused_in_one_process_without_them(monkeypatch, tmp_path):
    """python train.py --fsdp true starts a group of one (plan above); train.train() in a process without a group
    says how to start one."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(config.ConfigError, match="--fsdp: FSDP2 shards the model over the ranks of a process group, "
                                                 "and this process has none; run python train.py"):
        config.check_before_work(train.parse_config(["--fsdp", "true"]))


def test_under_torchrun_its_rank_count_decides_and_no_rank_starts_a_server(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(config.ConfigError, match="--nproc: 3, but torchrun started 2 rank"):
        config.check_before_work(train.parse_config(["--nproc", "3"]))
    with pytest.raises(config.ConfigError, match="--user.serve_cmd: under torchrun every rank would start a server"):
        config.check_before_work(train.parse_config(["--user.backend", "http", "--user.model", "m",
                                                     "--user.serve_cmd", "s --port {port}"]))


def test_an_http_user_without_an_endpoint(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    line = fails_before_work(monkeypatch, tmp_path, "--user.backend", "http", "--user.model", "m")
    assert line.startswith("config error: --user.base_url: the http user needs an endpoint"), line


def test_a_data_dir_with_the_wrong_layout_names_the_gym_and_folder(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    line = fails_before_work(monkeypatch, tmp_path, "--data_dir", str(tmp_path / "data"), "--gyms", '{"travel": 1}')
    assert line.startswith(f"data error: travel train tasks (--data_dir {tmp_path / 'data'}):"), line


def test_a_bad_task_record_is_one_line_naming_file_line_and_field(monkeypatch, tmp_path):
    real = envs.load_tasks

    def load_tasks(name, split="train", data_dir=None):
        if name == "telepathy" and split == "test":  # an eval gym: read before work too
            raise ValueError("data/telepathy/test.jsonl line 7: field 'entity': missing")
        return real(name, split, data_dir)

    monkeypatch.setattr(envs, "load_tasks", load_tasks)
    line = fails_before_work(monkeypatch, tmp_path, "--eval_every", "1")
    assert line == "data error: telepathy test tasks (data/): data/telepathy/test.jsonl line 7: field 'entity': missing"


def test_sft_data_that_cannot_be_laid_out_as_turns_stops_before_the_model_loads(monkeypatch, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(["--algo", "sft", "--sft_data", str(bad), "--out_dir", str(tmp_path / "run")])
    assert str(e.value.code).startswith(f"data error: --sft_data: {bad}, line 1: a conversation must start with a "
                                        "system and a user message"), e.value.code
    assert not (tmp_path / "run").exists()


def test_a_config_file_holding_an_array(monkeypatch, tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    line = fails_before_work(monkeypatch, tmp_path, "--config", str(tmp_path / "c.json"))
    assert line.startswith(f"config error: --config: {tmp_path / 'c.json'} holds an array"), line


@pytest.mark.parametrize("argv, key", [(["--lr", "inf"], "lr"), (["--lr", "nan"], "lr"), (["--gamma", "-inf"], "gamma"),
                                       (["--user.timeout", "nan"], "user.timeout"),
                                       (["--gyms", '{"travel": Infinity}'], "gyms")])
def test_non_finite_numbers(monkeypatch, tmp_path, argv, key):
    assert fails_before_work(monkeypatch, tmp_path, *argv).startswith(f"config error: --{key}:")


def test_eval_gyms_with_spaces_and_unknown_names(monkeypatch, tmp_path):
    cfg = train.parse_config(["--eval_gyms", "intention, telepathy", "--eval_every", "1", "--eval_tasks", "1"])
    assert sorted({gym for gym, _ in config.check_before_work(cfg).test}) == ["intention", "telepathy"]
    line = fails_before_work(monkeypatch, tmp_path, "--eval_gyms", "intention, telepaty")
    assert line.startswith("config error: --eval_gyms: unknown gym 'telepaty'; known: function, intention"), line


def test_the_loss_temperature_is_the_rollouts(monkeypatch, tmp_path):
    line = fails_before_work(monkeypatch, tmp_path, "--loss.temperature", "0.7")
    assert line.startswith("config error: --loss.temperature: not a key of its own"), line
    assert train.parse_config(["--rollout.temperature", "0.7"]).loss.temperature == 0.7
    assert train.parse_config(["--rollout.temperature", "0.7", "--rollout.greedy", "true"]).loss.temperature == 1.0


class ModelsServer:
    """Answers GET /v1/models with the given model names."""

    def __init__(self, served):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                payload = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in served]})
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_http_user_endpoint_is_probed_once_at_start(monkeypatch, tmp_path):
    server = ModelsServer(["Qwen/Qwen3-32B"])
    closed = ModelsServer([])
    closed.close()  # a port nothing listens on any more
    try:
        http = ["--user.backend", "http", "--user.base_url"]
        line = fails_before_work(monkeypatch, tmp_path, *http, closed.url, "--user.model", "Qwen/Qwen3-32B")
        assert line.startswith(f"config error: --user.base_url: cannot reach {closed.url}/models"), line
        assert "--user.probe false" in line
        line = fails_before_work(monkeypatch, tmp_path, *http, server.url, "--user.model", "Qwen/Qwen3-8B")
        assert f"{server.url}/models does not serve 'Qwen/Qwen3-8B'; it serves ['Qwen/Qwen3-32B']" in line, line
        for argv in ([*http, server.url, "--user.model", "Qwen/Qwen3-32B"],
                     [*http, closed.url, "--user.model", "x", "--user.probe", "false"]):
            config.check_before_work(train.parse_config(argv))  # served, or the check skipped: no error
    finally:
        server.close()


class DownCommaEnv(CommaEnv):
    """The comma gym whose user endpoint refuses connections for tasks marked "down"."""

    def step(self, text):
        if self.task.get("down"):
            raise users.UserError("http://127.0.0.1:9/v1/chat/completions: connection failed (ConnectionError) "
                                  "(gave up after 4 attempts)", "connection")
        return super().step(text)


def test_a_step_in_which_most_episodes_failed_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(envs.GYMS, "comma", DownCommaEnv)
    pool = {"comma": [{"id": "up"}, {"id": "down", "down": True}]}
    m = read_metrics(train.train(small_cfg(tmp_path, "--steps", "2", "--batch_size", "4", "--mini_batch_size", "2",
                                           "--save_every", "0", "--max_failed_frac", "1"), task_pool=pool))
    assert [x["failed_episodes"] for x in m] == [16, 4] and [x.get("failed/connection") for x in m] == [16, 4]
    assert "connection failed" in m[0]["failed_example"]
    out = capsys.readouterr().out
    assert "warning: step 1: 16 of 16 episodes failed (scripted user): connection 16; e.g. UserError: " \
           "connection: http://127.0.0.1:9/v1/chat/completions: connection failed" in out
    assert "warning: step 2" not in out  # 4 of 16: a few failures are counted, not shouted
