"""Multi-turn GRPO for user-centric agents: the UserRL recipe (arXiv 2509.19736), written by hand in PyTorch.

    python train.py                                                     # offline demo: tiny model, scripted users, CPU
    python train.py --config configs/demo.json --steps 5 --lr 1e-5      # a named recipe plus overrides
    torchrun --nproc_per_node 8 train.py --config configs/userrl-qwen3-4b.json    # the paper's recipe, 8 GPUs
    python train.py --resume runs/20261125-120000 --steps 40            # continue a run where it stopped

One step, in the order the code runs it (paper section 4, and anchors.md section 0):
  sample tasks from the gym mixture -> roll out `group_size` episodes per task against the simulated user
  -> per episode: a trajectory score and per-turn credits from its turn rewards (rewards.py)
  -> group-normalised advantages, spread over the agent's tokens -> recompute the old log-probs (no grad)
  -> `ppo_epochs` passes of clipped-ratio updates over mini-batches, with the fused chunked log-prob (grpo.py).
Simplifications, each deliberate:
  - no critic, no KL and no entropy bonus by default (the paper's recipe; `--loss.kl_coef` turns KL on);
  - generation runs in-process with our own KV-cached batched sampler (rollout.py), not vLLM/SGLang;
  - data parallel = the same loop on every rank plus one all-reduce of the gradients per update (no DDP
    wrapper); `--fsdp true` shards parameters with FSDP2 for models that do not fit;
  - a group never spans ranks, so advantages need no communication; token counts for the loss are global.
"""
import copy
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import envs
import rewards
import users
from config import ConfigError, apply_args
from grpo import STATS, LossConfig, chunk_tokens, grpo_loss, loss_weights, token_logprobs  # noqa: F401  (train.token_logprobs is API)
from models import load_model  # noqa: F401  (part of this module's API: train.load_model)
from rollout import RolloutConfig, rollout, write_transcripts

# The paper trains on Travel, Turtle, Persuade, Function and Tau and holds out Intention, Telepathy and Search
# for evaluation (userrl-original.md section 1). The demo trains on every gym it has.
HELD_OUT = ("intention", "telepathy", "search")


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class UserConfig:
    backend: str = "scripted"
    """simulated user: scripted (offline rules), http (any OpenAI-compatible endpoint), hf (in-process model)"""
    model: str = ""
    """http: the served model name (e.g. Qwen/Qwen3-32B); hf: a hub id or local folder"""
    base_url: str = ""
    """http: e.g. http://localhost:8000/v1; empty means $OPENAI_BASE_URL"""
    api_key_env: str = "OPENAI_API_KEY"
    """http: the environment variable that holds the key (the key itself is never logged)"""
    temperature: float = 0.0
    """http: the original's simulated users and judges are greedy (the hf user always is)"""
    max_tokens: int = 2048
    """per reply (the original's setting)"""
    timeout: float = 60.0
    """http: seconds per request (the original's 10 s cuts off long replies from a busy local server)"""
    max_retries: int = 3
    """http: retries with exponential backoff on timeouts, connection errors, 429 and 5xx"""
    max_concurrency: int = 64
    """http: requests in flight at once, over all episodes of a rank"""
    extra_body: dict = field(default_factory=dict)
    """http: merged into every request, e.g. {"chat_template_kwargs": {"enable_thinking": false}} for Qwen3"""


@dataclass
class Config:
    # run
    model: str = "tiny"
    """policy: "tiny" (offline random model), a hub id such as Qwen/Qwen3-4B, or a local folder"""
    seed: int = 0
    """seeds the task sampler (same on every rank) and python/numpy/torch (offset by rank)"""
    out_dir: str = ""
    """run folder; empty means runs/<timestamp>"""
    resume: str = ""
    """a run folder to continue from its latest checkpoint (its config.json, then these overrides)"""
    steps: int = 3
    """GRPO steps to run in total (demo: 3; the paper ran about 280)"""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda"""
    dtype: str = "float32"
    """float32, or bfloat16: bf16 compute and a bf16 copy of the weights for rollouts, fp32 master weights"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state with FSDP2 (fully_shard per decoder block)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward (the paper's recipe turns it on)"""
    # data
    gyms: dict = field(default_factory=dict)
    """training mixture {gym: weight}; empty means every registered gym with weight 1 (the demo)"""
    eval_gyms: str = ",".join(HELD_OUT)
    """comma-separated gyms evaluated on their test split (greedy); gyms not registered are skipped"""
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
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=48))
    """sampling and episode limits; the demo caps a turn at 48 new tokens because the random tiny model
    rarely ends a turn by itself (the paper: no cap per turn, 8,192 response tokens per episode)"""
    user: UserConfig = field(default_factory=UserConfig)
    # logging and checkpoints
    save_every: int = 1
    """checkpoint every N steps (0 = never); the paper saves every step"""
    eval_every: int = 0
    """evaluate every N steps (0 = never; the paper: 5)"""
    transcripts: int = 2
    """episodes per step written to transcripts.jsonl"""


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
        cfg.out_dir = resume
    cfg = apply_args(cfg, argv)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Checks of values (types are checked on parsing); run before any model is loaded."""
    def check(ok, key, msg):
        if not ok:
            raise ConfigError(f"--{key}: {msg}")

    check(cfg.dtype in ("float32", "bfloat16"), "dtype", f"expected float32 or bfloat16, got {cfg.dtype!r}")
    check(cfg.device in ("auto", "cpu", "cuda"), "device", f"expected auto, cpu or cuda, got {cfg.device!r}")
    check(cfg.steps >= 0, "steps", f"must be >= 0, got {cfg.steps}")
    check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    check(cfg.rollout_tasks >= 0, "rollout_tasks", f"must be >= 0, got {cfg.rollout_tasks}")
    for key in ("batch_size", "group_size", "mini_batch_size", "micro_batch_size", "ppo_epochs"):
        check(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    check(cfg.batch_size % cfg.mini_batch_size == 0, "mini_batch_size",
          f"must divide batch_size ({cfg.batch_size}), got {cfg.mini_batch_size}")
    for gym, w in cfg.gyms.items():
        check(gym in envs.GYMS, "gyms", f"unknown gym {gym!r}; known: {sorted(envs.GYMS)}")
        check(isinstance(w, (int, float)) and w >= 0, "gyms", f"weight of {gym!r} must be a number >= 0, got {w!r}")
    check(not cfg.gyms or sum(cfg.gyms.values()) > 0, "gyms", "at least one weight must be > 0")
    check(cfg.gyms or not cfg.data_dir, "gyms", "name the gyms to train on when --data_dir points at the original "
          'files, e.g. {"travel": 925, "turtle": 423, "persuade": 378, "function": 200} (tau needs tau-bench)')
    check(cfg.score in rewards.SCORES, "score", f"unknown {cfg.score!r}; known: {sorted(rewards.SCORES)}")
    check(cfg.credit in rewards.CREDITS, "credit", f"unknown {cfg.credit!r}; known: {sorted(rewards.CREDITS)}")
    check(cfg.scheme in rewards.SCHEMES, "scheme", f"unknown {cfg.scheme!r}; known: {sorted(rewards.SCHEMES)}")
    check(cfg.user.backend in ("scripted", "http", "hf"), "user.backend", f"expected scripted, http or hf, got {cfg.user.backend!r}")
    check(cfg.user.backend == "scripted" or cfg.user.model, "user.model", f"the {cfg.user.backend} user needs a model")
    check(cfg.resume == "" or Path(cfg.resume).is_dir(), "resume", f"{cfg.resume} is not a folder")
    for key, cls in (("loss", LossConfig), ("rollout", RolloutConfig)):  # their own checks, in __post_init__
        try:
            cls(**dataclasses.asdict(getattr(cfg, key)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--{key}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Set-up: ranks, devices, seeds, models


def setup_distributed(cfg: Config):
    """(rank, world size, device). Under torchrun: NCCL on GPUs, gloo on CPU; otherwise one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def make_user(cfg: UserConfig):
    """None means the offline scripted user (envs.make_env builds it)."""
    if cfg.backend == "scripted":
        return None
    if cfg.backend == "hf":  # greedy, as the original's users
        return users.make_user("hf", model=cfg.model, max_new_tokens=cfg.max_tokens)
    return users.make_user("http", base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                           temperature=cfg.temperature, max_tokens=cfg.max_tokens, timeout=cfg.timeout,
                           max_retries=cfg.max_retries, max_concurrency=cfg.max_concurrency,
                           extra_body=cfg.extra_body)


def shard(model, cfg: Config):
    """FSDP2: one shard group per decoder block plus the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Our loss weights already divide by the GLOBAL token count, so gradients must be summed over ranks.
    for m in model.modules():
        if is_fsdp(m):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo (CPU) has no pre-scaled reductions
    return model


def sync_rollout_weights(rollout_model, model):
    """Copy the trained weights into the bf16 rollout copy, gathering each FSDP shard once per step."""
    with torch.no_grad():
        dst = dict(rollout_model.named_parameters())
        for name, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            dst[name].copy_(full)


# ----------------------------------------------------------------------------------------------------------
# Tasks


class TaskSampler:
    """Draws (gym, task) pairs from the weighted gym mixture. Seeded identically on every rank, so all ranks
    agree on the global batch; each rank then rolls out its own slice of it."""

    def __init__(self, weights: dict, data_dir: str, seed: int, pool: dict | None = None):
        self.pool = pool or {g: envs.load_tasks(g, "train", data_dir or None) for g, w in weights.items() if w > 0}
        self.gyms = sorted(self.pool)
        self.weights = [weights.get(g, 1.0) for g in self.gyms]
        self.rng = random.Random(seed)

    def sample(self, n: int) -> list[tuple[str, dict]]:
        gyms = self.rng.choices(self.gyms, weights=self.weights, k=n)
        return [(g, self.rng.choice(self.pool[g])) for g in gyms]


# ----------------------------------------------------------------------------------------------------------
# The GRPO update


def pack(episodes, pad_id: int, device):
    """Right-pad a list of episodes: ids, attention mask, and the (B, T-1) mask of positions whose NEXT token
    the policy generated. The attention mask and the loss mask are separate tensors on purpose."""
    T = max(len(e.ids) for e in episodes)
    ids = torch.full((len(episodes), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(episodes), T), dtype=torch.long)
    lmask = torch.zeros((len(episodes), T), dtype=torch.bool)
    for i, e in enumerate(episodes):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        lmask[i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    return ids.to(device), attn.to(device), lmask[:, 1:].to(device)


def hidden_states(model, ids, attn, bf16: bool):
    """Final (normed) hidden states of every position. The model's own forward is called, so FSDP gathers
    its shards, but only one position's logits are computed: the vocab projection happens in grpo.py, on
    loss positions only."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def head_weight(model):
    return model.get_output_embeddings().weight


def is_fsdp(model) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # what fully_shard adds to a module


def micro_slices(n: int, size: int, model) -> list[slice]:
    """Micro-batches of n items. Under FSDP every forward all-gathers shards, so every rank must run the same
    number of them: a rank with fewer items gets empty slices (a dummy forward) at the end."""
    slices = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    if is_fsdp(model):
        count = int(all_reduce(torch.tensor(len(slices)), dist.ReduceOp.MAX))
        slices += [slice(0, 0)] * (count - len(slices))
    return slices


def dummy_hidden(model, pad_id: int, device, bf16: bool):
    ids = torch.full((1, 2), pad_id, device=device)
    return hidden_states(model, ids, torch.ones_like(ids), bf16)


@torch.no_grad()
def recompute_logprobs(model, episodes, cfg: Config, pad_id: int, device) -> tuple[list, list]:
    """Log-probs and entropies of each episode's generated tokens under `model` with the training forward: the
    PPO ratio's denominator. Recomputed rather than taken from sampling so the ratio is exactly 1 before the
    first update even when sampling ran in bf16 with a KV cache (the two are compared as `logprob_diff`);
    the entropy comes from the same vocab pass."""
    out, ents = [], []
    bf16 = cfg.dtype == "bfloat16"
    for sl in micro_slices(len(episodes), cfg.micro_batch_size, model):
        if sl.start == sl.stop:
            dummy_hidden(model, pad_id, device, bf16)
            continue
        ids, attn, sel = pack(episodes[sl], pad_id, device)
        h = hidden_states(model, ids, attn, bf16)[:, :-1][sel]
        w = head_weight(model)
        lp, ent = token_logprobs(h, w, ids[:, 1:][sel], temperature=cfg.rollout.temperature,
                                 chunk_size=chunk_tokens(w.shape[0], cfg.loss.chunk_mb), return_entropy=True)
        counts = [int(s.sum()) for s in sel]
        out.extend(lp.float().cpu().split(counts))
        ents.extend(ent.float().cpu().split(counts))
    if is_fsdp(model):  # FSDP keeps the root's weights gathered after a forward that has no backward
        model.reshard()
    return out, ents


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks; the identity in one process. NCCL reduces on the GPU, gloo on the CPU."""
    if not dist.is_initialized():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev)
    dist.all_reduce(x, op=op)
    return x.to(t.device)


def update(model, optimizer, episodes, task_of, advs, old_lps, ref_lps, cfg: Config, pad_id: int, device,
           world: int) -> dict:
    """`ppo_epochs` passes over this rank's episodes, in `batch_size / mini_batch_size` optimizer updates each.

    Update k trains on the global batch's tasks [k*m, (k+1)*m) (m = mini_batch_size); tasks are dealt to ranks
    round-robin, so this rank holds m / world of them (local task index // (m / world) == k). The loss of each
    token is weighted with counts over ALL ranks (grpo.loss_weights), so summing the gradients of every
    micro-batch and rank gives the gradient of the whole mini-batch: N ranks make the same update as one
    process with the same global batch (tests/test_distributed.py).

    Episodes whose advantages are all 0 (every member of a zero-spread group) have a loss of exactly 0 when
    there is no KL term, so they are not run through the model at all; they still count in the token and
    sequence totals, so the update is the same as if they had been. The stats are over the trained tokens."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_rank = cfg.mini_batch_size // world
    n_updates = cfg.batch_size // cfg.mini_batch_size
    loss_cfg = dataclasses.replace(cfg.loss, temperature=cfg.rollout.temperature)  # ratio at sampling temperature
    sums = torch.zeros(3 + len(STATS), dtype=torch.float64)  # tokens, grad norms, losses, token-weighted stats
    for _ in range(cfg.ppo_epochs):
        for k in range(n_updates):
            idx = [i for i, t in enumerate(task_of) if t // per_rank == k]
            totals = all_reduce(torch.tensor([sum(sum(episodes[i].loss_mask) for i in idx), len(idx)],
                                             dtype=torch.float64)).tolist()
            idx = [i for i in idx if has_gradient(advs[i], loss_cfg)]
            sums += mini_batch_update(model, optimizer, params, [episodes[i] for i in idx], [advs[i] for i in idx],
                                      [old_lps[i] for i in idx], None if ref_lps is None else [ref_lps[i] for i in idx],
                                      totals, loss_cfg, cfg, pad_id, device)
    sums = all_reduce(sums)
    out = {key: float(sums[3 + j] / max(float(sums[0]), 1.0)) for j, key in enumerate(STATS)}
    out["grad_norm"] = float(sums[1]) / (world * cfg.ppo_epochs * n_updates)  # every rank added the same norm
    out["loss"] = float(sums[2]) / (cfg.ppo_epochs * n_updates)  # each rank's share of the mini-batch loss
    return out


def has_gradient(advantages: torch.Tensor, loss_cfg: LossConfig) -> bool:
    """Whether an episode's loss can have a non-zero gradient: some advantage is non-zero, or the KL term is on."""
    return loss_cfg.kl_coef > 0 or bool(advantages.any())


def mini_batch_update(model, optimizer, params, eps, advs, old_lps, ref_lps, totals, loss_cfg, cfg: Config, pad_id,
                      device):
    """One optimizer update over this rank's share of a mini-batch, accumulated over micro-batches. `totals`:
    the mini-batch's (tokens, sequences) over all ranks, for the loss weights."""
    bf16 = cfg.dtype == "bfloat16"
    lens = [int(sum(e.loss_mask)) for e in eps]
    n_tokens, n_seqs = totals
    slices = micro_slices(len(eps), cfg.micro_batch_size, model)
    sums = torch.zeros(3 + len(STATS), dtype=torch.float64)
    for k, sl in enumerate(slices):
        if is_fsdp(model):  # accumulate locally, reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(k == len(slices) - 1)
        if sl.start == sl.stop:
            (dummy_hidden(model, pad_id, device, bf16).sum() * 0).backward()
            continue
        ids, attn, sel = pack(eps[sl], pad_id, device)
        h = hidden_states(model, ids, attn, bf16)[:, :-1][sel]
        w = loss_weights(lens[sl], loss_cfg.agg, int(n_tokens), int(n_seqs), loss_cfg.norm_len)
        cat = lambda xs: torch.cat(xs[sl]).to(device)  # noqa: E731
        loss, stats = grpo_loss(h, head_weight(model), ids[:, 1:][sel], cat(old_lps), cat(advs), w.to(device),
                                loss_cfg, ref_logprobs=None if ref_lps is None else cat(ref_lps))
        loss.backward()
        n = float(sel.sum())
        sums[0] += n
        sums[2] += loss.item()
        sums[3:] += torch.tensor([float(stats[key]) * n for key in STATS], dtype=torch.float64)
    for p in params:  # a rank (or a mini-batch) with nothing to train still takes its AdamW step, on zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not is_fsdp(model) and dist.is_initialized():  # data parallel: one all-reduce (a sum) of every gradient
        grads = [p.grad for p in params]
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    sums[1] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, sampler, rank: int):
    """`save_pretrained` folder + tokenizer + optimizer + sampler + per-rank RNG, written to a temporary
    folder and renamed, so an interrupted save never leaves a broken latest checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    final, tmp = run_dir / f"ckpt-{step:06d}", run_dir / f".tmp-ckpt-{step:06d}"
    if rank == 0:
        model.save_pretrained(tmp, state_dict=msd)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": osd, "sampler": sampler.rng.getstate()}, tmp / "trainer_state.pt")
    if dist.is_initialized():
        dist.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp.rename(final)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(run_dir.glob("ckpt-*"))
    return ckpts[-1] if ckpts else None


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, tokenizer, cfg: Config, user, rank: int, world: int) -> dict:
    """Greedy episodes on the held-out test tasks, without the reward shown to the agent (the paper's eval
    setting). Per gym: the mean episode score; overall: the item-weighted mean (as the paper's Avg)."""
    names = [g for g in cfg.eval_gyms.split(",") if g in envs.GYMS]
    tasks = [(g, t) for g in names for t in envs.load_tasks(g, "test", cfg.data_dir or None)[: cfg.eval_tasks or None]]
    eval_cfg = dataclasses.replace(cfg.rollout, greedy=True, show_reward=False, eval_mode=True)
    eps = rollout(model, tokenizer, tasks[rank::world], 1, eval_cfg, user=user)
    local = [(e.gym, e.info["score"]) for e in eps if not e.failed]
    allr = [local]
    if dist.is_initialized():
        allr = [None] * world
        dist.all_gather_object(allr, local)
    per = {}
    for gym, s in (x for r in allr for x in r):
        per.setdefault(gym, []).append(s)
    out = {f"eval/{g}": float(np.mean(v)) for g, v in sorted(per.items())}
    n = sum(len(v) for v in per.values())
    out["eval/avg"] = float(sum(sum(v) for v in per.values()) / max(n, 1))
    return out


# ----------------------------------------------------------------------------------------------------------
# Metrics


def episode_metrics(episodes, scores: list[float], advs: list[float], group_ids: list, world: int) -> dict:
    """Per-step statistics over the episodes of every rank."""
    rows = [(e.gym, sum(e.turn_rewards), e.failed, len(e.turn_rewards), int(sum(e.loss_mask)), e.info.get("end_reason"))
            for e in episodes]
    groups = {}
    for g, s in zip(group_ids, scores):
        groups.setdefault(g, []).append(s)
    local = {"rows": rows, "scores": list(zip([e.gym for e in episodes if not e.failed], scores)), "advs": advs,
             "zero_std": [float(np.std(v) == 0) for v in groups.values()]}
    allr = [local]
    if dist.is_initialized():
        allr = [None] * world
        dist.all_gather_object(allr, local)
    rows = [x for r in allr for x in r["rows"]]
    ok = [r for r in rows if not r[2]]
    scores = [x for r in allr for x in r["scores"]]
    advs = [x for r in allr for x in r["advs"]]
    zero = [x for r in allr for x in r["zero_std"]]
    m = {"reward_mean": float(np.mean([r[1] for r in ok])) if ok else 0.0,
         "score_mean": float(np.mean([s for _, s in scores])) if scores else 0.0,
         "adv_mean": float(np.mean(advs)) if advs else 0.0, "adv_std": float(np.std(advs)) if advs else 0.0,
         "adv_abs_max": float(np.max(np.abs(advs))) if advs else 0.0,
         "frac_zero_std": float(np.mean(zero)) if zero else 0.0,
         "response_tokens_mean": float(np.mean([r[4] for r in ok])) if ok else 0.0,
         "turns_mean": float(np.mean([r[3] for r in ok])) if ok else 0.0,
         "failed_episodes": sum(r[2] for r in rows)}
    for gym in sorted({r[0] for r in ok}):
        m[f"reward_mean/{gym}"] = float(np.mean([r[1] for r in ok if r[0] == gym]))
        m[f"score_mean/{gym}"] = float(np.mean([s for g, s in scores if g == gym]))
    for reason in sorted({r[5] for r in rows}):
        m[f"end/{reason}"] = sum(r[5] == reason for r in rows)
    return m


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, task_pool: dict | None = None) -> Path:
    """Run `cfg.steps` GRPO steps (or continue a run); returns the run folder. `task_pool` ({gym: [task]})
    replaces the data files, for tests with toy gyms."""
    rank, world, device = setup_distributed(cfg)
    if cfg.batch_size % world or cfg.mini_batch_size % world:
        raise ConfigError(f"--batch_size ({cfg.batch_size}) and --mini_batch_size ({cfg.mini_batch_size}) must be "
                          f"multiples of the number of ranks ({world}): a group never spans ranks")
    run_dir = Path(cfg.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint yet")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        print(json.dumps(dataclasses.asdict(cfg)))
    seed_everything(cfg.seed + rank)
    weights = cfg.gyms or {g: 1.0 for g in (task_pool or envs.GYMS)}
    sampler = TaskSampler(weights, cfg.data_dir, cfg.seed, pool=task_pool)
    user = make_user(cfg.user)

    model, tokenizer = load_model(str(ckpt) if ckpt else cfg.model, seed=cfg.seed)
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.dtype == "bfloat16"
    # Rollouts decode token by token: they get their own full, unsharded copy of the weights (bf16 when training
    # in bf16; under FSDP always, since a sharded model would all-gather every layer for every token).
    rollout_model = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval() if bf16 or cfg.fsdp else None
    if cfg.fsdp:
        shard(model, cfg)
    ref_model = None
    if cfg.loss.kl_coef > 0:  # loaded only when the KL term is on (off in the paper's recipe)
        ref_model, _ = load_model(cfg.model, seed=cfg.seed)
        ref_model.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if ckpt:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sampler.rng.setstate(state["sampler"])
        set_rng_state(torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=False))
        start = state["step"]
        if rank == 0:  # drop metrics of steps after the checkpoint: they are about to be redone
            mpath = run_dir / "metrics.jsonl"
            if mpath.exists():
                lines = [ln for ln in mpath.read_text().splitlines() if json.loads(ln).get("step", 0) <= start]
                mpath.write_text("".join(ln + "\n" for ln in lines))
            print(f"resumed {run_dir} from {ckpt.name} (step {start})")
    pad_id = tokenizer.pad_token_id
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"run folder {run_dir} | model {cfg.model} ({n:,} parameters) | {world} rank(s) on {device} | "
              f"gyms {sorted(sampler.pool)} | user {cfg.user.backend}")

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="steps", disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        # 1. sample the global batch (identical on every rank) and take this rank's slice of it
        tasks = sampler.sample(cfg.batch_size)[rank::world]
        # 2. roll out a group of episodes per task against the simulated user
        if rollout_model is not None:
            sync_rollout_weights(rollout_model, model)
        model.eval()
        episodes, time_user, chunk = [], 0.0, cfg.rollout_tasks or len(tasks)
        for i in range(0, len(tasks), chunk):  # a few tasks at a time bounds the KV cache's memory
            stats = {}
            episodes += rollout(rollout_model or model, tokenizer, tasks[i:i + chunk], cfg.group_size, cfg.rollout,
                                user=user, stats=stats)
            time_user += stats["time_env"]
        model.train()
        t_roll = time.perf_counter() - t0
        # 3. scores and advantages per group (a group never spans ranks); failed episodes are left out
        group_of = [i // cfg.group_size for i in range(len(episodes))]  # = the local task index
        keep = [i for i, e in enumerate(episodes) if not e.failed]
        eps = [episodes[i] for i in keep]
        turn_lens = [[sum(e.loss_mask[a:b]) for a, b in e.turn_spans] for e in eps]
        token_advs, traj_advs = rewards.compute_advantages(
            [e.turn_rewards for e in eps], turn_lens, [group_of[i] for i in keep], score=cfg.score,
            credit=cfg.credit, scheme=cfg.scheme, gamma=cfg.gamma, use_std=cfg.use_std, lam=cfg.lam)
        scores = [rewards.trajectory_score(e.turn_rewards, cfg.score, cfg.gamma) for e in eps]
        advs = [torch.tensor(a, dtype=torch.float32) for a in token_advs]
        # 4. old (and reference) log-probs, recomputed with the training forward
        t1 = time.perf_counter()
        old, ent = recompute_logprobs(model, eps, cfg, pad_id, device)
        ref = recompute_logprobs(ref_model, eps, cfg, pad_id, device)[0] if ref_model is not None else None
        sampled = [torch.tensor([lp for lp, m in zip(e.logprobs, e.loss_mask) if m]) for e in eps]
        gaps = torch.cat([(a - b).abs() for a, b in zip(old, sampled)] + [torch.zeros(0)])
        ent = torch.cat(ent + [torch.zeros(0)])
        n_tok, ent_sum, gap_sum = all_reduce(torch.tensor([len(ent), float(ent.sum()), float(gaps.sum())],
                                                          dtype=torch.float64)).tolist()
        t2 = time.perf_counter()
        # 5. clipped-ratio updates
        upd = update(model, optimizer, eps, [group_of[i] for i in keep], advs, old, ref, cfg, pad_id, device, world)
        t3 = time.perf_counter()
        # 6. log, transcripts, checkpoint, evaluation
        m = {"step": step + 1, **episode_metrics(episodes, scores, [x for a in token_advs for x in a], [group_of[i] for i in keep], world),
             **upd, "entropy": ent_sum / max(n_tok, 1.0), "logprob_diff": gap_sum / max(n_tok, 1.0), "time_generate": t_roll - time_user,
             "time_user": time_user, "time_logprob": t2 - t1, "time_update": t3 - t2}
        if cfg.transcripts and rank == 0:
            write_transcripts(run_dir / "transcripts.jsonl", episodes[: cfg.transcripts], tokenizer, append=True)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, sampler, rank)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            if rollout_model is not None:
                sync_rollout_weights(rollout_model, model)
            m.update(evaluate(rollout_model or model, tokenizer, cfg, user, rank, world))
        m["time_step"] = time.perf_counter() - t0
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            tqdm.write(f"step {step + 1:4d} | reward {m['reward_mean']:.3f} | score {m['score_mean']:.3f} | "
                       f"zero-std groups {m['frac_zero_std']:.2f} | grad norm {m['grad_norm']:.3g} | "
                       f"time gen {m['time_generate']:.1f}s user {m['time_user']:.1f}s "
                       f"logprob {m['time_logprob']:.1f}s update {m['time_update']:.1f}s")
            for key in sorted(k for k in m if k.startswith("eval/")):
                tqdm.write(f"    {key:24s} {m[key]:.3f}")
    return run_dir


def main(argv: list[str]):
    transformers.utils.logging.disable_progress_bar()  # one tqdm bar per step is ours; no per-save bars
    try:
        cfg = parse_config(argv)
        run_dir = train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg.model == "tiny" and cfg.user.backend == "scripted" and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"\nDemo finished: metrics in {run_dir}/metrics.jsonl, transcripts in {run_dir}/transcripts.jsonl.\n"
              "The tiny model is random, so its rewards mean nothing yet. The paper's recipe (8 GPUs, a simulated "
              "user behind an OpenAI-compatible endpoint):\n"
              "  torchrun --nproc_per_node 8 train.py --config configs/userrl-qwen3-4b.json")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
