r"""Multi-turn GRPO for user-centric agents: the UserRL recipe (arXiv 2509.19736), written by hand in PyTorch.

    python train.py                                # the offline demo: the whole recipe on CPU (configs/demo.json)
    python train.py --sft_steps 0                  # the demo without the SFT cold start (the paper's finding 1)
    python train.py --algo sft --sft_data runs/expert/episodes.jsonl --model Qwen/Qwen3-4B   # SFT only
    python train.py --config configs/userrl-qwen3-4b.json \
        --user.serve_cmd "vllm serve Qwen/Qwen3-32B --port {port} --tensor-parallel-size 2" --user.serve_gpus 2
                                    # the paper's recipe on one 8-GPU box: its user on 2 GPUs, 6 ranks train
    python train.py --config configs/demo.json --algo grpo --nproc 2   # the demo's GRPO on 2 ranks (gloo), CPU
    python train.py --resume runs/20261125-120000 --steps 40            # continue a run where it stopped

`--algo` picks what runs: `grpo` (the RL stage, below), `sft` (the cold start, sft.py), or `recipe` (recipe()
below: evaluate the model -> SFT -> evaluate -> GRPO from the SFT model -> evaluate, the evaluations in
RUN/evals.jsonl and a table of the three at the end). A command that names neither --config, --resume nor --algo
runs configs/demo.json with its overrides: `python train.py` is the recipe on the tiny-demo model.

One step (`step()` below; paper section 4) runs six phases, in this order:
  1. sample `batch_size` tasks from the gym mixture (every rank draws the same batch and rolls out its share)
  2. roll out `group_size` episodes per task against the simulated user (rollout.py)
  3. score each episode, normalise the scores within each group into advantages, spread them over the agent's
     tokens with per-turn credits (rewards.py)
  4. recompute the old log-probs of the generated tokens with the training forward (no grad)
  5. `ppo_epochs` passes of clipped-ratio AdamW updates over mini-batches, with the fused log-prob (grpo.py)
  6. log metrics and transcripts, evaluate, checkpoint
A step in which more than --max_failed_frac of the episodes lost their user stops the run before phase 3. The first
Ctrl-C or SIGTERM abandons a step before its update and lets it finish from the update on; either way the state is
checkpointed and --resume continues exactly (Stop).
Before the first step, every check that can fail runs (config values, device, ranks, model name, task files, the
user endpoint), before the run folder exists and before any model loads; then the folder is claimed
(checkpoints.py), the user server started (--user.serve_cmd), and, with more than one GPU (or --nproc N, or
--fsdp), train.py re-runs itself as one rank per GPU through torch.distributed.run (distributed.launch); then
the models are loaded (or resumed) and config.json is written.
Simplifications, each deliberate:
  - no critic, no KL and no entropy bonus by default (the paper's recipe; `--loss.kl_coef` turns KL on);
  - generation runs in-process with our own KV-cached batched sampler (rollout.py), not vLLM/SGLang;
  - data parallel = the same loop on every rank plus an all-reduce of the gradients per update (no DDP
    wrapper); `--fsdp true` shards parameters with FSDP2 for models that do not fit (distributed.py);
  - a group never spans ranks, so advantages need no communication; token counts for the loss are global.
"""
import dataclasses
import inspect
import json
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

import checkpoints
import distributed
import envs
import eval as evaluation
import rewards
import sft
import users
from config import (HELP, ConfigError, DataError, Tasks, apply_args, check_before_work, help_text, load_tasks,
                    plan_ranks, split_names)
from grpo import STATS, LossConfig, chunk_tokens, grpo_loss, loss_weights, naive_grpo_loss, token_logprobs
from models import head_weight, hidden_states, load_model, pad_batch, refresh_rollout_copy, rollout_copy
from rollout import RolloutConfig, rollout
from users import UserConfig, failure_reason

# The paper trains on Travel, Turtle, Persuade, Function and Tau and holds out Intention, Telepathy and Search
# for evaluation.
HELD_OUT = ("intention", "telepathy", "search")
ALGOS = ("grpo", "sft", "recipe")
DEMO = Path(__file__).resolve().parent / "configs" / "demo.json"
ALLOC_CONF = "expandable_segments:True"
"""train.py's CUDA allocator setting (PYTORCH_CUDA_ALLOC_CONF) when the user has none: see main"""


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainLossConfig(LossConfig):
    """grpo.LossConfig and how the update computes it. Its `temperature` is not a key of its own: the PPO ratio
    must compare the distribution the rollout sampled from, so it is set from --rollout.temperature (1 when the
    rollout is greedy), in both the old-log-prob pass and the loss."""

    fused: bool = True
    """the fused chunked loss (grpo.grpo_loss); false runs the readable grpo.naive_grpo_loss, which holds the full
    tokens x vocab logits (fine for the tiny model; tens of GB at Qwen's vocabulary)"""


FIXED_KEYS = {"loss.temperature": "not a key of its own: the PPO ratio must use the temperature the rollout "
                                  "sampled at; set --rollout.temperature"}


@dataclass
class Config:
    # run
    algo: str = "grpo"
    """grpo (the RL stage), sft (the cold start, on --sft_data), or recipe (evaluate -> SFT -> evaluate -> GRPO ->
    evaluate: what `python train.py` runs, see configs/demo.json)"""
    model: str = "tiny"
    """policy: "tiny" (offline random model), "tiny-demo" (the demo's: see models.py), a hub id such as
    Qwen/Qwen3-4B, or a local folder (e.g. an SFT checkpoint)"""
    seed: int = 0
    """seeds the task sampler (same on every rank) and python/numpy/torch (offset by rank)"""
    out_dir: str = ""
    """run folder; empty means runs/<timestamp>. A folder that already holds a run is refused (use --resume)"""
    resume: str = ""
    """a run folder to continue from its latest checkpoint (its config.json, then these overrides, recorded in
    its resume-log.jsonl); --model cannot change on resume (the checkpoint holds the weights)"""
    steps: int = 3
    """GRPO steps to run in total (demo: 3; the paper's recipe: 270 = 18 steps per epoch x 15 epochs)"""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda"""
    dtype: str = "float32"
    """float32, or bfloat16: bf16 compute and a bf16 copy of the weights for rollouts, fp32 master weights"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state with FSDP2 (fully_shard per decoder block) over the ranks;
    python train.py starts them (with one GPU, or on the CPU without --nproc: a group of one)"""
    nproc: int = 0
    """ranks that train, one per GPU, started by python train.py itself; 0 = one per visible GPU (less those kept
    by --user.serve_gpus), 1 on the CPU. Under torchrun, its --nproc_per_node decides"""
    dist_timeout_min: float = 120.0
    """minutes a rank waits at a collective for the others before the run is stopped: a rank that finished its
    rollout waits there for the slowest (NCCL's own default, 10, kills long rollouts)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward (the paper's recipe turns it on)"""
    # data
    gyms: dict = field(default_factory=dict)
    """training mixture {gym: weight}; empty means every registered gym with weight 1 (the demo)"""
    eval_gyms: str = ",".join(HELD_OUT)
    """comma-separated gyms evaluated on their test split (greedy, no reward shown)"""
    eval_tasks: int = 4
    """test tasks per eval gym (0 = the whole split); the demo keeps it small"""
    data_dir: str = ""
    """a folder with the original UserRL task files, used instead of data/ (see envs.load_tasks)"""
    # GRPO
    batch_size: int = 2
    """tasks per step, over all ranks (demo: 2; the paper: 128)"""
    group_size: int = 8
    """episodes per task: the GRPO group"""
    mini_batch_size: int = 2
    """tasks per optimizer update, over all ranks; batch_size / mini_batch_size updates per epoch (paper: 16)"""
    micro_batch_size: int = 8
    """episodes per forward/backward on one rank (gradient accumulation up to the mini-batch)"""
    rollout_tasks: int = 0
    """tasks one rank rolls out together (their groups share one KV cache); 0 = all of its tasks at once.
    Bounds rollout memory: each episode's cache grows to (prompt + max_episode_tokens) x KV bytes per token"""
    ppo_epochs: int = 1
    """passes over the step's episodes"""
    lr: float = 1e-6
    """AdamW learning rate, constant, no warm-up (the paper's recipe)"""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, on every parameter"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    score: str = "sum"
    """trajectory-level score (rewards.SCORES); the paper's default "Sum" (a mean over turns)"""
    credit: str = "equalized"
    """turn-level credit (rewards.CREDITS); the paper's default"""
    scheme: str = "userrl"
    """how credits and the group advantage become token advantages (rewards.SCHEMES)"""
    gamma: float = 0.8
    """discount for the r2g score and credit"""
    use_std: bool = True
    """divide by the group std (False = Dr. GRPO)"""
    lam: float = 1.0
    """weight of the trajectory advantage in schemes that mix it with a turn advantage"""
    loss: TrainLossConfig = field(default_factory=TrainLossConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=48))
    """sampling and episode limits; the demo caps a turn at 48 new tokens because the random tiny model
    rarely ends a turn by itself (the paper: no cap per turn, 8,192 response tokens per episode)"""
    user: UserConfig = field(default_factory=UserConfig)
    """the simulated user (users.UserConfig: the backend, and for http the client's own fields)"""
    # SFT (--algo sft, and the recipe's first stage; the original's LLaMA-Factory settings by default)
    sft_data: str = ""
    """eval.py's episodes.jsonl or the original's ShareGPT file; empty = expert episodes of the training gyms'
    train split, played at the start (sft_expert_passes per task) and kept in RUN/expert-episodes.jsonl"""
    sft_min_score: float = 0.0
    """keep episodes scoring at least this (failed ones are always dropped; ShareGPT records have no score and
    are kept)"""
    sft_expert_passes: int = 4
    """expert episodes per training task when sft_data is empty (the expert varies its phrasing and order)"""
    sft_steps: int = -1
    """optimizer steps; -1 = sft_epochs passes over the data; 0 = none (the recipe then runs GRPO from --model)"""
    sft_epochs: float = 3.0
    """passes over the data when sft_steps is -1 (the original: 3)"""
    sft_lr: float = 1e-5
    """peak learning rate, after a linear warm-up, then cosine decay to 0 (the original: 1e-5)"""
    sft_warmup: float = 0.1
    """fraction of the SFT steps spent warming up (the original: 0.1)"""
    sft_weight_decay: float = 0.0
    """AdamW weight decay of the SFT stage (the original's LLaMA-Factory config sets none: the default, 0)"""
    sft_batch_size: int = 64
    """conversations per SFT step, over all ranks (the original: 2 per GPU x 4 accumulation x 8 GPUs)"""
    sft_max_tokens: int = 16384
    """longer conversations are left out (the original's cutoff_len)"""
    # logging and checkpoints
    save_every: int = 1
    """write a resumable checkpoint every N steps (0 = never): each rank's shard of the weights and AdamW state"""
    keep_last: int = 2
    """resumable checkpoints kept: older ones are deleted once a newer one is complete (0 = keep all)"""
    export_every: int = 0
    """export the policy as a Hugging Face folder (RUN/export-<step>, in the training dtype) every N steps;
    0 = only RUN/final, written when the run reaches --steps"""
    eval_every: int = 0
    """evaluate every N steps (0 = never; the paper: 5)"""
    transcripts: int = 2
    """episodes per step written to transcripts.jsonl"""
    max_failed_frac: float = 0.5
    """stop the run when more than this fraction of a step's episodes failed (their user endpoint erred or hung),
    before training on that step: the episodes left are the tasks that happened to work, a biased batch. The
    message names the endpoint and the reasons; 1 never stops (failed episodes are always left out of the loss)"""


def parse_config(argv: list[str]) -> Config:
    """Defaults, then `--config file.json`, then `--key value` / `--key=value` overrides, then value checks.
    With `--resume DIR` the defaults are replaced by DIR/config.json, the run's own resolved config."""
    cfg = Config()
    resume = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--resume"), None)
    resume = resume or next((a.split("=", 1)[1] for a in argv if a.startswith("--resume=")), None)
    if resume:
        if not (Path(resume) / "config.json").is_file():
            raise ConfigError(f"--resume: {resume} has no config.json (is it a run folder?)")
        cfg = apply_args(cfg, ["--config", str(Path(resume) / "config.json")])
    run_model, run_dir = cfg.model, cfg.out_dir
    cfg = apply_args(cfg, argv, fixed=FIXED_KEYS)
    if resume:
        if cfg.model != run_model:
            raise ConfigError(f"--model: a resumed run continues from its latest checkpoint's weights, so --model "
                              f"{cfg.model} would be ignored; to start a new run from its weights, pass "
                              f"--model {resume}/final (or an export-N folder) and a new --out_dir")
        if cfg.out_dir != run_dir and Path(cfg.out_dir).resolve() != Path(resume).resolve():
            raise ConfigError(f"--out_dir: a resumed run stays in its folder ({resume})")
        cfg.out_dir = resume
        checkpoints.check_resumable(Path(resume))
    cfg.loss.temperature = 1.0 if cfg.rollout.greedy else cfg.rollout.temperature  # see TrainLossConfig
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Checks of values (types are checked on parsing); nothing here reads the machine or the network."""
    def check(ok, key, msg):
        if not ok:
            raise ConfigError(f"--{key}: {msg}")

    check(cfg.algo in ALGOS, "algo", f"expected one of {', '.join(ALGOS)}, got {cfg.algo!r}")
    check(cfg.dtype in ("float32", "bfloat16"), "dtype", f"expected float32 or bfloat16, got {cfg.dtype!r}")
    check(cfg.device in ("auto", "cpu", "cuda"), "device", f"expected auto, cpu or cuda, got {cfg.device!r}")
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    check(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    check(cfg.sft_weight_decay >= 0, "sft_weight_decay", f"must be >= 0, got {cfg.sft_weight_decay}")
    check(cfg.grad_clip > 0, "grad_clip", f"must be > 0, got {cfg.grad_clip}")
    check(cfg.nproc >= 0, "nproc", f"must be >= 0 (0 = one rank per GPU), got {cfg.nproc}")
    check(cfg.dist_timeout_min > 0, "dist_timeout_min", f"must be > 0, got {cfg.dist_timeout_min}")
    check(0 <= cfg.max_failed_frac <= 1, "max_failed_frac", f"must be in [0, 1], got {cfg.max_failed_frac}")
    for key in ("steps", "rollout_tasks", "save_every", "keep_last", "export_every", "eval_every", "eval_tasks",
                "transcripts"):
        check(getattr(cfg, key) >= 0, key, f"must be >= 0, got {getattr(cfg, key)}")
    for key in ("batch_size", "group_size", "mini_batch_size", "micro_batch_size", "ppo_epochs"):
        check(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    check(cfg.batch_size % cfg.mini_batch_size == 0, "mini_batch_size",
          f"must divide batch_size ({cfg.batch_size}), got {cfg.mini_batch_size}")
    for gym, w in cfg.gyms.items():
        check(gym in envs.GYMS, "gyms", f"unknown gym {gym!r}; known: {sorted(envs.GYMS)}")
        check(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf"), "gyms",
              f"weight of {gym!r} must be a finite number >= 0, got {w!r}")
    check(not cfg.gyms or sum(cfg.gyms.values()) > 0, "gyms", "at least one weight must be > 0")
    check(cfg.gyms or not cfg.data_dir, "gyms", "name the gyms to train on when --data_dir points at the original "
          'files, e.g. {"travel": 925, "turtle": 423, "persuade": 378, "function": 200} (tau needs tau-bench)')
    for gym in split_names(cfg.eval_gyms):
        check(gym in envs.GYMS, "eval_gyms", f"unknown gym {gym!r}; known: {', '.join(sorted(envs.GYMS))}")
    check(split_names(cfg.eval_gyms) or not cfg.eval_every, "eval_gyms", "empty, but --eval_every asks for evaluations")
    check(cfg.score in rewards.SCORES, "score", f"unknown {cfg.score!r}; known: {sorted(rewards.SCORES)}")
    check(cfg.credit in rewards.CREDITS, "credit", f"unknown {cfg.credit!r}; known: {sorted(rewards.CREDITS)}")
    try:  # a registered credit of another signature would otherwise fail only after the first rollout
        inspect.signature(rewards.CREDITS[cfg.credit]).bind([], cfg.gamma, None)
    except TypeError:
        check(False, "credit", f"rewards.CREDITS[{cfg.credit!r}] must take (turn_rewards, gamma, turn_info=None), "
              f"got {inspect.signature(rewards.CREDITS[cfg.credit])}")
    check(cfg.scheme in rewards.SCHEMES, "scheme", f"unknown {cfg.scheme!r}; known: {sorted(rewards.SCHEMES)}")
    check(cfg.user.backend in users.BACKENDS, "user.backend",
          f"expected one of {', '.join(users.BACKENDS)}, got {cfg.user.backend!r}")
    check(cfg.user.backend == "scripted" or cfg.user.model, "user.model", f"the {cfg.user.backend} user needs a model")
    check(cfg.user.backend != "http" or cfg.user.base_url or cfg.user.serve_cmd or os.environ.get("OPENAI_BASE_URL"),
          "user.base_url", "the http user needs an endpoint: --user.base_url http://HOST:PORT/v1, $OPENAI_BASE_URL, "
          "or a server started for the run (--user.serve_cmd)")
    check(not cfg.user.serve_cmd or cfg.user.backend == "http", "user.serve_cmd",
          f"the started server is reached by the http user; set --user.backend http (got {cfg.user.backend})")
    check(not cfg.user.serve_cmd or "{port}" in cfg.user.serve_cmd, "user.serve_cmd",
          "put {port} where the command takes its port (e.g. vllm serve MODEL --port {port}): train.py picks a "
          "free port and points the http user there")
    check(cfg.user.serve_gpus >= 0, "user.serve_gpus", f"must be >= 0, got {cfg.user.serve_gpus}")
    check(cfg.user.serve_cmd or not cfg.user.serve_gpus, "user.serve_gpus",
          "GPUs kept for a user server, but no --user.serve_cmd starts one")
    check(cfg.user.serve_timeout > 0, "user.serve_timeout", f"must be > 0, got {cfg.user.serve_timeout}")
    check(cfg.user.max_concurrency >= 1 and cfg.user.max_retries >= 0 and cfg.user.timeout > 0, "user",
          "max_concurrency must be >= 1, max_retries >= 0 and timeout > 0")
    check(cfg.sft_steps >= -1, "sft_steps", f"must be >= 0, or -1 for sft_epochs passes, got {cfg.sft_steps}")
    check(cfg.algo != "sft" or cfg.sft_steps != 0, "sft_steps", "0 means no SFT, and --algo sft does nothing else")
    check(cfg.sft_epochs > 0 and cfg.sft_lr > 0, "sft_epochs", f"sft_epochs and sft_lr must be > 0, got "
          f"{cfg.sft_epochs}, {cfg.sft_lr}")
    check(0 <= cfg.sft_warmup < 1, "sft_warmup", f"must be in [0, 1), got {cfg.sft_warmup}")
    for key in ("sft_batch_size", "sft_max_tokens", "sft_expert_passes"):
        check(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    check(cfg.algo != "recipe" or not cfg.resume, "resume", "a recipe's phases are runs of their own: resume its "
          "GRPO phase with --algo grpo --resume RUN (RUN/config.json), or its SFT phase with --resume RUN/sft")
    for key in ("loss", "rollout"):  # their own checks, in __post_init__
        sub = getattr(cfg, key)
        try:
            type(sub)(**dataclasses.asdict(sub))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--{key}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# One GRPO step


class TaskSampler:
    """Draws (gym, task) pairs from the weighted gym mixture. Seeded identically on every rank, so all ranks
    agree on the global batch; each rank then rolls out its own share of it."""

    def __init__(self, pool: dict, weights: dict, seed: int):
        self.pool = pool
        self.gyms = sorted(pool)
        self.weights = [weights.get(g, 1.0) for g in self.gyms]
        self.rng = random.Random(seed)

    def sample(self, n: int) -> list[tuple[str, dict]]:
        gyms = self.rng.choices(self.gyms, weights=self.weights, k=n)
        return [(g, self.rng.choice(self.pool[g])) for g in gyms]


@dataclass
class Stop:
    """Ctrl-C and SIGTERM in a one-process run (train() installs `handle` for both, for the steps). The first one
    before a step's update abandons the step: nothing has changed the weights yet, so its random draws are undone,
    the state before it is checkpointed (if it is not already) and resume redoes it. From the update on, the first
    one is held: the step finishes (update, logs, checkpoint), a checkpoint of it is written if it was not due, and
    then the run stops. Either way resume continues exactly where an uninterrupted run would be. A second signal
    stops at once: a save it cuts short is a .tmp folder, and the last complete checkpoint stays the latest."""

    signals: int = 0
    signum: int = 0
    """the first signal (SIGINT, SIGTERM)"""
    holding: bool = False
    """set from a step's update until the next step starts"""

    def handle(self, signum, frame):
        self.signals += 1
        self.signum = self.signum or signum
        if self.signals > 1 or not self.holding:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self, on: bool):
        if not on:
            yield
            return
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class Trainer:
    """What every step reads; built once by set_up()."""

    cfg: Config
    run_dir: Path
    ranks: distributed.Ranks
    model: torch.nn.Module
    """the policy being trained (FSDP2-sharded with --fsdp)"""
    rollout_model: torch.nn.Module
    """what generates: the policy itself, or a full copy of its weights (bf16 with --dtype bfloat16; always under
    FSDP, since a sharded model would all-gather every layer for every decoded token)"""
    ref_model: torch.nn.Module | None
    """the initial policy for the KL term; None when kl_coef is 0 (the paper's recipe)"""
    tokenizer: object
    optimizer: torch.optim.Optimizer
    sampler: TaskSampler
    test_tasks: list
    """(gym, task) pairs of the evaluation"""
    user: object
    """the simulated user (None: each env builds its scripted one)"""
    start: int
    """steps done before this process started (from the checkpoint resumed)"""
    stop: Stop = field(default_factory=Stop)


@dataclass
class Batch:
    """This rank's trainable episodes of a step and, for each, what the update needs."""

    episodes: list
    task: list
    """index of each episode's task in the step's global batch: its GRPO group; mini-batch k holds the tasks
    [k * mini_batch_size, (k + 1) * mini_batch_size)"""
    advantages: list
    """one float32 tensor per episode, one advantage per generated token"""
    pad_id: int
    old_logprobs: list | None = None
    ref_logprobs: list | None = None

    def select(self, idx: list) -> "Batch":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Batch(pick(self.episodes), pick(self.task), pick(self.advantages), self.pad_id,
                     pick(self.old_logprobs), pick(self.ref_logprobs))


def step(t: Trainer, n: int) -> dict:
    """GRPO step n (counted from 1), its six phases in order. Returns the step's metrics; rank 0 has written
    them and the transcripts to the run folder before the step's checkpoint."""
    cfg, (rank, world, device) = t.cfg, t.ranks
    m = {"step": n}
    t0 = time.perf_counter()
    # 1. sample the global batch (the same on every rank) and deal this rank its tasks
    batch = t.sampler.sample(cfg.batch_size)
    mine = distributed.deal(len(batch), rank, world)
    # 2. roll out a group of episodes per task against the simulated user
    with phase(m, "rollout", device):
        episodes, m["time_user"] = roll_out(t, [batch[i] for i in mine], mine, n)
    check_failures(t, n, episodes)
    if device.type == "cuda":  # the KV cache is gone: hand its blocks back before the training forward
        torch.cuda.empty_cache()
    task_of = [mine[j // cfg.group_size] for j in range(len(episodes))]
    # 3. score and advantages, per group; episodes whose user failed are left out
    kept = [j for j, e in enumerate(episodes) if not e.failed]
    eps, groups = [episodes[j] for j in kept], [task_of[j] for j in kept]
    scores, advantages = score_and_advantages(eps, groups, cfg)
    train_batch = Batch(eps, groups, [torch.tensor(a, dtype=torch.float32) for a in advantages],
                        t.tokenizer.pad_token_id)
    # 4. old log-probs (and the reference model's), recomputed with the training forward
    with phase(m, "logprob", device):
        train_batch.old_logprobs, entropies = recompute_logprobs(t.model, train_batch, cfg)
        if t.ref_model is not None:
            train_batch.ref_logprobs, _ = recompute_logprobs(t.ref_model, train_batch, cfg, entropy=False)
    # 5. clipped-ratio updates; from here on the step is finished before a signal stops the run (Stop)
    t.stop.holding = True
    checkpoints.signal_point("update", n)
    with phase(m, "update", device):
        m.update(update(t.model, t.optimizer, train_batch, cfg))
    # 6. log, evaluate, checkpoint (the step's lines reach the disk before its checkpoint becomes the latest)
    m.update(episode_metrics(episodes, scores, advantages, groups))
    m.update(logprob_metrics(train_batch, entropies))
    if cfg.eval_every and (n % cfg.eval_every == 0 or n == cfg.steps):
        m.update(evaluate(t, n))
    m["time_generate"] = m["time_rollout"] - m["time_user"]
    m["time_step"] = time.perf_counter() - t0
    if rank == 0:
        checkpoints.append_step(t.run_dir, m, episodes[: cfg.transcripts], t.tokenizer)
    if cfg.save_every and n % cfg.save_every == 0:
        save(t, n)
    if cfg.export_every and n % cfg.export_every == 0 and n < cfg.steps:  # the last step's export is RUN/final
        export(t, f"export-{n:06d}")
    return m


def save(t: Trainer, n: int):
    """The resumable checkpoint RUN/ckpt-<n> of the state after step n (every rank calls it)."""
    checkpoints.save_checkpoint(t.run_dir, n, t.model, t.optimizer, {"sampler": t.sampler.rng.getstate()},
                                t.ranks.rank, t.cfg.keep_last)


def export(t: Trainer, name: str):
    """The policy as a Hugging Face folder RUN/<name> in the training dtype. The rollout copy holds exactly that
    (unsharded, bf16 with --dtype bfloat16), so refreshing it is the gather FSDP needs; rank 0 writes it."""
    if t.rollout_model is not t.model:
        refresh_rollout_copy(t.rollout_model, t.model)
    if t.ranks.rank == 0:
        checkpoints.export_model(t.run_dir / name, t.rollout_model, t.tokenizer)
    distributed.barrier()


@contextmanager
def phase(m: dict, name: str, device: torch.device):
    """Time a phase into m["time_<name>"]; on CUDA also its peak memory into m["peak_mem_gb/<name>"]."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        m[f"peak_mem_gb/{name}"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    m[f"time_{name}"] = time.perf_counter() - t0


def roll_out(t: Trainer, tasks: list, index: list, n: int) -> tuple[list, float]:
    """Phase 2: `group_size` episodes per task, grouped in task order and tagged with step n, and the seconds spent
    in env/user calls. `rollout_tasks` tasks at a time: their groups share one KV cache, which bounds its memory.

    `index`: each task's place in the step's global batch. The sampler is seeded per chunk from the run's seed,
    the step and the chunk's first task, so what a chunk samples does not depend on which rank rolls it out: with
    `--rollout_tasks 1`, N ranks sample the very episodes one process does (tests/test_distributed.py)."""
    cfg = t.cfg
    if t.rollout_model is not t.model:  # a collective under FSDP: every rank calls it, with or without tasks
        refresh_rollout_copy(t.rollout_model, t.model)
    episodes, time_user, chunk = [], 0.0, cfg.rollout_tasks or max(len(tasks), 1)
    for i in range(0, len(tasks), chunk):
        torch.manual_seed(random.Random(f"rollout {cfg.seed} {n} {index[i]}").getrandbits(63))
        stats = {}
        episodes += rollout(t.rollout_model, t.tokenizer, tasks[i:i + chunk], cfg.group_size, cfg.rollout,
                            user=t.user, stats=stats)
        time_user += stats["time_env"]
        if i == 0:
            checkpoints.signal_point("rollout", n)
    for e in episodes:
        e.info["step"] = n
    return episodes, time_user


def score_and_advantages(episodes: list, groups: list, cfg: Config) -> tuple[list, list]:
    """Phase 3 (paper section 3.2; rewards.py): each episode's trajectory score, normalised within its group into
    the GRPO advantage, then spread over its generated tokens with per-turn credits (each credit function gets the
    episode's turn_info). Returns (scores, token advantages per episode)."""
    scores = [rewards.trajectory_score(e.turn_rewards, cfg.score, cfg.gamma) for e in episodes]
    group_advs = rewards.group_advantages(scores, groups, cfg.use_std)
    credits = [rewards.turn_credits(e.turn_rewards, cfg.credit, cfg.gamma, e.turn_info) for e in episodes]
    turn_lens = [[sum(e.loss_mask[a:b]) for a, b in e.turn_spans] for e in episodes]
    return scores, rewards.SCHEMES[cfg.scheme](credits, turn_lens, group_advs, groups, cfg.use_std, cfg.lam)


@torch.no_grad()
def recompute_logprobs(model, batch: Batch, cfg: Config, entropy: bool = True) -> tuple[list, list]:
    """Phase 4: log-probs and entropies of each episode's generated tokens under `model` with the training
    forward, at the sampling temperature: the PPO ratio's denominator. Recomputed rather than taken from
    sampling so the ratio is exactly 1 before the first update even when sampling ran in bf16 with a KV cache
    (the two are compared as `logprob_diff`); the entropy comes from the same vocab pass (with `entropy`; the
    reference model's is not wanted: an empty list, and the pass needs one tile fewer)."""
    out, ents = [], []
    bf16, device = cfg.dtype == "bfloat16", model_device(model)
    for sl in distributed.micro_slices(len(batch.episodes), cfg.micro_batch_size, model):
        if sl.start == sl.stop:
            dummy_hidden(model, batch.pad_id, bf16)
            continue
        ids, attn, sel = pad_batch([(e.ids, e.loss_mask) for e in batch.episodes[sl]], batch.pad_id, device)
        h = hidden_states(model, ids, attn, bf16)[:, :-1][sel]
        w = head_weight(model)
        got = token_logprobs(h, w, ids[:, 1:][sel], temperature=cfg.loss.temperature,
                             chunk_size=chunk_tokens(w.shape[0], cfg.loss.chunk_mb, device), return_entropy=entropy)
        lp, ent = got if entropy else (got, None)
        counts = [int(s.sum()) for s in sel]
        out.extend(lp.float().cpu().split(counts))
        if entropy:
            ents.extend(ent.float().cpu().split(counts))
    if distributed.is_fsdp(model):  # FSDP keeps the root's weights gathered after a forward that has no backward
        model.reshard()
    return out, ents


def update(model, optimizer, batch: Batch, cfg: Config) -> dict:
    """Phase 5: `ppo_epochs` passes over this rank's episodes, `batch_size / mini_batch_size` AdamW updates each.

    Update k trains on the tasks [k*m, (k+1)*m) of the global batch (m = mini_batch_size). The loss of each token
    is weighted with counts over ALL ranks (grpo.loss_weights), so summing the gradients of every micro-batch and
    rank gives the gradient of the whole mini-batch: N ranks make the same update as one process with the same
    global batch (tests/test_distributed.py).

    Episodes whose advantages are all 0 (every member of a zero-spread group) have a loss of exactly 0 when there
    is no KL term, so they are not run through the model at all; they still count in the token and sequence
    totals, so the update is the same as if they had been. A mini-batch with no episode on any rank (every one
    failed) takes no optimizer step: AdamW's momentum and weight decay would move the weights on no data. The stats
    are over the trained tokens."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums, norms = dict.fromkeys(("tokens", "loss", *STATS), 0.0), []
    for _ in range(cfg.ppo_epochs):
        for k in range(cfg.batch_size // cfg.mini_batch_size):
            mb = batch.select([i for i, task in enumerate(batch.task) if task // cfg.mini_batch_size == k])
            totals = distributed.all_reduce_sums({"tokens": sum(sum(e.loss_mask) for e in mb.episodes),
                                                  "sequences": len(mb.episodes)})
            if totals["sequences"] == 0:  # the same on every rank
                continue
            mb = mb.select([i for i, a in enumerate(mb.advantages) if has_gradient(a, cfg.loss)])
            mb_sums, norm = mini_batch_update(model, optimizer, params, mb, totals, cfg)
            sums = {key: sums[key] + v for key, v in mb_sums.items()}
            norms.append(norm)
    sums = distributed.all_reduce_sums(sums)
    out = {key: sums[key] / max(sums["tokens"], 1.0) for key in STATS}
    out["grad_norm"] = float(np.mean(norms)) if norms else 0.0  # the same on every rank: the summed gradient's
    out["loss"] = sums["loss"] / max(len(norms), 1)  # the ranks' shares add up to each mini-batch's loss
    return out


def has_gradient(advantages: torch.Tensor, loss_cfg: LossConfig) -> bool:
    """Whether an episode's loss can have a non-zero gradient: some advantage is non-zero, or the KL term is on."""
    return loss_cfg.kl_coef > 0 or bool(advantages.any())


def mini_batch_update(model, optimizer, params: list, mb: Batch, totals: dict, cfg: Config) -> tuple[dict, float]:
    """One optimizer update over this rank's share of a mini-batch, gradients accumulated over micro-batches.
    `totals`: the mini-batch's tokens and sequences over all ranks, for the loss weights. Returns this rank's
    sums (tokens, loss, token-weighted STATS) and the gradient norm before clipping."""
    loss_fn = grpo_loss if cfg.loss.fused else naive_grpo_loss
    bf16, device = cfg.dtype == "bfloat16", model_device(model)
    lens = [int(sum(e.loss_mask)) for e in mb.episodes]
    sums = {"tokens": 0.0, "loss": 0.0, **{key: 0.0 for key in STATS}}
    slices = distributed.micro_slices(len(mb.episodes), cfg.micro_batch_size, model)
    for sl in slices:  # under FSDP each backward reduce-scatters its gradients into the accumulated shards
        if sl.start == sl.stop:
            (dummy_hidden(model, mb.pad_id, bf16).sum() * 0).backward()
            continue
        ids, attn, sel = pad_batch([(e.ids, e.loss_mask) for e in mb.episodes[sl]], mb.pad_id, device)
        h = hidden_states(model, ids, attn, bf16)[:, :-1][sel]
        w = loss_weights(lens[sl], cfg.loss.agg, int(totals["tokens"]), int(totals["sequences"]), cfg.loss.norm_len)
        cat = lambda xs: None if xs is None else torch.cat(xs[sl]).to(device)  # noqa: E731
        loss, stats = loss_fn(h, head_weight(model), ids[:, 1:][sel], cat(mb.old_logprobs), cat(mb.advantages),
                              w.to(device), cfg.loss, ref_logprobs=cat(mb.ref_logprobs))
        loss.backward()
        n = float(sel.sum())
        sums["tokens"] += n
        sums["loss"] += loss.item()
        for key in STATS:
            sums[key] += float(stats[key]) * n
    return sums, distributed.optimizer_step(model, optimizer, params, cfg.grad_clip)


def dummy_hidden(model, pad_id: int, bf16: bool):
    """A 2-token forward for a rank with no micro-batch left: under FSDP every rank must take part."""
    ids = torch.full((1, 2), pad_id, device=model_device(model))
    return hidden_states(model, ids, torch.ones_like(ids), bf16)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# Evaluation and metrics


def evaluate(t: Trainer, n: int) -> dict:
    """Greedy episodes on the test tasks without the reward shown (the paper's evaluation, eval.py's function),
    dealt over the ranks; appended to RUN/evals.jsonl as phase "grpo" at step n. Returns eval/* metrics."""
    if t.rollout_model is not t.model:  # every rank joins (a collective under FSDP), tasks or not
        refresh_rollout_copy(t.rollout_model, t.model)
    results = evaluation.evaluate_ranks(t.rollout_model, t.tokenizer, t.test_tasks,
                                        evaluation.eval_settings(t.cfg.rollout), user=t.user)
    if t.ranks.rank == 0:
        evaluation.log_eval(t.run_dir, "grpo", n, results)
    return evaluation.eval_metrics(results)


def episode_metrics(episodes: list, scores: list, advantages: list, groups: list) -> dict:
    """Per-step statistics over the episodes of every rank; failed episodes count only in failed_* and end/*."""
    rows = [{"gym": e.gym, "reward": sum(e.turn_rewards), "failed": e.failed, "turns": len(e.turn_rewards),
             "tokens": int(sum(e.loss_mask)), "end": e.info.get("end_reason"), "error": e.info.get("error")}
            for e in episodes]
    by_group = {}
    for g, s in zip(groups, scores):
        by_group.setdefault(g, []).append(s)
    ok = [r for r in rows if not r["failed"]]
    # A group has no spread when its scores are equal, as rewards._normalise decides (np.std of 7 scores of 0.1 is
    # 1.4e-17, not 0, so such a group would not count)
    local = {"rows": rows, "scores": [(r["gym"], s) for r, s in zip(ok, scores)],
             "advs": [x for a in advantages for x in a],
             "zero_std": [float(max(v) == min(v)) for v in by_group.values()]}
    every = distributed.gather(local)
    rows, scores, advs, zero = ([x for r in every for x in r[key]] for key in ("rows", "scores", "advs", "zero_std"))
    ok = [r for r in rows if not r["failed"]]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    m = {"reward_mean": mean([r["reward"] for r in ok]), "score_mean": mean([s for _, s in scores]),
         "adv_mean": mean(advs), "adv_std": float(np.std(advs)) if advs else 0.0,
         "adv_abs_max": float(np.max(np.abs(advs))) if advs else 0.0, "frac_zero_std": mean(zero),
         "response_tokens_mean": mean([r["tokens"] for r in ok]), "turns_mean": mean([r["turns"] for r in ok]),
         "failed_episodes": len(rows) - len(ok), "episodes": len(rows)}
    for gym in sorted({r["gym"] for r in ok}):
        m[f"reward_mean/{gym}"] = mean([r["reward"] for r in ok if r["gym"] == gym])
        m[f"score_mean/{gym}"] = mean([s for g, s in scores if g == gym])
    for reason in sorted({r["end"] for r in rows}, key=str):
        m[f"end/{reason}"] = sum(r["end"] == reason for r in rows)
    failed = [r for r in rows if r["failed"]]
    for reason, count in sorted(failure_counts(failed).items()):
        m[f"failed/{reason}"] = count
    if failed:
        m["failed_example"] = failed[0]["error"]
    return m


def failure_counts(rows: list) -> dict:
    """{reason: failed episodes} (users.REASONS codes, or the rollout's env_timeout) of rows with an "error"."""
    counts = {}
    for r in rows:
        reason = failure_reason(r["error"])
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def user_where(t: Trainer) -> str:
    """The simulated user, as a message names it: the endpoint (URL and model) for http."""
    if t.cfg.user.backend == "http":
        return f"user endpoint {t.user.base_url}, model {t.user.model}"
    return f"{t.cfg.user.backend} user" + (f" {t.cfg.user.model}" if t.cfg.user.model else "")


class TooManyFailures(Exception):
    """A step in which more than --max_failed_frac of the episodes failed; the run stops before training on it."""


def check_failures(t: Trainer, n: int, episodes: list):
    """Raise TooManyFailures (on every rank) when more than `max_failed_frac` of step n's episodes, over all ranks,
    failed. Nothing of the step has been written or trained yet (stoppable_step makes sure a checkpoint holds the
    state before it)."""
    every = distributed.gather([{"error": e.info.get("error")} for e in episodes if e.failed] + [len(episodes)])
    failed = [row for rows in every for row in rows[:-1]]
    total = sum(rows[-1] for rows in every)
    if not failed or len(failed) <= t.cfg.max_failed_frac * total:
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(failure_counts(failed).items(), key=lambda kv: -kv[1]))
    raise TooManyFailures(
        f"step {n}: {len(failed)} of {total} episodes failed, more than --max_failed_frac {t.cfg.max_failed_frac:g} "
        f"({user_where(t)}): {reasons}; e.g. {(failed[0]['error'] or '')[:200]}.")


def logprob_metrics(batch: Batch, entropies: list) -> dict:
    """Over every generated token of every rank: the policy's entropy, and logprob_diff, the mean gap between
    the recomputed old log-probs and the sampler's (bf16, KV cache: expect ~1e-2 in bf16, ~1e-6 in fp32)."""
    sampled = [torch.tensor([lp for lp, m in zip(e.logprobs, e.loss_mask) if m]) for e in batch.episodes]
    gaps = torch.cat([(a - b).abs() for a, b in zip(batch.old_logprobs, sampled)] + [torch.zeros(0)])
    ent = torch.cat(entropies + [torch.zeros(0)])
    s = distributed.all_reduce_sums({"tokens": len(ent), "entropy": float(ent.sum()), "gap": float(gaps.sum())})
    return {"entropy": s["entropy"] / max(s["tokens"], 1.0), "logprob_diff": s["gap"] / max(s["tokens"], 1.0)}


def print_step(m: dict, t: Trainer):
    tqdm.write(f"step {m['step']:4d} | reward {m['reward_mean']:.3f} | score {m['score_mean']:.3f} | "
               f"zero-std groups {m['frac_zero_std']:.2f} | grad norm {m['grad_norm']:.3g} | "
               f"time gen {m['time_generate']:.1f}s user {m['time_user']:.1f}s "
               f"logprob {m['time_logprob']:.1f}s update {m['time_update']:.1f}s")
    for key in sorted(k for k in m if k.startswith("eval/") and not k.startswith("eval/valid_calls/")):
        tqdm.write(f"    {key:24s} {evaluation.fmt(m[key])}")
    if m["failed_episodes"] * 2 > m["episodes"]:  # a batch this biased is not worth much: say so where it is seen
        reasons = ", ".join(f"{k[len('failed/'):]} {v}" for k, v in m.items() if k.startswith("failed/"))
        tqdm.write(f"warning: step {m['step']}: {m['failed_episodes']} of {m['episodes']} episodes failed "
                   f"({user_where(t)}): {reasons}; e.g. {m['failed_example'][:300]}")


# ----------------------------------------------------------------------------------------------------------
# Set-up and the loop


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_up(cfg: Config, run_dir: Path, tasks: Tasks, ranks: distributed.Ranks, user_url: str | None) -> Trainer:
    """Everything before the first step: seeds, the user (`user_url`: the server started for the run, if any), the
    models (from the latest checkpoint on --resume), the optimizer; then config.json (on resume: the resume log,
    and the logs cut back to the checkpoint)."""
    rank, world, device = ranks
    ckpt = checkpoints.latest_checkpoint(run_dir) if cfg.resume else None
    seed_everything(cfg.seed + rank)
    if device.type == "cuda":  # fp32 matmuls (an fp32 run; the fp32 parts of a bf16 one) in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    sampler = TaskSampler(tasks.train, cfg.gyms or {g: 1.0 for g in tasks.train}, cfg.seed)
    user = users.from_config(dataclasses.replace(cfg.user, base_url=user_url) if user_url else cfg.user)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)  # on the CPU; a resume loads the checkpoint into it
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.dtype == "bfloat16"
    rollout_model = model
    if bf16 or cfg.fsdp:  # parameters cast on the CPU, buffers (RoPE's inv_freq) kept: models.rollout_copy
        rollout_model = rollout_copy(model, torch.bfloat16 if bf16 else torch.float32).to(device)
    if cfg.fsdp:  # each block goes to the device as it is sharded: the whole fp32 model never is on it at once
        distributed.shard(model, bf16)
    else:
        model.to(device)
    ref_model = None
    if cfg.loss.kl_coef > 0:  # loaded only when the KL term is on (off in the paper's recipe)
        ref_model, _ = load_model(cfg.model, seed=cfg.seed)
        ref_model.to(device).eval().requires_grad_(False)
    # fused: one kernel per step on CUDA instead of foreach's temporaries the size of the (sharded) parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    start = 0
    if ckpt:
        state = checkpoints.load_checkpoint(ckpt, model, optimizer, rank)
        for group in optimizer.param_groups:  # the checkpoint's values came back with it: an override must count
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        sampler.rng.setstate(state["sampler"])
        start = state["step"]
    if rank == 0:
        config = dataclasses.asdict(cfg) | {"out_dir": str(run_dir)}
        changes = checkpoints.start_run(run_dir, config, start if cfg.resume else None)
        n = sum(p.numel() for p in model.parameters())
        print(f"run folder {run_dir} | model {cfg.model} ({n:,} parameters) | {world} rank(s) on {device} | "
              f"gyms {sorted(sampler.pool)} | user {cfg.user.backend}")
        if cfg.resume:
            print(f"resumed from {ckpt.name if ckpt else 'the start (no checkpoint yet)'} at step {start}; "
                  f"changed by this command: {', '.join(changes) or 'nothing'} (see resume-log.jsonl)")
            if ckpt and state["world"] != world:
                print(f"note: {ckpt.name} was written by {state['world']} rank(s), this run has {world}: the weights "
                      "and optimizer state are resharded; ranks without a saved random state keep their seed")
    return Trainer(cfg=cfg, run_dir=run_dir, ranks=ranks, model=model, rollout_model=rollout_model, ref_model=ref_model,
                   tokenizer=tokenizer, optimizer=optimizer, sampler=sampler, test_tasks=tasks.test, user=user,
                   start=start)


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during a run; its message says where the run stopped and how to continue it. `code`: the
    exit status, 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str, code: int = 128 + signal.SIGINT):
        super().__init__(message)
        self.code = code


def stoppable_step(t: Trainer, n: int) -> dict:
    """step(t, n), or, when the first signal comes before its update (Stop) or its users failed too often
    (TooManyFailures), the step abandoned: the sampler and RNG states are put back as they were before it, that
    state is checkpointed unless the latest checkpoint holds it already, and the exception says so."""
    sampler, rng = t.sampler.rng.getstate(), checkpoints.rng_state()  # a signal meanwhile is held (step n - 1's)
    t.stop.holding = False  # only now, with the state to put back in hand, may a signal abandon step n
    if t.stop.signals:  # held in the last moments of step n - 1, after its check
        raise stop_after(t, n - 1)
    try:
        return step(t, n)
    except TooManyFailures as e:  # raised on every rank, before anything of step n was trained or written
        where = keep_state_before(t, n, sampler, rng)
        raise TooManyFailures(f"{e} The run stopped before training on this step; {where}. When the user is "
                              f"healthy again, {how_to_continue(t.run_dir)}") from None
    except KeyboardInterrupt:
        if t.stop.signals != 1 or t.stop.holding:  # not ours, or a second signal: stop at once
            raise
    t.stop.holding = True  # a second signal now stops the save below at once
    where = keep_state_before(t, n, sampler, rng)
    raise Interrupted(f"interrupted by {signal.Signals(t.stop.signum).name} during step {n} of {t.cfg.steps}: the step "
                      f"was abandoned before its update ({where}); {how_to_continue(t.run_dir)}", 128 + t.stop.signum)


def keep_state_before(t: Trainer, n: int, sampler, rng) -> str:
    """Put the sampler and RNG states back as they were before step n and make sure a checkpoint holds that state
    (the one after step n - 1), so that --resume redoes step n; says where it is."""
    t.sampler.rng.setstate(sampler)
    checkpoints.set_rng_state(rng)
    if n == 1:
        return "no checkpoint yet: it starts again from step 1"
    if checkpoints.step_of(checkpoints.latest_checkpoint(t.run_dir)) < n - 1:
        save(t, n - 1)
        return f"the state after step {n - 1} saved now as ckpt-{n - 1:06d}"
    return f"ckpt-{n - 1:06d} holds step {n - 1}"


def stop_after(t: Trainer, n: int) -> Interrupted:
    """What a signal held until step n finished raises; step n is checkpointed first if it was not due."""
    saved = " (saved now)"
    if checkpoints.step_of(checkpoints.latest_checkpoint(t.run_dir)) == n:
        saved = ""
    else:
        save(t, n)
    return Interrupted(f"interrupted by {signal.Signals(t.stop.signum).name} during step {n} of {t.cfg.steps}: the "
                       f"step was finished and checkpointed as ckpt-{n:06d}{saved}; {how_to_continue(t.run_dir)}",
                       128 + t.stop.signum)


def in_run_folder(cfg: Config, task_pool: dict | None, loop) -> Path:
    """The frame of a GRPO or SFT run in this process (as the whole run, or as one rank of it): every check before
    work, the ranks, the run folder claimed once (its lock released at the end), the user server started for the
    run, and Ctrl-C turned into one line saying where the run stopped and how to continue it. A rank started by
    `launch` finds the checks done, the folder claimed and the server running. `loop(cfg, run_dir, tasks, ranks,
    user_url, at)` does the work, keeping at["step"] and at["steps"] current."""
    launched = distributed.launched_run_dir()
    tasks = load_tasks(cfg, task_pool) if launched else check_before_work(cfg, task_pool)
    ranks = distributed.setup(cfg.device, cfg.dist_timeout_min)
    run_dir = Path(launched) if launched else distributed.on_rank0(lambda: claim_run_folder(cfg))
    at = {}
    try:
        if launched:  # the launching process started it
            server = nullcontext(os.environ.get(distributed.USER_URL_ENV))
        else:
            server = serve_user(cfg, run_dir, plan_ranks(cfg).server_gpus)
        with server as user_url:
            loop(cfg, run_dir, tasks, ranks, user_url, at)
    except KeyboardInterrupt:
        ckpt = checkpoints.latest_checkpoint(run_dir)
        if "step" not in at:
            where = "interrupted while setting up"
        else:
            where = f"interrupted during step {at['step']} of {at['steps']} (" + (
                f"last checkpoint {ckpt.name}" if ckpt else "no checkpoint yet: it starts again from step 1") + ")"
        raise Interrupted(f"{where}; {how_to_continue(run_dir)}") from None
    finally:
        if ranks.rank == 0 and not launched:
            checkpoints.release(run_dir)
    return run_dir


def train(cfg: Config, task_pool: dict | None = None) -> Path:
    """Run `cfg.steps` GRPO steps (or continue a run); returns the run folder. `task_pool` ({gym: [task]})
    replaces the training data files, for tests with toy gyms."""
    def loop(cfg, run_dir, tasks, ranks, user_url, at):
        t = set_up(cfg, run_dir, tasks, ranks, user_url)
        at["steps"] = cfg.steps
        bar = tqdm(range(t.start + 1, cfg.steps + 1), initial=t.start, total=cfg.steps, desc="steps",
                   disable=ranks.rank != 0)
        one_process = ranks.world == 1 and not distributed.launched_run_dir() and \
            threading.current_thread() is threading.main_thread()
        with t.stop.installed(one_process):
            for n in bar:
                at["step"] = n
                m = stoppable_step(t, n)
                if ranks.rank == 0:
                    print_step(m, t)
                if t.stop.signals:
                    raise stop_after(t, n)
            if t.start < cfg.steps or not (run_dir / "final").exists():
                export(t, "final")

    return in_run_folder(cfg, task_pool, loop)


def run_sft(cfg: Config, task_pool: dict | None = None) -> Path:
    """`--algo sft`: the SFT cold start (sft.run) in a run folder of its own; returns the folder."""
    return in_run_folder(cfg, task_pool, sft.run)


def claim_run_folder(cfg: Config) -> Path:
    """The run folder, claimed (locked) for this process: --out_dir, or runs/<timestamp>."""
    path = Path(cfg.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    note = checkpoints.open_run(path, resume=bool(cfg.resume))
    if note:
        print(note)
    return path


def serve_user(cfg: Config, run_dir: Path, gpus: list):
    """users.serve for this run: on `gpus`, its output in the run folder, and without the allocator setting train.py
    makes for itself (main): the server's memory is its own business."""
    drop = {"PYTORCH_CUDA_ALLOC_CONF": None} if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == ALLOC_CONF else {}
    return users.serve(cfg.user, run_dir / "user-server.log", gpus, env=drop)


def how_to_continue(run_dir: Path) -> str:
    return f"continue with: python train.py --resume {run_dir}" if (run_dir / "config.json").exists() else \
        "nothing was written"


def launch(cfg: Config, argv: list[str], plan: distributed.Plan, entry: str) -> int:
    """The launching process of a run of `plan.nproc` ranks: check everything once, claim the run folder, start the
    user server, then run `python entry argv` as the ranks (distributed.launch, torch.distributed.run's code) on
    the training GPUs, and wait. Returns the ranks' exit status; Ctrl-C or SIGTERM stops them all and the server,
    and raises Interrupted with the one line that says how to continue."""
    check_before_work(cfg, launching=True)
    run_dir = claim_run_folder(cfg)
    try:
        with serve_user(cfg, run_dir, plan.server_gpus) as user_url:
            env = {distributed.RUN_DIR_ENV: str(run_dir), **({distributed.USER_URL_ENV: user_url} if user_url else {}),
                   **({"CUDA_VISIBLE_DEVICES": ",".join(plan.train_gpus)} if plan.train_gpus else {})}
            print(f"starting {plan.nproc} rank(s)" + (f" on GPUs {','.join(plan.train_gpus)}" if plan.train_gpus
                                                       else " on the CPU") + " (torch.distributed.run)", flush=True)
            return distributed.launch(entry, argv, plan.nproc, env)
    except KeyboardInterrupt:
        raise Interrupted(stopped_line(run_dir, cfg.steps)) from None
    finally:
        checkpoints.release(run_dir)


def stopped_line(run_dir: Path, steps: int) -> str:
    """What the launching process says when Ctrl-C stopped its ranks (they say nothing: one of them may be stuck in
    a collective): the last step on disk, the last checkpoint, how to continue."""
    if not (run_dir / "config.json").exists():
        return "interrupted while setting up; nothing was written"
    done, metrics = 0, run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            done = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line torn by the interruption
            pass
    ckpt = checkpoints.latest_checkpoint(run_dir)
    return f"interrupted after step {done} of {steps} (" + (
        f"last checkpoint {ckpt.name}" if ckpt else "no checkpoint yet: it starts again from step 1") + \
        f"); {how_to_continue(run_dir)}"


# ----------------------------------------------------------------------------------------------------------
# The recipe: the paper's pipeline in one command


def recipe(cfg: Config, task_pool: dict | None = None) -> Path:
    """Evaluate `cfg.model` -> SFT (on --sft_data, or on expert episodes of the training gyms) -> evaluate ->
    GRPO from the SFT model -> evaluate, then print the table of the three (per gym: score and valid-call rate).

    RUN/evals.jsonl gets one line per evaluation ({"phase": "untrained" | "sft" | "grpo", "step", "avg",
    "per_gym"}, GRPO's periodic ones included). The SFT phase is a run of its own in RUN/sft (its export RUN/sft/final
    is the GRPO phase's --model); the GRPO phase is the run in RUN itself (RUN/config.json, metrics.jsonl,
    checkpoints, RUN/final), so `--algo grpo --resume RUN` continues it. `--sft_steps 0` skips SFT: GRPO starts
    from `cfg.model`."""
    run_dir = Path(cfg.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if checkpoints.holds_run(run_dir) or (run_dir / "evals.jsonl").exists() or (run_dir / "sft").exists():
        raise ConfigError(f"--out_dir: {run_dir} already holds a run; choose another --out_dir")
    tasks = check_before_work(cfg, task_pool)
    rank, _, device = distributed.setup(cfg.device, cfg.dist_timeout_min)
    settings = evaluation.eval_settings(cfg.rollout)
    user = users.from_config(cfg.user)

    def evaluate_model(path: str, phase: str, step_n: int) -> dict:
        seed_everything(cfg.seed)
        model, tokenizer = load_model(path, seed=cfg.seed)
        results = evaluation.evaluate_ranks(model.to(device).eval(), tokenizer, tasks.test, settings, user=user)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            evaluation.log_eval(run_dir, phase, step_n, results)
            print(f"{phase} (step {step_n}): avg {evaluation.fmt(results['avg'])}", flush=True)
        return results

    evaluate_model(cfg.model, "untrained", 0)
    start = cfg.model
    if cfg.sft_steps != 0:
        sft_cfg = dataclasses.replace(cfg, algo="sft", out_dir=str(run_dir / "sft"), eval_every=0, save_every=0)
        sft_dir = run_sft(sft_cfg, task_pool)
        start = str(sft_dir / "final")
        evaluate_model(start, "sft", json.loads((sft_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"])
    grpo_cfg = dataclasses.replace(cfg, algo="grpo", model=start, out_dir=str(run_dir),
                                   eval_every=cfg.eval_every or cfg.steps)
    train(grpo_cfg, task_pool)
    if rank == 0:
        print_recipe_table(run_dir)
    return run_dir


def print_recipe_table(run_dir: Path):
    """The last evaluation of each phase, as the paper's table: score (valid-call rate) per gym, then Avg; then each
    phase's gain over the one before it, with its standard error over the test tasks (eval.gap)."""
    last = {}
    for line in (run_dir / "evals.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["phase"]] = rec
    rows = {f"{phase} (step {rec['step']})": rec for phase, rec in last.items()}
    print(f"\n{run_dir}/evals.jsonl: score (valid tool calls) per gym, greedy, test split")
    print(evaluation.runs_table(rows, valid=True))
    phases = list(last)
    for old, new in zip(phases, phases[1:]):  # the noise: a gap within ~2 standard errors is not a difference
        g = evaluation.gap(last[new], last[old])
        if g:
            print(f"{new} - {old}: {g[0]:+.3f} +- {evaluation.fmt(g[1])} (mean over {g[2]} test tasks +- its "
                  "standard error)")


def main(argv: list[str], entry: str = __file__):
    """The command line. `entry` is the script the ranks run when this process launches them (a test's own
    script registers a toy gym, then calls main)."""
    if set(argv) & set(HELP):
        print(help_text(__doc__, Config(), "or in a --config JSON file; the defaults of train.Config, and a command "
                        "that names no --config, --resume or --algo runs configs/demo.json", FIXED_KEYS))
        return  # before any set-up: no signal handler, no environment change
    transformers.utils.logging.disable_progress_bar()  # one tqdm bar per step is ours; no per-save bars
    # Read by torch when it first allocates on a GPU, so set before any CUDA work, and inherited by the ranks:
    # cached blocks grow in place rather than fragment as the KV cache and the micro-batches change size.
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    launching = "RANK" not in os.environ  # the process a person started (a rank of torchrun is not)
    report = distributed.launched_run_dir() is None  # ranks of launch() leave the messages to the launching process
    if launching:  # SIGTERM as Ctrl-C, so every `finally` runs: the user server is stopped, the lock released
        previous = signal.signal(signal.SIGTERM, interrupt)
    named = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if not named & {"--config", "--resume", "--algo"}:
        argv = ["--config", str(DEMO), *argv]  # the demo is what a command that names no recipe runs
    try:
        cfg = parse_config(argv)
        plan = plan_ranks(cfg) if launching else None
        if plan and plan.launch:
            if cfg.algo == "recipe":  # its phases are runs of their own, each in its own folder
                raise ConfigError("--algo recipe runs in one process; on several ranks run its phases as commands "
                                  "(--algo sft, then --algo grpo --model RUN/final, then eval.py), or use torchrun")
            code = launch(cfg, argv, plan, entry)
            if code:
                sys.exit(code)
            return
        {"grpo": train, "sft": run_sft, "recipe": recipe}[cfg.algo](cfg)
        distributed.teardown()
    except (ConfigError, DataError, sft.SFTDataError) as e:
        kind = "config" if isinstance(e, ConfigError) else "data"
        sys.exit(f"{kind} error: {e}" if os.environ.get("RANK", "0") == "0" else 1)  # every rank has the same line
    except users.UserError as e:  # the started user server died, never got healthy, or serves another model
        sys.exit(e.message if os.environ.get("RANK", "0") == "0" else 1)
    except TooManyFailures as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except (Interrupted, KeyboardInterrupt) as e:  # one line, not a traceback
        if report:
            print(str(e) or "interrupted before the run started; nothing was written", file=sys.stderr)
        distributed.exit_now(getattr(e, "code", 128 + signal.SIGINT))
    finally:
        if launching:
            signal.signal(signal.SIGTERM, previous)


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main(sys.argv[1:])
