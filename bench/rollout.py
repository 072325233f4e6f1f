"""Benchmark: rollout.py's two schedules (the engine and lockstep) on a mixed multi-turn workload with a slow user,
and rollout.py against the naive loop (one episode at a time, `model.generate` on the re-encoded history).

    python bench/rollout.py            # tiny model and Qwen2.5-0.5B's shape, 15-21 minutes on 2 CPU cores
    python bench/rollout.py --quick    # small shapes, under a minute

(1) The mixed workload: 32 episodes (4 tasks x group 8), 8 turns, each turn's length drawn per episode and turn
between 8 and 256 tokens, a loopback user (its own process) that answers every turn in 200 ms +- 50%. A random model
would almost never end a turn, so its logits are replaced (its compute is not, nor the rollout's sampling): a turn's
first token is drawn uniformly among 249 "countdown" tokens, each standing for how many tokens are left; each
countdown token forces the next one down, and the last forces the end-of-turn token. The draw is the rollout's own
seeded sampling, so both schedules generate the very same episodes. Per schedule: episodes/s, slot utilisation (real
tokens / positions computed, holes and padding included), host syncs per decoded token (device-to-host reads the
host waits for, counted: on CPU nothing waits, on a GPU each one idles it), bytes of KV cache copied per decoded
token, measured again at twice the context (turns of 8-512 tokens), and the fraction of wall time in which no row
was decoding. Then the workload at Qwen2.5-0.5B's shape, scaled down (it is 100x the compute per token).
(2) The naive loop against rollout.py (its default schedule, the engine): 32 episodes, 8 turns, every turn runs to
a 32-token cap, no user; "fed" counts the positions pushed through the model per episode.
Episodes/s depend on what else the machine runs (printed: the load average); counts and ratios within one run
much less. The last line printed is one JSON object with every figure: `speedup` (engine / lockstep,
episodes/s), `slot_utilization` and `syncs_per_token` (engine) head it.
"""
import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # openai_server, the loopback user

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


BARRED = -50.0


class Countdown(torch.nn.Module):
    """The model's forward with its next-token logits replaced: after a countdown token c_r (r tokens left) only
    c_(r-1) is allowed, after c_1 only the end-of-turn token, after anything else (a turn's start) any of
    c_(shortest-1) .. c_(longest-1), uniformly. Countdown tokens are ids base+1 .. base+longest-1 of the tiny
    tokenizer, away from the chat template's."""

    def __init__(self, model, eos: int, shortest: int, longest: int, base: int = 1000):
        super().__init__()
        self.model, self.eos, self.base = model, eos, base
        self.config, self.generation_config = model.config, model.generation_config
        self.set_lengths(shortest, longest)

    def set_lengths(self, shortest: int, longest: int):
        self.longest = longest
        vocab = torch.arange(self.config.vocab_size)
        start = (vocab >= self.base + shortest - 1) & (vocab <= self.base + longest - 1)
        # Barred tokens get -50, not -1e4: torch's CPU exp takes a slow path below about -87 (0.27 ms of a 3 ms step at
        # 32 rows; a real model's logits never go there, and lockstep, sampling every row, paid it most), and e^-50
        # still never wins a sample nor moves a log-prob.
        self.start_row = torch.where(start, 0.0, BARRED)  # a turn's first token: any countdown length

    def forward(self, input_ids, cache=None, **kwargs):
        # The replacement costs each schedule per row it feeds, so it is kept to a few ops (it is not what is timed).
        out = self.model(input_ids=input_ids, cache=cache, **kwargs)
        if out.logits.shape[1] == 0:  # a prefill: no logits asked for
            return out
        last = input_ids[:, -1]
        counting = ((last - self.base >= 1) & (last - self.base < self.longest))[:, None]
        forced = torch.where(last - self.base >= 2, last - 1, self.eos)[:, None]
        start_row = self.start_row.to(out.logits.device)
        logits = torch.where(counting, BARRED, start_row)  # counting rows: every token barred, then the forced one set
        out.logits[:, -1] = logits.scatter_(1, forced, torch.where(counting, 0.0, start_row[forced]))
        return out


def serve(port_queue):
    """The user: tests/openai_server.py answering every turn in 200 ms +- 50% (uniform 100-300 ms), in its own
    process, as a real user endpoint is: its request handling must not take the rollout's GIL."""
    from openai_server import OpenAIServer

    server = OpenAIServer(latency=(0.1, 0.3), reply_fn=lambda body: "Somewhere warm, and not too far.")
    port_queue.put(server.port)
    server.thread.join()


# ----------------------------------------------------------------------------------------------------------
# (1) the mixed workload, both schedules


def run_schedule(policy, tok, user, n_tasks, group, turns, longest, schedule):
    cfg = rollout.RolloutConfig(max_turns=turns, max_new_tokens=longest, max_episode_tokens=turns * (longest + 64),
                                end_on_no_tool_call=False, progress=False, schedule=schedule)
    torch.manual_seed(0)
    stats = {}
    t0 = time.perf_counter()
    eps = rollout.rollout(policy, tok, tasks_for(n_tasks, ask_user=True), group, cfg, user=user, stats=stats)
    wall = time.perf_counter() - t0
    assert not any(ep.failed for ep in eps), [ep.info.get("error") for ep in eps if ep.failed]
    tokens = stats["tokens_generated"]
    return {"episodes_per_s": len(eps) / wall, "slot_utilization": stats["slot_utilization"],
            "syncs_per_token": stats["host_syncs"] / tokens,
            "copied_bytes_per_token": stats["cache_bytes_copied"] / tokens,
            "no_decode_fraction": 1 - stats["time_decode"] / wall, "wall_s": wall, "tokens_generated": tokens,
            "context_mean": sum(len(ep.ids) for ep in eps) / len(eps), "decode_steps": stats["decode_steps"],
            "cache_mib": stats["cache_bytes"] / 2**20, "ids": [ep.ids for ep in eps]}


def mixed(name, model, tok, user, n_tasks, group, turns, longest, longer=None, rounds=1):
    """Both schedules on the workload, alternating for `rounds` rounds, each keeping its fastest run; with `longer`,
    the copies again with turns of up to `longer` tokens."""
    policy = Countdown(model, tok.eos_token_id, 8, longest)
    for schedule in ("lockstep", "engine"):  # first calls pay one-time costs (allocator, kernels): not measured
        run_schedule(policy, tok, user, 1, 2, 1, 16, schedule)
    rows = {}
    for _ in range(rounds):
        for s in ("lockstep", "engine"):
            run = run_schedule(policy, tok, user, n_tasks, group, turns, longest, s)
            if s not in rows or run["episodes_per_s"] > rows[s]["episodes_per_s"]:
                rows[s] = run
    assert rows["engine"].pop("ids") == rows["lockstep"].pop("ids")  # the very same episodes
    if longer:
        policy.set_lengths(8, longer)
        for s in ("lockstep", "engine"):
            long_run = run_schedule(policy, tok, user, max(1, n_tasks // 2), group, turns, longer, s)
            rows[s]["long_copied_bytes_per_token"] = long_run["copied_bytes_per_token"]
            rows[s]["long_context_mean"] = long_run["context_mean"]
    speedup = rows["engine"]["episodes_per_s"] / rows["lockstep"]["episodes_per_s"]
    print(f"\n{name}: {n_tasks * group} episodes ({n_tasks} tasks x {group}), {turns} turns of 8-{longest} tokens, "
          f"a 200 ms +- 50% user; {rows['engine']['tokens_generated']} tokens generated by each schedule; "
          f"fastest of {rounds} alternating run(s) each")
    print(f"  {'':9}{'episodes/s':>11}{'slot util':>10}{'syncs/token':>12}{'copied B/token':>15}"
          f"{'no row decoding':>16}{'decode steps':>13}{'cache MiB':>10}")
    for s, r in rows.items():
        print(f"  {s:9}{r['episodes_per_s']:11.3f}{r['slot_utilization']:10.3f}{r['syncs_per_token']:12.4f}"
              f"{r['copied_bytes_per_token']:15,.0f}{r['no_decode_fraction']:16.2f}{r['decode_steps']:13}"
              f"{r['cache_mib']:10.1f}")
    if longer:
        print(f"  bytes copied per token at a mean context of {rows['engine']['context_mean']:.0f} -> "
              f"{rows['engine']['long_context_mean']:.0f} tokens (turns of 8-{longer}): " + ", ".join(
                  f"{s} {r['copied_bytes_per_token']:,.0f} -> {r['long_copied_bytes_per_token']:,.0f}"
                  for s, r in rows.items()))
    print(f"  speedup (engine / lockstep, episodes/s) {speedup:.2f}x")
    return {"speedup": round(speedup, 3), **{s: {k: round(v, 4) for k, v in r.items()} for s, r in rows.items()}}


# ----------------------------------------------------------------------------------------------------------
# (2) the naive loop against rollout.py


@torch.no_grad()
def naive(model, tok, tasks, group_size, cfg):
    """One episode at a time; every turn re-renders the whole conversation and calls model.generate on it."""
    out = {"episodes": 0, "generated": 0, "fed": 0, "prefill": 0}
    for gym, task in tasks:
        for _ in range(group_size):
            env = envs.make_env(gym, task, max_turns=cfg.max_turns, show_reward=cfg.show_reward)
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
                text = tok.decode(gen[:-1] if gen[-1] == tok.eos_token_id else gen, skip_special_tokens=False)
                obs, _, done, _ = env.step(text)
                messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": obs}]
                if done:
                    break
            out["episodes"] += 1
    return out


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
           "naive_fed_per_episode": a["fed"] / a["episodes"], "rollout_fed_per_episode": stats["tokens_fed"] / n,
           "naive_prefill_per_episode": a["prefill"] / a["episodes"],
           "rollout_prefill_per_episode": stats["tokens_prefill"] / n, "naive_episodes": a["episodes"], "episodes": n}
    row["speedup"] = row["rollout_episodes_per_s"] / row["naive_episodes_per_s"]
    row["prefill_ratio"] = row["rollout_prefill_per_episode"] / row["naive_prefill_per_episode"]
    print(f"\n{name}: {n} episodes ({n_tasks} tasks x group {group_size}), {cfg.max_turns} turns, "
          f"{cfg.max_new_tokens} new tokens per turn; naive measured on {a['episodes']} episodes")
    print(f"  {'':9}{'episodes/s':>12}{'fed/episode':>13}{'prefill/episode':>17}")
    for side in ("naive", "rollout"):
        print(f"  {side:9}{row[side + '_episodes_per_s']:12.3f}{row[side + '_fed_per_episode']:13.0f}"
              f"{row[side + '_prefill_per_episode']:17.0f}")
    print(f"  speedup {row['speedup']:.1f}x, prefill work {row['prefill_ratio']:.2f} of naive")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, under a minute on 2 CPU cores")
    args = p.parse_args()
    port = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()  # before torch starts its threads: a fork copies none of them
    model, tok = train.load_model("tiny")
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"the models run on CPU in fp32; load average at start {os.getloadavg()[0]:.1f} (other work skews timings)")
    user = users.make_user("http", base_url=f"http://127.0.0.1:{port.get(timeout=60)}/v1", model="user",
                          max_concurrency=64)
    q = args.quick
    big_layers = 2 if q else 24
    big = qwen05b_shape(tok, big_layers)
    big_name = f"random model of Qwen2.5-0.5B's shape ({big_layers} of its 24 layers, " \
               f"{sum(p.numel() for p in big.parameters()) / 1e6:.0f}M parameters)"
    try:
        result = {"quick": q}
        tiny = mixed("tiny model (Qwen3, hidden 64, 2 layers, vocab 1,536)", model, tok, user, 2 if q else 4,
                     4 if q else 8, 4 if q else 8, 64 if q else 256, longer=128 if q else 512, rounds=1 if q else 2)
        result.update(speedup=tiny["speedup"], slot_utilization=tiny["engine"]["slot_utilization"],
                      syncs_per_token=tiny["engine"]["syncs_per_token"], tiny_mixed=tiny)
        result["qwen2.5-0.5b-shape_mixed"] = mixed(big_name, big, tok, user, 1 if q else 2, 2 if q else 4,
                                                   2 if q else 4, 16 if q else 64)
    finally:
        server.terminate()
    cfg = rollout.RolloutConfig(max_turns=4 if q else 8, max_new_tokens=16 if q else 32, end_on_no_tool_call=False,
                                progress=False)
    result["tiny_vs_naive"] = compare("tiny model against the naive loop", model, tok, 2 if q else 4, 4 if q else 8,
                                      2 if q else 8, cfg)
    big_cfg = rollout.RolloutConfig(**{**cfg.__dict__, "max_turns": 2 if q else 8, "max_new_tokens": 8 if q else 32})
    result["qwen2.5-0.5b-shape_vs_naive"] = compare(big_name + " against the naive loop", big, tok, 1 if q else 4,
                                                    2 if q else 8, 1 if q else 2, big_cfg)
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    print(f"\nload average at end {result['load_average_end']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
