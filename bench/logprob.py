"""Peak extra memory and forward+backward time of the log-prob / GRPO-loss paths against the naive one.

    python bench/logprob.py                      # vocab 151,936, hidden 1,024, 4,096 tokens, fp32 on CPU (minutes)
    python bench/logprob.py --quick              # vocab 32,000, hidden 256, 1,024 tokens, 16 MiB tiles (< 1 min)
    python bench/logprob.py --device cuda --dtype bfloat16 --tokens 16384

Methods, each run in its own subprocess on the same seeded inputs, each computing the same GRPO loss and
stats (clip fraction, approx KL, entropy, log-prob mean) and the gradients for hidden and weight:
  naive    grpo.naive_grpo_loss: full logits, log_softmax + gather, autograd
  logprob  grpo.token_logprobs (keeps the logsumexp, the backward recomputes each chunk) + grpo.policy_loss
  fused    grpo.grpo_loss, the training path (gradients formed in the forward, nothing recomputed)
Chunked paths use the same memory budget --chunk-mb for one tokens x vocab fp32 tile (default: the device's,
grpo.CHUNK_MB: 96 MiB on CPU, 1,024 MiB on a GPU).

Peak extra memory is measured from the moment the inputs exist (no gradients held yet) to the end of backward:
  cpu   the kernel's resident-set high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs, minus
        the resident set at that moment. Large tensors are mmapped by glibc and handed back on free, so the
        high-water mark follows live tensors; it includes the fp32 weight gradient (vocab x hidden x 4 bytes)
        every method must produce.
  cuda  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() then.
Time is the fastest forward+backward over --rounds subprocess rounds (methods interleaved) of --runs runs
each: other processes on the machine can only add time, and interleaving spreads their load over all methods.
The last line printed is one JSON object with the headline figures.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402

METHODS = ("naive", "logprob", "fused")


def make_inputs(args):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, generator=g)
    weight = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5   # logits ~ N(0, 1)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    # rollout log-probs near the policy's (~ -log V), advantages of both signs: every branch of the clip occurs
    old = -torch.log(torch.tensor(float(args.vocab))) + torch.randn(args.tokens, generator=g) * 0.5
    adv = torch.randn(args.tokens, generator=g)
    weights = torch.full((args.tokens,), 1.0 / args.tokens)
    to = dict(device=args.device)
    return (hidden.to(dtype=dtype, **to).requires_grad_(), weight.to(dtype=dtype, **to).requires_grad_(),
            targets.to(**to), old.to(**to), adv.to(**to), weights.to(**to))


def run_once(method, cfg, hidden, weight, targets, old, adv, weights):
    if method == "naive":
        loss, _ = grpo.naive_grpo_loss(hidden, weight, targets, old, adv, weights, cfg)
    elif method == "fused":
        loss, _ = grpo.grpo_loss(hidden, weight, targets, old, adv, weights, cfg)
    else:
        chunk = grpo.chunk_tokens(weight.shape[0], cfg.chunk_mb, hidden.device)
        logp, entropy = grpo.token_logprobs(hidden, weight, targets, cfg.temperature, chunk, return_entropy=True)
        l_tok, _ = grpo.policy_loss(logp, old, adv, cfg)
        loss = (weights * l_tok).sum()
        entropy.detach().mean()            # the same stat the other two compute
    loss.backward()
    return loss.item()


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args):
    """One method, in this process only: peak extra memory of the first run, fastest time of --runs runs."""
    torch.manual_seed(0)
    cfg = grpo.LossConfig(chunk_mb=args.chunk_mb)
    inputs = make_inputs(args)
    hidden, weight = inputs[:2]
    cuda = args.device.startswith("cuda")
    times, peak = [], None
    for _ in range(args.runs):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to the current resident set
                f.write("5")
            base = rss_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        loss = run_once(args.method, cfg, *inputs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        used = (torch.cuda.max_memory_allocated() if cuda else rss_kb("VmHWM") * 1024) - base
        peak = used if peak is None else peak
    print(json.dumps({"method": args.method, "peak_mb": peak / 2 ** 20, "ms": 1000 * min(times), "loss": loss}))


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape: vocab 32,000, hidden 256, 1,024 tokens")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-mb", type=float, default=grpo.LossConfig.chunk_mb,
                   help="memory budget of one tile in MiB; 0 = the device's default (grpo.CHUNK_MB)")
    p.add_argument("--runs", type=int, default=1, help="runs per method per subprocess (the fastest counts)")
    p.add_argument("--rounds", type=int, default=2,
                   help="subprocess rounds, methods interleaved so that load from elsewhere hits all of them")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)   # internal: run one method (child)
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.tokens, args.chunk_mb, args.runs = 32_000, 256, 1024, 16, 2
    if args.method:
        return child(args)

    args.chunk_mb = grpo.chunk_budget_mb(args.chunk_mb, args.device)
    shape = dict(vocab=args.vocab, hidden=args.hidden, tokens=args.tokens, dtype=args.dtype, device=args.device,
                 chunk_mb=args.chunk_mb, chunk_tokens=grpo.chunk_tokens(args.vocab, args.chunk_mb))
    load_start = os.getloadavg()[0]
    print(f"machine: {machine(args.device)}; load average at start {load_start:.1f} (other work skews timings)")
    print(f"shape: {shape}")
    flags = [f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--tokens={args.tokens}", f"--dtype={args.dtype}",
             f"--device={args.device}", f"--chunk-mb={args.chunk_mb}", f"--runs={args.runs}"]
    res = {}
    for _ in range(args.rounds):
        for m in METHODS:
            out = subprocess.run([sys.executable, __file__, f"--method={m}", *flags], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{m} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if m in res:   # memory is deterministic; time: the fastest round
                r["ms"] = min(r["ms"], res[m]["ms"])
                r["peak_mb"] = max(r["peak_mb"], res[m]["peak_mb"])
            res[m] = r
    logits_mb = args.tokens * args.vocab * 4 / 2 ** 20
    print(f"\n(one tokens x vocab fp32 tensor = {logits_mb:,.0f} MiB; weight gradient = "
          f"{args.vocab * args.hidden * 4 / 2 ** 20:,.0f} MiB)")
    print(f"{'method':<10}{'peak extra MiB':>16}{'fwd+bwd ms':>14}{'memory vs naive':>18}{'time vs naive':>16}"
          f"{'loss':>14}")
    n = res["naive"]
    for m in METHODS:
        r = res[m]
        print(f"{m:<10}{r['peak_mb']:>16,.0f}{r['ms']:>14,.0f}{n['peak_mb'] / r['peak_mb']:>17.1f}x"
              f"{r['ms'] / n['ms']:>15.2f}x{r['loss']:>14.6f}")
    tol = 1e-4 if args.dtype == "float32" else 1e-2        # bf16/fp16 logits carry ~3 significant digits
    agree = all(abs(res[m]["loss"] - n["loss"]) <= tol * max(1.0, abs(n["loss"])) for m in METHODS)
    print(f"losses agree: {agree}; load average at end {os.getloadavg()[0]:.1f}")
    print(json.dumps({"machine": machine(args.device), **shape, "losses_agree": agree,
                      "load_avg_start": round(load_start, 1), "load_avg_end": round(os.getloadavg()[0], 1),
                      **{f"{m}_{k}": round(res[m][k], 1) for m in METHODS for k in ("peak_mb", "ms")},
                      "fused_memory_reduction": round(n["peak_mb"] / res["fused"]["peak_mb"], 2),
                      "fused_time_ratio": round(res["fused"]["ms"] / n["ms"], 3),
                      "logprob_memory_reduction": round(n["peak_mb"] / res["logprob"]["peak_mb"], 2),
                      "logprob_time_ratio": round(res["logprob"]["ms"] / n["ms"], 3)}))


if __name__ == "__main__":
    main()
