"""Benchmark: where the time of one GRPO training step goes (train.py's own timers: generation, user/env calls,
old log-probs, update), for the offline demo and for a random model of Qwen2.5-0.5B's shape.

    python bench/step.py            # the demo, then the 0.5B shape (24 layers)
    python bench/step.py --quick    # the same with the 0.5B shape cut to 2 layers (< 1 minute on 2 CPU cores)

Each setup runs `train.train` for 2 steps and reports the second (the first pays one-off costs); the 0.5B shape
runs 1 step. Fused and naive runs alternate, twice (once with --quick), and each phase keeps its fastest time. The baseline,
in the same run: the same steps with the update's fused chunked log-prob loss (grpo.grpo_loss) swapped for the
naive one (full logits, log_softmax, gather: grpo.naive_grpo_loss); the headline is the ratio of update times.
A random model almost never calls a tool, so the 0.5B shape runs with `end_on_no_tool_call=False`: its turns go
to the real gyms, which answer "no tool call found" and go on, so episodes are multi-turn as in training.
The last line printed is one JSON object with the headline figures.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpo  # noqa: E402
import train  # noqa: E402
from shapes import qwen05b_shape  # noqa: E402

PHASES = ("time_generate", "time_user", "time_logprob", "time_update")


def run_steps(argv: list[str], steps: int, model_fn=None, naive: bool = False) -> dict:
    """`steps` steps of train.train with `argv`; the metrics of the last. `model_fn` replaces the model loader."""
    real_load, real_loss = train.load_model, train.grpo_loss
    if model_fn is not None:
        train.load_model = lambda *a, **k: model_fn()
    if naive:
        train.grpo_loss = grpo.naive_grpo_loss
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = train.parse_config(["--out_dir", out, "--steps", str(steps), "--save_every", "0", "--transcripts", "0",
                                      "--rollout.progress", "false", *argv])
            run_dir = train.train(cfg)
            return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    finally:
        train.load_model, train.grpo_loss = real_load, real_loss


def report(name: str, argv: list[str], steps: int = 2, model_fn=None, repeats: int = 2) -> dict:
    """Fused and naive runs interleaved `repeats` times; each phase's fastest time is kept (load on a shared
    machine only ever adds time)."""
    print(f"\n== {name}")
    runs = {False: [], True: []}
    for _ in range(repeats):
        for naive in (False, True):
            runs[naive].append(run_steps(argv, steps, model_fn, naive=naive))
    fused, naive = ({**r[0], **{k: min(x[k] for x in r) for k in PHASES}} for r in (runs[False], runs[True]))
    total = sum(fused[k] for k in PHASES)
    print(f"{'phase':16s} {'seconds':>9s} {'share':>7s}")
    for k in PHASES:
        print(f"{k[5:]:16s} {fused[k]:9.2f} {fused[k] / total:7.1%}")
    ratio = naive["time_update"] / fused["time_update"]
    print(f"update with the naive log-prob loss: {naive['time_update']:.2f} s -> fused is {ratio:.2f}x faster")
    print(f"episodes: {fused['response_tokens_mean']:.0f} generated tokens and {fused['turns_mean']:.1f} turns "
          f"on average")
    return {**{k: round(fused[k], 3) for k in PHASES}, "naive_update_s": round(naive["time_update"], 3),
            "update_speedup_vs_naive": round(ratio, 2), "generate_share": round(fused["time_generate"] / total, 3),
            "turns_mean": fused["turns_mean"], "response_tokens_mean": fused["response_tokens_mean"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="0.5B shape cut to 2 layers, under a minute on 2 CPU cores")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {device}; load average {os.getloadavg()[0]:.1f} (other work skews timings)")
    t0 = time.perf_counter()
    result = {"quick": args.quick, "device": device}
    repeats = 1 if args.quick else 2
    result["demo"] = report("demo: tiny model, scripted users, every gym, batch 2 x group 8", [], repeats=repeats)
    layers = 2 if args.quick else 24
    _, tok = train.load_model("tiny")
    big = lambda: (qwen05b_shape(tok, layers).train(), tok)  # noqa: E731
    shape = ["--batch_size", "2", "--group_size", "2", "--micro_batch_size", "2", "--rollout.max_turns", "3",
             "--rollout.max_new_tokens", "16", "--rollout.end_on_no_tool_call", "false"]
    result["qwen2.5-0.5b-shape"] = report(f"random Qwen2.5-0.5B shape ({layers} of 24 layers), batch 2 x group 2, "
                                          f"3 turns of 16 tokens", shape, 1, big, repeats)
    result["qwen2.5-0.5b-shape"]["layers"] = layers
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
