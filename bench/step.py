"""Benchmark: where the time of one GRPO training step goes (train.py's own timers: generation, user/env calls,
old log-probs, update), for the offline demo and for a random model of Qwen2.5-0.5B's shape.

    python bench/step.py            # the demo, the tiny model with an update to do, the 0.5B shape (24 layers)
    python bench/step.py --quick    # the same with the 0.5B shape cut to 2 layers (about a minute on 2 CPU cores)

The demo's random model never calls the tool, so every group has zero reward spread and train.py skips the
update (zero advantages, no gradient). To time an update, the other two setups play a stand-in gym: TravelGym's
system prompt, a trip request, 3 turns, each turn's reward a coin flip, so groups have spread.
Each setup runs `train.train` for 2 steps and reports the last (the first pays one-off costs; the 0.5B shape
runs 1 step). The baseline, in the same run: the same steps with `--loss.fused false`, which runs the update with
the naive loss (full logits, log_softmax, gather: grpo.naive_grpo_loss) instead of the fused chunked one
(grpo.grpo_loss). Fused and
naive runs alternate, twice (once with --quick), and each phase keeps its fastest time. The last line printed is
one JSON object with the headline figures.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
import train  # noqa: E402
from shapes import qwen05b_shape  # noqa: E402

PHASES = ("time_generate", "time_user", "time_logprob", "time_update")


class CoinGym(envs.Env):
    """A stand-in gym with a real gym's prompt: each of 3 turns earns 1 or 0 by a coin flip (random models'
    replies carry no signal; the point is an update with work to do)."""

    name = "bench_coin"
    made = 0  # envs are built in a fixed order, so the n-th env of every run flips the same coins

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.serial, CoinGym.made = CoinGym.made, CoinGym.made + 1
    system_prompt = envs.GYMS["travel"].system_prompt

    def opening(self):
        return ("I'm flying from Boston to Denver on April 10 and need a hotel there from April 10 to 14. "
                "Money is tight, so for each I'd like the cheapest option that still suits me.")

    def step(self, text):
        self.turn += 1
        reward = float(random.Random(1000 * self.serial + self.turn).random() < 0.5)
        return f"Noted.\nReward: {reward}", reward, self.turn >= 3, {}


COIN_TASKS = {CoinGym.name: [{"id": f"bench-{i}"} for i in range(8)]}


def run_steps(argv: list[str], steps: int, model_fn=None, pool=None, naive: bool = False) -> dict:
    """`steps` steps of train.train with `argv`; the metrics of the last. `model_fn` replaces the model loader,
    `pool` the task data; `naive` runs the update with the naive loss."""
    real_load = train.load_model
    if pool is not None:
        envs.GYMS.update({name: CoinGym for name in pool})
        CoinGym.made = 0
    if model_fn is not None:
        train.load_model = lambda *a, **k: model_fn()
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = train.parse_config(["--out_dir", out, "--steps", str(steps), "--save_every", "0", "--transcripts", "0",
                                      "--rollout.progress", "false", "--loss.fused", str(not naive), *argv])
            run_dir = train.train(cfg, task_pool=pool)
            return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    finally:
        train.load_model = real_load
        envs.GYMS.pop(CoinGym.name, None)


def report(name: str, argv: list[str], steps: int, repeats: int, model_fn=None, pool=None) -> dict:
    """Fused and naive runs interleaved `repeats` times; each phase keeps its fastest time (load on a shared
    machine only ever adds time)."""
    print(f"\n== {name}")
    runs = {False: [], True: []}
    for _ in range(repeats):
        for naive in (False, True):
            runs[naive].append(run_steps(argv, steps, model_fn, pool, naive=naive))
    fused, naive = ({**r[0], **{k: min(x[k] for x in r) for k in PHASES}} for r in (runs[False], runs[True]))
    total = sum(fused[k] for k in PHASES)
    print(f"{'phase':16s} {'seconds':>9s} {'share':>7s}")
    for k in PHASES:
        print(f"{k[5:]:16s} {fused[k]:9.2f} {fused[k] / total:7.1%}")
    out = {**{k: round(fused[k], 3) for k in PHASES}, "generate_share": round(fused["time_generate"] / total, 3),
           "frac_zero_std": fused["frac_zero_std"], "turns_mean": fused["turns_mean"],
           "response_tokens_mean": fused["response_tokens_mean"]}
    if fused["frac_zero_std"] == 1.0:
        print("every group has zero reward spread: the update had nothing to train and was skipped")
    else:
        out["naive_update_s"] = round(naive["time_update"], 3)
        out["update_speedup_vs_naive"] = round(naive["time_update"] / fused["time_update"], 2)
        print(f"update with the naive log-prob loss: {naive['time_update']:.2f} s -> fused is "
              f"{out['update_speedup_vs_naive']:.2f}x faster")
    print(f"episodes: {fused['response_tokens_mean']:.0f} generated tokens and {fused['turns_mean']:.1f} turns on "
          f"average; {fused['frac_zero_std']:.0%} of the groups without reward spread")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="0.5B shape cut to 2 layers, about a minute on 2 CPU cores")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {device}; load average {os.getloadavg()[0]:.1f} (other work skews timings)")
    t0 = time.perf_counter()
    repeats = 1 if args.quick else 2
    result = {"quick": args.quick, "device": device}
    result["demo"] = report("demo: tiny model, scripted users, every gym, batch 2 x group 8", [], 2, repeats)
    coin = ["--gyms", json.dumps({CoinGym.name: 1}), "--rollout.end_on_no_tool_call", "false",
             "--rollout.max_new_tokens", "16"]
    result["tiny"] = report("tiny model, stand-in gym, batch 2 x group 8, 3 turns of 16 tokens", coin, 2, repeats,
                            pool=COIN_TASKS)
    layers = 2 if args.quick else 24
    _, tok = train.load_model("tiny")
    big = lambda: (qwen05b_shape(tok, layers).train(), tok)  # noqa: E731
    result["qwen2.5-0.5b-shape"] = report(
        f"random Qwen2.5-0.5B shape ({layers} of 24 layers), stand-in gym, batch 2 x group 2, 3 turns of 16 tokens",
        coin + ["--group_size", "2", "--micro_batch_size", "2"], 1, repeats, big, COIN_TASKS)
    result["qwen2.5-0.5b-shape"]["layers"] = layers
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
