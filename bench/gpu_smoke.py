"""One command for any GPU this project gets: the checks only a GPU can make, each bounded in time, ending with one
JSON line (issue 11, "One command for any GPU").

    python bench/gpu_smoke.py                        # every visible GPU; under 8 minutes on one H200
    python bench/gpu_smoke.py --parts a,b            # a subset
    python bench/gpu_smoke.py --quick --device cpu   # the same code at toy shapes: under a minute on 2 CPU cores
                                                     # (tests/test_bench.py runs it, so it cannot rot)

(a) loss    grpo.grpo_loss (fused, chunked) against grpo.naive_grpo_loss in bf16 at Liger-Kernel's published GRPO
            shape (B=16 x T=1,024 tokens, hidden 4,096, vocab 128,256): peak memory and forward+backward time of
            each, the fused loss at three chunk budgets (--loss.chunk_mb), and how far its loss and gradients are
            from naive's. Liger reports 7.8 GB / 327 ms (its fused loss) against 37.5 GB / 357 ms (plain torch) on
            an A100. Also which fp32-output matmuls the device has (grpo.fp32_out_matmuls): on CUDA both should.
(b) rollout a random model of Qwen3-0.6B's shape: decode tokens/s at batch 32 (4 tasks x group 8 of a real gym,
            one turn, through rollout.rollout) for both schedules (lockstep, engine) and the engine with
            --rollout.compile true (on CUDA only); and the log-prob gap between the bf16 rollout copy
            (models.rollout_copy, its lm_head's logits in fp32 as during a rollout: engine.fp32_head) and the
            training forward (fp32 weights under bf16 autocast, fused fp32 log-probs) at positions beyond 2,000,
            next to the same gap with the copy's bf16 logits and for the old deepcopy().to(bf16).
            Vocab: the model keeps Qwen's 151,936 ids (the lm_head costs what it costs in a real run), but the
            tiny tokenizer has 1,536, so sampling is restricted to those by a hook that sets the other logits
            to -inf; the log-prob gap is measured over the full vocab, without the hook.
(c) train   two GRPO steps of train.py on all visible GPUs, launched the way a user launches it (python -m
            torch.distributed.run --standalone --nproc_per_node N train.py ... --fsdp true --dtype bfloat16
            --gradient_checkpointing true), on a saved random model of Qwen3-0.6B's shape whose vocab is the
            tiny tokenizer's 1,536 ids (a multiple of 128, as Qwen pads its vocab), so every sampled id decodes.
            A random model earns no reward spread, so every update would be skipped: --loss.kl_coef 0.001 makes
            every episode train (and loads the reference model). Reports metrics.jsonl's per-phase times and
            its peak_mem_gb/<phase> keys where train.py logs them ("not logged" otherwise).

Each part runs under try/except (a failing part reports its error; the others still run) and within its own time
limit (90, 150 and 220 s, and --time-limit 470 s for all): a part starts no new measurement once its limit is
reached (one already running, e.g. a compile, finishes), and (c) is killed at its limit.
Progress goes to stderr; the last line on stdout is the JSON object; the exit status is 1 when any part
failed. No GPU figures have been measured with this script yet (see the README's "GPU check").
"""
import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                # the project's modules first: bench/rollout.py is not rollout.py
sys.path.append(str(ROOT / "bench"))

import engine  # noqa: E402
import envs  # noqa: E402
import grpo  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
from shapes import QWEN3  # noqa: E402

LIGER_A100 = {"liger_fused": {"peak_gb": 7.8, "ms": 327}, "torch": {"peak_gb": 37.5, "ms": 357}}
# toy shapes for --quick: every code path of the full run, in seconds on a CPU
SHAPES = {
    False: dict(loss=dict(tokens=16 * 1024, hidden=4096, vocab=128_256, chunk_mb=(256, 1024, 4096), runs=3),
                model=dict(QWEN3["Qwen3-0.6B"]), new_tokens=256, gap_tokens=2304, steps_new_tokens=128,
                limits=dict(a=90, b=150, c=220)),
    True: dict(loss=dict(tokens=512, hidden=64, vocab=3000, chunk_mb=(0.25, 1, 4), runs=1),
               model=dict(QWEN3["Qwen3-0.6B"], layers=2, hidden=128, heads=2, kv_heads=1, intermediate=256,
                          vocab=4096),
               new_tokens=16, gap_tokens=2304, steps_new_tokens=8, limits=dict(a=60, b=60, c=120)),
}


def log(msg: str):
    print(f"[gpu_smoke {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Clock:
    """A part's time limit: `left()` seconds remain; measurements check it before they start."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_peak(device):
    """Start a peak-memory measurement; returns the baseline. CUDA: the allocator's own statistics. CPU: the
    resident set's high-water mark (reset through /proc/self/clear_refs; None where that is not allowed)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def peak_gb(device, base):
    if base is None:
        return None
    if device.type == "cuda":
        sync(device)
        return round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 30, 3)
    return round((_status_kb("VmHWM") * 1024 - base) / 2 ** 30, 3)


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# (a) the fused GRPO loss against naive


def loss_inputs(n: int, hidden: int, vocab: int, device, seed: int = 0):
    """Seeded inputs made on the device (half a billion weights would take seconds on the host)."""
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(generator=g, device=device)
    h = torch.randn(n, hidden, **f32).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, **f32) / hidden ** 0.5).to(torch.bfloat16)     # logits ~ N(0, 1)
    y = torch.randint(0, vocab, (n,), **f32)
    old = -math.log(vocab) + torch.randn(n, **f32) * 0.5       # near the policy's: every branch of the clip occurs
    adv = torch.randn(n, **f32)
    return h, w, y, old, adv, torch.full((n,), 1.0 / n, device=device)


def time_loss(fn, inputs, cfg, runs: int, device):
    """(peak GB of the first timed run above what was allocated before it: the inputs, naive's gradients kept for
    the comparison; fastest fwd+bwd ms; loss; grad of hidden; grad of weight). The first call is a warm-up
    (cuBLAS handles, the allocator's pools), not timed."""
    h0, w0, *rest = inputs
    peak, times = None, []
    for i in range(runs + 1):
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
        base = start_peak(device) if i == 1 else None
        t0 = time.perf_counter()
        loss, _ = fn(h, w, *rest, cfg)
        loss.backward()
        sync(device)
        if i:
            times.append(1000 * (time.perf_counter() - t0))
        if i == 1:
            peak = peak_gb(device, base)
    return peak, min(times), loss.item(), h.grad, w.grad


def part_loss(shape: dict, device, clock: Clock) -> dict:
    n, hid, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    out = {"tokens": n, "hidden": hid, "vocab": vocab, "dtype": "bfloat16",
           "fp32_out_matmuls": grpo.fp32_out_matmuls(device.type), "liger_a100": LIGER_A100}
    inputs = loss_inputs(n, hid, vocab, device)
    log(f"(a) naive loss, {n:,} tokens x vocab {vocab:,} x hidden {hid:,}")
    ref = None
    try:
        peak, ms, loss, gh, gw = time_loss(grpo.naive_grpo_loss, inputs, grpo.LossConfig(), shape["runs"], device)
        out["naive"] = {"peak_gb": peak, "ms": round(ms, 1), "loss": loss}
        ref = (loss, gh.float(), gw.float())
        del gh, gw
    except torch.OutOfMemoryError as e:
        out["naive"] = {"error": f"out of memory: {str(e)[:200]}"}
    free(device)
    out["fused"] = {}
    for mb in shape["chunk_mb"]:
        if clock.left() < 5:
            out["fused"][str(mb)] = {"skipped": "time limit"}
            continue
        log(f"(a) fused loss, chunk budget {mb} MiB")
        cfg = grpo.LossConfig(chunk_mb=mb)
        r = {"chunk_tokens": grpo.chunk_tokens(vocab, mb, device)}
        try:
            peak, ms, loss, gh, gw = time_loss(grpo.grpo_loss, inputs, cfg, shape["runs"], device)
            r.update(peak_gb=peak, ms=round(ms, 1), loss=loss)
            if ref is not None:
                r["loss_diff_vs_naive"] = abs(loss - ref[0])
                r["grad_rel_err_hidden"] = float((gh.float() - ref[1]).norm() / ref[1].norm())
                r["grad_rel_err_weight"] = float((gw.float() - ref[2]).norm() / ref[2].norm())
            del gh, gw
        except torch.OutOfMemoryError as e:
            r["error"] = f"out of memory: {str(e)[:200]}"
        out["fused"][str(mb)] = r
        free(device)
    timed = {k: v for k, v in out["fused"].items() if "ms" in v}
    if timed:
        best = min(timed, key=lambda k: timed[k]["ms"])
        out["best_chunk_mb"] = float(best)
        if "ms" in out.get("naive", {}):
            out["fused_vs_naive"] = {"time": round(timed[best]["ms"] / out["naive"]["ms"], 3),
                                     "memory": round(timed[best]["peak_gb"] / out["naive"]["peak_gb"], 3)
                                     if timed[best]["peak_gb"] and out["naive"]["peak_gb"] else None}
    return out


# ----------------------------------------------------------------------------------------------------------
# (b) rollout decode speed and the rollout copy's log-prob gap


def restrict_vocab(model, n: int):
    """Sampling only ever picks ids < n: a hook sets the other logits to -inf (the lm_head still costs the full
    vocab). Returns the hook handle."""
    def hook(module, inputs, output):
        output[..., n:] = float("-inf")
        return output
    return model.get_output_embeddings().register_forward_hook(hook)


def training_logprobs(model, ids):
    """The training forward as train.py runs it in bf16 without FSDP: fp32 weights under bf16 autocast, the final
    hidden states, then grpo.token_logprobs (fp32 log-probs) of each next token."""
    with torch.no_grad():
        h = models.hidden_states(model, ids, torch.ones_like(ids), bf16=True)[0, :-1]
        w = models.head_weight(model)
        return grpo.token_logprobs(h, w.to(h.dtype), ids[0, 1:], chunk_size=grpo.chunk_tokens(w.shape[0], 0, h.device))


def copy_logprobs(copy_, ids, fp32_head: bool = True):
    """How the rollout scores a token: the copy's logits as its lm_head hands them out during a rollout (fp32,
    engine.fp32_head; with fp32_head False, in the copy's dtype, as before that), log_softmax in fp32."""
    with torch.no_grad(), engine.fp32_head(copy_) if fp32_head else contextlib.nullcontext():
        logits = copy_(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)


def rope_gap(model, copy_, ids, start: int = 2000, fp32_head: bool = True) -> dict:
    ref = training_logprobs(model, ids)
    gap = (copy_logprobs(copy_, ids, fp32_head) - ref).abs()
    late, early = gap[start:], gap[:256]
    return {"mean_abs_beyond_2000": float(late.mean()), "max_abs_beyond_2000": float(late.max()),
            "mean_abs_first_256": float(early.mean())}


# decode tokens/s for both schedules of rollout.py, and the engine with its decode step compiled (CUDA graphs;
# skipped on CPU)
ROLLOUT_VARIANTS = [("schedule=lockstep", {"schedule": "lockstep"}), ("schedule=engine", {"schedule": "engine"}),
                    ("schedule=engine+compile", {"schedule": "engine", "compile": True})]


def decode_speed(model, tok, tasks, new_tokens: int, extra: dict) -> dict:
    cfg = rollout.RolloutConfig(max_turns=1, max_new_tokens=new_tokens, max_episode_tokens=new_tokens + 1,
                                progress=False, **extra)
    stats = {}
    t0 = time.perf_counter()
    eps = rollout.rollout(model, tok, tasks, 8, cfg, stats=stats)
    wall = time.perf_counter() - t0
    gen = stats.get("tokens_generated", sum(sum(e.loss_mask) for e in eps))
    t_gen = stats.get("time_generate", wall)
    return {"episodes": len(eps), "tokens_generated": gen, "time_generate_s": round(t_gen, 3),
            "tokens_per_s": round(gen / max(t_gen, 1e-9), 1), "wall_s": round(wall, 2)}


def part_rollout(setup: dict, device, clock: Clock) -> dict:
    tok = models.build_tiny_tokenizer()
    shape = setup["model"]
    log(f"(b) random model of Qwen3-0.6B's shape ({shape['layers']} layers, hidden {shape['hidden']}, "
        f"vocab {shape['vocab']:,}) on {device}")
    from shapes import qwen3_model
    model = qwen3_model(shape, tok, device=device)
    out = {"model": {k: shape[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab")},
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "batch": 32}
    # the log-prob gap at positions beyond 2,000, over the full vocab
    ids = torch.randint(0, shape["vocab"], (1, setup["gap_tokens"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    copy_ = models.rollout_copy(model, torch.bfloat16)
    try:
        out["logprob_gap"] = {"rollout_copy": rope_gap(model, copy_, ids), "positions": setup["gap_tokens"],
                              "rollout_copy_bf16_head": rope_gap(model, copy_, ids, fp32_head=False)}
        import copy as copy_module
        old = copy_module.deepcopy(model).to(torch.bfloat16)
        out["logprob_gap"]["old_deepcopy_to_bf16"] = rope_gap(model, old, ids)
        del old
    except Exception as e:   # noqa: BLE001  (reported; decode speed is still measured)
        out["logprob_gap"] = {"error": f"{type(e).__name__}: {e}"}
    del model
    free(device)
    # decode tokens/s at batch 32: 4 tasks x group 8, one turn of new_tokens tokens each
    tasks = [("function", t) for t in envs.load_tasks("function")[:4]]
    handle = restrict_vocab(copy_, len(tok))
    log("(b) warm-up rollout")
    decode_speed(copy_, tok, tasks[:1], 4, {})
    out["decode"] = {}
    for label, kw in ROLLOUT_VARIANTS:
        if clock.left() < 10:
            out["decode"][label] = {"skipped": "time limit"}
            continue
        if kw.get("compile") and device.type != "cuda":
            out["decode"][label] = {"skipped": "CUDA only: on CPU the compile alone takes minutes and captures no "
                                               "CUDA graph (tests/test_rollout.py runs a compiled decode on CPU)"}
            continue
        log(f"(b) rollout {label}: 32 episodes x {setup['new_tokens']} new tokens")
        base = start_peak(device)
        try:
            if kw.get("compile"):  # the same rollout once first: it compiles (and records) every shape timed below
                from torch._dynamo.utils import counters
                t0 = time.perf_counter()
                decode_speed(copy_, tok, tasks, setup["new_tokens"], kw)
                warm = {"compile_and_first_run_s": round(time.perf_counter() - t0, 1)}
            r = decode_speed(copy_, tok, tasks, setup["new_tokens"], kw)
            if kw.get("compile"):  # CUDA graphs skipped (e.g. for mutated inputs) and graphs compiled, both calls
                r.update(warm, cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                         graphs_compiled=counters["stats"]["unique_graphs"])
            r["peak_gb"] = peak_gb(device, base)
        except Exception as e:   # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {e}"}
        out["decode"][label] = r
    handle.remove()
    del copy_
    free(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# (c) two GRPO steps of train.py with FSDP2, bf16 and gradient checkpointing, through the command line


def part_train(setup: dict, device, clock: Clock) -> dict:
    tok = models.build_tiny_tokenizer()
    vocab = 128 * math.ceil(len(tok) / 128)      # padded to a multiple of 128, as Qwen pads its vocab
    shape = dict(setup["model"], vocab=vocab)
    nproc = torch.cuda.device_count() if device.type == "cuda" else 1
    from shapes import qwen3_model
    with tempfile.TemporaryDirectory() as tmp:
        folder, out_dir = Path(tmp) / "model", Path(tmp) / "run"
        log(f"(c) saving a random Qwen3-0.6B-shaped model (vocab {vocab:,}) and the tiny tokenizer to {folder}")
        model = qwen3_model(shape, tok)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "train.py", "--algo", "grpo", "--model", str(folder), "--out_dir", str(out_dir),
               "--device", device.type, "--fsdp", "true", "--dtype", "bfloat16", "--gradient_checkpointing", "true",
               "--steps", "2",
               "--gyms", '{"function": 1}', "--batch_size", str(nproc), "--mini_batch_size", str(nproc),
               "--group_size", "4", "--micro_batch_size", "2", "--rollout.max_turns", "2",
               "--rollout.max_new_tokens", str(setup["steps_new_tokens"]), "--rollout.progress", "false",
               "--loss.kl_coef", "0.001", "--save_every", "0", "--eval_every", "0", "--transcripts", "0"]
        out = {"nproc": nproc, "vocab": vocab, "layers": shape["layers"], "hidden": shape["hidden"],
               "command": " ".join(cmd[1:])}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        log(f"(c) {nproc} rank(s): python {' '.join(cmd[1:6])} train.py ... (limit {clock.left():.0f} s)")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(clock.left(), 1))
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {**out, "error": f"time limit ({e.timeout:.0f} s) reached", "stderr_tail": tail}
        out["seconds"] = round(time.perf_counter() - t0, 1)
        if p.returncode != 0:
            return {**out, "error": f"exit status {p.returncode}", "stderr_tail": p.stderr[-2000:]}
        rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
        keep = ("time_generate", "time_user", "time_logprob", "time_update", "time_step", "loss", "grad_norm", "kl",
                "logprob_diff", "response_tokens_mean")
        out["steps"] = []
        for m in rows:
            peaks = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("peak_mem_gb/")}
            out["steps"].append({**{k: m[k] for k in keep if k in m},
                                 "peak_mem_gb": peaks or "not logged"})
    return out


# ----------------------------------------------------------------------------------------------------------


def machine(device) -> dict:
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(),
                "gpu_gb": round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)}
    return {"cpu_cores": os.cpu_count(), "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="toy shapes: the same code in under a minute on a CPU")
    p.add_argument("--parts", default="a,b,c", help="which parts to run, e.g. a,b")
    p.add_argument("--time-limit", type=float, default=470, help="seconds for all parts together")
    args = p.parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True     # what train.py sets on CUDA: fp32 matmuls in TF32
        torch.backends.cudnn.allow_tf32 = True
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in ("a", "b", "c")]
    if bad:
        raise SystemExit(f"--parts: unknown part(s) {bad}; known: a, b, c")
    setup = SHAPES[args.quick]
    result = {"device": device.type, **machine(device), "torch": torch.__version__, "quick": args.quick,
              "date": time.strftime("%Y-%m-%d")}
    t_start = time.perf_counter()
    runners = {"a": lambda c: part_loss(setup["loss"], device, c), "b": lambda c: part_rollout(setup, device, c),
               "c": lambda c: part_train(setup, device, c)}
    names = {"a": "loss", "b": "rollout", "c": "train"}
    for part in parts:
        limit = min(setup["limits"][part], args.time_limit - (time.perf_counter() - t_start))
        if limit < 10:
            result[names[part]] = {"skipped": f"--time-limit {args.time_limit:g} s reached"}
            continue
        clock = Clock(limit)
        t0 = time.perf_counter()
        log(f"part ({part}) {names[part]}: limit {limit:.0f} s")
        try:
            result[names[part]] = runners[part](clock)
        except Exception as e:   # noqa: BLE001  (one failing part must not hide the others)
            result[names[part]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
            log(f"part ({part}) failed: {type(e).__name__}: {e}")
        result[names[part]]["seconds"] = round(time.perf_counter() - t0, 1)
        free(device)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return result


def errors(tree, path: str = "") -> list:
    """Every "error" in a result, as "its dotted place: the error": what the exit status reports."""
    if not isinstance(tree, dict):
        return []
    here = [f"{path or '.'}: {tree['error']}"] if "error" in tree else []
    return here + [e for k, v in tree.items() for e in errors(v, f"{path}.{k}")]


if __name__ == "__main__":
    failed = errors(main())
    if failed:
        sys.exit("gpu_smoke: errors in " + "; ".join(failed))  # exit status 1: a failing part is not a passing check
