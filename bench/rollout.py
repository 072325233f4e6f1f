"""Benchmark: rollout.py (batched, KV cache kept across turns, prompt prefilled once per group, env/user calls
concurrent) against the naive multi-turn loop (one episode at a time, the whole history re-rendered and
re-encoded by `model.generate` every turn, one user call at a time).

    python bench/rollout.py            # tiny model + a random model of Qwen2.5-0.5B's shape; 32 episodes x 8 turns
    python bench/rollout.py --quick    # the same at a small shape, < 1 minute on 2 CPU cores

Both sides run the same env, the same sampling (temperature 1) and the same per-turn cap. A random model almost
never emits the end-of-turn token or a tool call, so the env takes any text (end_on_no_tool_call=False) and every
turn runs to the cap: both sides generate the same number of tokens. The naive side of the 0.5B-shaped model is
measured on fewer episodes (it runs one at a time, so its per-episode rate does not depend on how many). "Tokens
fed" counts the positions each side pushes through the model per episode, a count that machine noise cannot move.
The user-latency part serves a 200 ms /v1/chat/completions on loopback and reports the env/user wall time of one
turn of 32 episodes. The last line printed is one JSON object with the headline figures.
"""
import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
import users  # noqa: E402
from shapes import qwen05b_shape  # noqa: E402


class BenchEnv(envs.Env):
    """Every turn gets a short observation; with a user, the observation is the user's reply to the turn."""

    name = "bench"
    system_prompt = ("You help the user plan a trip. Ask one question at a time with the interact_with_env tool, "
                     "then recommend a plan. You have {max_turns} turns.")

    def opening(self):
        return self.task["question"]

    def step(self, text):
        self.turn += 1
        if self.task.get("ask_user"):
            reply = self.user.reply([{"role": "user", "content": text[-2000:]}])
        else:
            reply = f"I would like somewhere quiet, near the sea, for about {self.turn + 3} days."
        return f"{reply} (turn {self.turn} of {self.max_turns})", 0.0, self.turn >= self.max_turns, {}


envs.GYMS["bench"] = BenchEnv

QUESTIONS = ["I need a holiday in May, can you help me choose where to go?",
             "Plan a weekend away for two people who like hiking and good food.",
             "Where should my family go this summer? We have two small children and a dog.",
             "Help me pick a city for a short work trip with a free day for museums."]


def tasks_for(n_tasks, ask_user=False):
    return [("bench", {"id": f"bench-{j}", "question": QUESTIONS[j % len(QUESTIONS)], "ask_user": ask_user})
            for j in range(n_tasks)]


# ----------------------------------------------------------------------------------------------------------
# (a) the naive loop


@torch.no_grad()
def naive(model, tok, tasks, group_size, cfg, user=None):
    """One episode at a time; every turn re-renders the whole conversation and calls model.generate on it."""
    out = {"episodes": 0, "generated": 0, "fed": 0, "prefill": 0, "time_user": 0.0, "turns": 0}
    for gym, task in tasks:
        for _ in range(group_size):
            env = envs.make_env(gym, task, user=user, max_turns=cfg.max_turns, show_reward=cfg.show_reward,
                                eval_mode=cfg.eval_mode)
            messages = rollout.prompt_messages(env)
            for _ in range(cfg.max_turns):
                ids = torch.tensor([rollout.render_ids(tok, messages, add_generation_prompt=True)])
                # top_k=0: sample from the full distribution, as rollout.py does (generate's default is top-k 50)
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
                out["generated"] += len(gen)
                out["prefill"] += ids.shape[1]
                out["fed"] += ids.shape[1] + len(gen) - 1  # the prompt, then every new token but the last
                out["turns"] += 1
                text = tok.decode(gen[:-1] if gen[-1] == tok.eos_token_id else gen, skip_special_tokens=False)
                t0 = time.perf_counter()
                obs, _, done, _ = env.step(text)
                out["time_user"] += time.perf_counter() - t0
                messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": obs}]
                if done:
                    break
            out["episodes"] += 1
    return out


# ----------------------------------------------------------------------------------------------------------


def compare(name, model, tok, n_tasks, group_size, naive_episodes, cfg):
    warm = rollout.RolloutConfig(**{**cfg.__dict__, "max_turns": 1, "max_new_tokens": 2})
    naive(model, tok, tasks_for(1), 1, warm)  # first calls pay one-time costs (allocator, kernels): not measured
    rollout.rollout(model, tok, tasks_for(1), 2, warm)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    a = naive(model, tok, tasks_for(1), naive_episodes, cfg)
    ta = time.perf_counter() - t0
    stats = {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    eps = rollout.rollout(model, tok, tasks_for(n_tasks), group_size, cfg, stats=stats)
    tb = time.perf_counter() - t0
    n = len(eps)
    row = {"naive_episodes_per_s": a["episodes"] / ta, "rollout_episodes_per_s": n / tb,
           "naive_tokens_per_s": a["generated"] / ta, "rollout_tokens_per_s": stats["tokens_generated"] / tb,
           "naive_fed_per_episode": a["fed"] / a["episodes"], "rollout_fed_per_episode": stats["tokens_fed"] / n,
           "naive_prefill_per_episode": a["prefill"] / a["episodes"],
           "rollout_prefill_per_episode": stats["tokens_prefill"] / n,
           "rollout_slots_per_episode": stats["slots_fed"] / n,
           "generated_per_episode": stats["tokens_generated"] / n, "naive_episodes": a["episodes"], "episodes": n}
    row["speedup"] = row["rollout_episodes_per_s"] / row["naive_episodes_per_s"]
    row["prefill_ratio"] = row["rollout_prefill_per_episode"] / row["naive_prefill_per_episode"]
    print(f"\n{name}: {n} episodes ({n_tasks} tasks x group {group_size}), {cfg.max_turns} turns, "
          f"{cfg.max_new_tokens} new tokens per turn; naive measured on {a['episodes']} episodes")
    print(f"  {'':9}{'episodes/s':>12}{'gen tok/s':>11}{'fed/episode':>13}{'prefill/episode':>17}")
    print(f"  {'naive':9}{row['naive_episodes_per_s']:12.3f}{row['naive_tokens_per_s']:11.1f}"
          f"{row['naive_fed_per_episode']:13.0f}{row['naive_prefill_per_episode']:17.0f}")
    print(f"  {'rollout':9}{row['rollout_episodes_per_s']:12.3f}{row['rollout_tokens_per_s']:11.1f}"
          f"{row['rollout_fed_per_episode']:13.0f}{row['rollout_prefill_per_episode']:17.0f}"
          f"   (positions computed incl. padding: {row['rollout_slots_per_episode']:.0f})")
    print(f"  speedup {row['speedup']:.1f}x, prefill work {row['prefill_ratio']:.2f} of naive")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


class SlowUser(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback that takes 200 ms per reply."""

    delay = 0.2

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                    "content": "Somewhere warm, and not too far."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops simultaneous connects, which retry after 1 s


def user_latency(model, tok, turns, cfg):
    server = Server(("127.0.0.1", 0), SlowUser)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        user = users.make_user("http", base_url=f"http://127.0.0.1:{server.server_port}/v1", model="user",
                               max_concurrency=64)
        cfg = rollout.RolloutConfig(**{**cfg.__dict__, "max_turns": turns})
        a = naive(model, tok, tasks_for(1, ask_user=True), 1, cfg, user=user)
        stats = {}
        eps = rollout.rollout(model, tok, tasks_for(4, ask_user=True), 8, cfg, user=user, stats=stats)
    finally:
        server.shutdown()
    assert not any(ep.failed for ep in eps), [ep.info.get("error") for ep in eps if ep.failed]
    per_call = a["time_user"] / a["turns"]
    per_turn = (stats["time_env"]) / stats["turns"]  # includes the resets, which call no user here
    print(f"\nuser latency: 200 ms loopback endpoint, {len(eps)} episodes x {turns} turns")
    print(f"  naive: {per_call * 1000:.0f} ms per user call, one at a time -> {len(eps) * per_call:.2f} s of user "
          f"time per turn of {len(eps)} episodes")
    print(f"  rollout: {per_turn:.3f} s of env/user wall time per turn of {len(eps)} episodes")
    return {"user_call_s": round(per_call, 4), "naive_user_s_per_turn_32": round(len(eps) * per_call, 3),
            "rollout_user_s_per_turn_32": round(per_turn, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape, under a minute on 2 CPU cores")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = train.load_model("tiny")
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"the models run on CPU; load average at start {os.getloadavg()[0]:.1f} (other work skews timings)")
    if args.quick:
        cfg = rollout.RolloutConfig(max_turns=8, max_new_tokens=16, end_on_no_tool_call=False, progress=False)
        big_layers, big_cfg, big_groups, big_naive = 2, rollout.RolloutConfig(**{**cfg.__dict__, "max_turns": 3,
                                                                              "max_new_tokens": 8}), (2, 4), 1
        tiny_naive, latency_turns = 4, 2
    else:
        cfg = rollout.RolloutConfig(max_turns=8, max_new_tokens=32, end_on_no_tool_call=False, progress=False)
        big_layers, big_cfg, big_groups, big_naive = 24, cfg, (4, 8), 2
        tiny_naive, latency_turns = 8, 3
    result = {"quick": args.quick, "turns": cfg.max_turns}
    result["tiny"] = compare("tiny model (Qwen3, hidden 64, 2 layers, vocab 1,536)", model, tok, 4, 8, tiny_naive, cfg)
    result["user"] = user_latency(model, tok, latency_turns, cfg)
    big = qwen05b_shape(tok, big_layers)
    name = f"random model of Qwen2.5-0.5B's shape ({big_layers} of its 24 layers, " \
           f"{sum(p.numel() for p in big.parameters()) / 1e6:.0f}M parameters)"
    result["qwen2.5-0.5b-shape"] = compare(name, big, tok, *big_groups, big_naive, big_cfg)
    result["qwen2.5-0.5b-shape"]["layers"] = big_layers
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    print(f"\nload average at end {result['load_average_end']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
