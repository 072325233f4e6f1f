"""The GRPO objective and the log-prob over a large vocabulary, without ever holding (tokens x vocab) logits.

UserRL (arXiv 2509.19736, section 3) trains with verl's PPO-clip loss on group-normalised advantages:
clip 0.2/0.2, dual clip 3.0, token-mean aggregation, no KL. With a Qwen vocabulary (151,936) the logits
are the biggest tensor of the whole step (8 rollouts x 8,192 tokens: 40 GB in fp32), so:

- `token_logprobs(hidden, weight, targets)`: per-token log-probs (and entropy) for rollout-time and
  reference passes. A custom autograd function: per chunk of tokens it forms the fp32 logits, keeps only
  the logsumexp, and the backward recomputes the chunk and applies the closed form (onehot - softmax).
- `grpo_loss(hidden, weight, targets, old_logprobs, advantages, weights, cfg)`: the training path. Each
  token's loss depends on its own log-prob only, so per chunk we already know the upstream gradient when
  the chunk's softmax is in hand: the gradients for hidden and weight are formed in the forward pass, no
  chunk is recomputed, and the only tokens x vocab tensors are two chunk-sized tiles that every chunk
  reuses. loss.backward() then only hands the gradients on (scaled by the incoming gradient) to the
  decoder and to the lm_head / tied embedding.
- `naive_grpo_loss`: the same loss from log_softmax + gather, the readable reference for tests and bench.
- `loss_weights`: per-token weights w_t so that loss = sum_t w_t l_t; token-mean over the global token
  count makes micro-batched, multi-rank gradient accumulation exact.

Both chunked paths expect `hidden` to hold only the positions whose loss mask is 1: the trainer selects
them before the vocab projection, so prompt, user and env tokens never reach the lm_head. Inputs may be
bf16/fp16. What runs in which precision (see _logits and _project_back):
  logits      CUDA (the kernel is checked once per device type by fp32_out_matmuls): a bf16 matmul that writes
              fp32 (torch.mm(..., out_dtype=torch.float32)), so no logit is rounded; CPU (no such kernel in
              torch 2.13): a bf16 matmul whose bf16 output is copied to fp32, so each logit is rounded to bf16
              first (spacing 0.125 for |logit| in [16, 32)).
  softmax, loss: fp32 everywhere; entropy too, but for its sum of p z', a batched matmul (no temporary tile),
              which runs in TF32 (inputs rounded to 10 mantissa bits) on CUDA where train.py allows it: a logged figure.
  d hidden    the fp32 d logits tile rounded to the input dtype, one matmul, the result in the input dtype.
  d weight    summed over chunks into one fp32 buffer, cast to the weight's dtype once at the end. CUDA: the
              bf16 d logits times bf16 hidden, added into the buffer in fp32 (addmm with out_dtype, when the
              device passes fp32_out_matmuls' check); CPU: an fp32 matmul.
Chunks are sized from a memory budget per device (CHUNK_MB: CPU caches want small tiles, a GPU big ones).

    python bench/logprob.py --quick          # memory and time of the three paths against naive
"""
import functools
from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
STATS = ("clip_frac", "approx_kl", "entropy", "kl", "logprob")
# LossConfig.chunk_mb = 0 picks the budget of one tokens x vocab fp32 tile by device type (MiB).
# cpu 96: 165 tokens at vocab 151,936. The training path holds two such tiles plus the fp32 weight gradient
#   (vocab x hidden x 4 bytes, which any backward needs); 96 keeps the pair at a third of that gradient at
#   Qwen shapes (measured: 8.7x less peak memory than naive at 4,096 tokens, the bench's CPU shape; 128 gave
#   8.1x) while each chunk keeps 100+ rows, enough for the CPU matmuls to run near full speed (0.74x naive's
#   time).
# other (cuda) 1024: 1,766 tokens at vocab 151,936. One chunk issues about 75 small kernels (softmax, the loss
#   and its autograd on (tokens,) vectors, the scatter), ~0.5-1 ms of host time, against ~10 ms of GPU work at
#   1,766 tokens (3 matmuls of 2 x 1,766 x hidden x vocab flops, ~16 passes over the tile); at 165 tokens the
#   GPU work (~1 ms, with small-m matmuls below peak) no longer hides the launches. Memory: two 1 GiB tiles plus
#   the bf16 copy of d logits (0.5 GiB) = 2.5 GiB, next to a 1.45 GiB fp32 weight gradient at Qwen3-4B.
#   Estimated from the shapes, not measured: bench/gpu_smoke.py times 256, 1,024 and 4,096 MiB.
CHUNK_MB = {"cpu": 96.0, "other": 1024.0}


@dataclass
class LossConfig:
    clip_low: float = 0.2
    """PPO clip below 1: with A < 0 the ratio stops pushing once it is under 1 - clip_low"""
    clip_high: float = 0.2
    """PPO clip above 1: with A > 0 the ratio stops pushing once it is over 1 + clip_high (DAPO: 0.28)"""
    dual_clip: float = 3.0
    """dual clip c > 1: with A < 0 the loss is capped at -A*c, so one stale token with a huge ratio cannot
    dominate the batch (verl's default, used by the paper); 0 disables"""
    kl_coef: float = 0.0
    """weight of the k3 KL to the reference model; 0 as in the paper's recipe (no reference pass needed)"""
    temperature: float = 1.0
    """logits are divided by this before the softmax; must equal the rollout's sampling temperature so the
    ratio compares the same distributions"""
    chunk_mb: float = 0
    """memory budget in MiB for one chunk's tokens x vocab fp32 tile; the training path holds two such tiles
    (shifted logits and their exp, for the entropy). 0 = by the device of the hidden states (CHUNK_MB): 96 on
    CPU (165 tokens at vocab 151,936), 1,024 on a GPU (1,766 tokens)"""
    agg: str = "token-mean"
    """loss aggregation, one of AGG_MODES (see loss_weights); token-mean is the paper's"""
    norm_len: int = 8192
    """the constant divisor of seq-mean-token-sum-norm (Dr. GRPO): the max response length"""

    def __post_init__(self):
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg: unknown mode {self.agg!r}; known: {', '.join(AGG_MODES)}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_mb < 0:
            raise ValueError(f"chunk_mb must be >= 0 (0 = by device), got {self.chunk_mb}")
        if self.norm_len <= 0:
            raise ValueError(f"norm_len must be > 0, got {self.norm_len}")


def chunk_budget_mb(chunk_mb: float, device=None) -> float:
    """The tile budget in MiB: chunk_mb itself, or when it is 0 the default of the device's type (CHUNK_MB;
    device None means the CPU)."""
    if chunk_mb:
        return chunk_mb
    kind = torch.device(device).type if device is not None else "cpu"
    return CHUNK_MB["cpu" if kind == "cpu" else "other"]


def chunk_tokens(vocab: int, chunk_mb: float, device=None) -> int:
    """Tokens per chunk so that one tokens x vocab fp32 tile fits in chunk_mb MiB (0: the device's default)."""
    return max(1, int(chunk_budget_mb(chunk_mb, device) * 2 ** 20) // (4 * vocab))


# ----------------------------------------------------------------------------------------------------------
# The objective, per token (plain autograd on (N,) tensors: the readable definition both paths use)


def policy_loss(logp, old_logprobs, advantages, cfg: LossConfig, ref_logprobs=None):
    """Per-token loss l_t and per-token diagnostics, all shaped like logp.

    PPO clip: l = max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), r = exp(logp - old); dual clip caps l at
    -A c when A < 0; plus kl_coef * k3(ref || policy), k3 = e^(ref-logp) - (ref-logp) - 1. Log-ratios are
    clamped to +-20 so one stale token cannot overflow exp (its gradient is then 0, as for a clipped token).
    """
    log_ratio = (logp - old_logprobs).clamp(-20, 20)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    cut = clipped > unclipped                      # the clip, not the ratio, sets the loss: no gradient
    if cfg.dual_clip:
        cap = -advantages * cfg.dual_clip
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        cut = cut | capped
    info = {"clipped": cut.detach(),
            # k3 estimate of KL(old || policy) from the rollout's own samples: >= 0, low variance
            "approx_kl": (ratio - 1 - log_ratio).detach()}
    if ref_logprobs is not None:
        d = (ref_logprobs - logp).clamp(-20, 20)
        kl = (d.exp() - d - 1).clamp(max=10)  # verl's low_var_kl bounds k3 to 10: a token far off the reference
        # (its log-ratio of 20 gives k3 = 5e8) would otherwise swamp the policy loss; past 10 it has no gradient
        info["kl"] = kl.detach()
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl
    elif cfg.kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs of the same tokens)")
    return loss, info


def _stat_sums(logp, entropy, info) -> torch.Tensor:
    """Sums over tokens, in STATS order (divided by the token count at the end)."""
    zero = logp.new_zeros(())
    return torch.stack([info["clipped"].float().sum(), info["approx_kl"].sum(), entropy.sum(),
                        info["kl"].sum() if "kl" in info else zero, logp.detach().sum()])


def _stats(sums: torch.Tensor, n: int) -> dict:
    """Means over this call's tokens, as 0-dim fp32 tensors (no device sync; .item() when logging):
    clip_frac (tokens whose gradient the clip or dual clip cut), approx_kl (k3, vs the rollout policy),
    entropy (of the policy at `temperature`), kl (k3 vs the reference; 0 without one), logprob."""
    means = sums / max(n, 1)
    return {name: means[i] for i, name in enumerate(STATS)}


# ----------------------------------------------------------------------------------------------------------
# One chunk of the vocab projection


def _tiles(rows: int, vocab: int, count: int, device) -> list:
    """`count` fp32 (rows x vocab) tiles, allocated once per call and reused by every chunk: on CPU a fresh
    large allocation is page-faulted in on every use, which costs more than the chunk's exp."""
    return [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(count)]


@functools.cache
def fp32_out_matmuls(device_type: str) -> dict:
    """Which fp32-output matmuls for bf16 inputs this device type runs correctly, tried once on 2 x 2 matrices:
      mm     torch.mm(a, b, out_dtype=torch.float32, out=z): the product of bf16 matrices written in fp32
      addmm  torch.addmm(c, a, b, out_dtype=torch.float32, out=c) with c in fp32: bf16 products added into an
             fp32 buffer, the buffer itself never rounded (checked with c = 1/3, which bf16 cannot hold)
    torch 2.13 has CUDA kernels for these overloads and none on the CPU (NotImplementedError there); whether
    the CUDA addmm accepts an fp32 `c` has varied between versions, hence the check rather than a version test."""
    ok = {"mm": False, "addmm": False}
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device_type)
        b = a.to(torch.bfloat16)
        ok["mm"] = torch.equal(torch.mm(b, b, out_dtype=torch.float32, out=torch.empty_like(a)), a @ a)
        c = torch.full((2, 2), 1 / 3, device=device_type)
        want = c + a @ a
        torch.addmm(c, b, b, out_dtype=torch.float32, out=c)
        ok["addmm"] = c.dtype == torch.float32 and bool((c - want).abs().max() < 1e-5)
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return ok


def _logits(out, h, weight):
    """out <- h W^T as fp32 logits, in the fp32 tile `out`.

    fp32 inputs: an fp32 matmul (TF32 on CUDA when torch.backends.cuda.matmul.allow_tf32 is set).
    bf16/fp16 inputs on a device with an fp32-output matmul (CUDA): the matmul writes fp32 straight into the
    tile, so the logits carry fp32 accumulation and no rounding. Elsewhere (the CPU): the matmul's output in
    the input dtype, copied into the tile: each logit rounded to bf16 (up to 0.06 nats at |logit| in [16, 32)),
    as a plain `(h @ W.t()).float()` would."""
    if weight.dtype == torch.float32:
        return torch.mm(h, weight.t(), out=out)
    if fp32_out_matmuls(h.device.type)["mm"]:
        return torch.mm(h, weight.t(), out_dtype=torch.float32, out=out)
    return out.copy_(torch.mm(h, weight.t()))


def _softmax_chunk(h, weight, y, inv_t: float, z, e=None):
    """One chunk: z <- z' = (h W^T - max) / T, the shifted logits, and the unnormalised softmax exp(z')
    written into the second tile e; or over z itself when e is None, and then there is no entropy.

    Returns (exp(z'), s = its row sums, logsumexp of the logits / T, log p(y), entropy or None).
    """
    _logits(z, h, weight)
    m = z.amax(1, keepdim=True)
    z.sub_(m)
    if inv_t != 1.0:
        z.mul_(inv_t)                              # max(z / T) = max(z) / T, so the shift stays valid
    z_y = z.gather(1, y[:, None]).squeeze(1)
    if e is None:
        e, ent_dot = z.exp_(), None
    else:
        # the entropy needs z' and exp(z') together. Alternatives tried on this 2-core CPU: passing rows
        # through a small buffer (one tile) took 2.5x longer, xlogy on exp(z') adds a log pass.
        torch.exp(z, out=e)
        ent_dot = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)    # sum_v e z', no temporary tile
    s = e.sum(1)
    log_s = s.log()
    ent = None if ent_dot is None else log_s - ent_dot / s              # H = log s - sum(p z')
    return e, s, m.squeeze(1) * inv_t + log_s, z_y - log_s, ent


def _project_back(dz, h, weight, dh_out, dw):
    """dz = dLoss/dlogits (fp32 tile): dh_out = dz W (written in place) and dw += dz^T h in fp32.

    fp32 weights: both products in fp32 (TF32 on CUDA when torch.backends.cuda.matmul.allow_tf32 is set).
    bf16/fp16 weights: dz is rounded to their dtype once (a chunk-sized temporary, half the tile).
      dh  one matmul in that dtype (fp32 accumulation inside), its output in that dtype: each row is written
          once, and the decoder's backward runs in that dtype anyway.
      dw  this product is summed over every chunk, so the sum stays fp32. Where fp32_out_matmuls has addmm
          (CUDA): a bf16 matmul that adds into the fp32 buffer (full bf16 speed; only dz's rounding, as in any
          bf16 backward). Elsewhere (the CPU): an fp32 matmul of the fp32 dz and h.float()."""
    low = weight.dtype != torch.float32
    fast_dw = dw is not None and low and fp32_out_matmuls(h.device.type)["addmm"]
    dz_low = dz.to(weight.dtype) if low and (dh_out is not None or fast_dw) else dz
    if dh_out is not None:
        torch.mm(dz_low, weight, out=dh_out)
    if fast_dw:
        torch.addmm(dw, dz_low.t(), h, out_dtype=torch.float32, out=dw)
    elif dw is not None:
        dw.addmm_(dz.t(), h.float() if low else h)


def _check_inputs(hidden, weight, targets, temperature, *per_token):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    n = hidden.shape[0]
    for name, t in (("targets", targets),) + per_token:
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), one value per hidden row; got {tuple(t.shape)}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}), "
                         f"got [{int(targets.min())}, {int(targets.max())}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ----------------------------------------------------------------------------------------------------------
# Path 1: token_logprobs (forward keeps the logsumexp; backward recomputes each chunk)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, chunk, want_entropy):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else None
        tiles = _tiles(min(chunk, n), weight.shape[0], 2 if want_entropy else 1, hidden.device)
        for a in range(0, n, chunk):
            k = min(chunk, n - a)
            _, _, lse[a:a + k], logp[a:a + k], ent_c = _softmax_chunk(
                hidden[a:a + k], weight, targets[a:a + k], inv_t, *[t[:k] for t in tiles])
            if want_entropy:
                ent[a:a + k] = ent_c
        del tiles
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        ctx.set_materialize_grads(False)
        return (logp, ent) if want_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        n = hidden.shape[0]
        tile, *p_tile = _tiles(min(chunk, n), weight.shape[0], 1 if g_ent is None else 2, hidden.device)
        for a in range(0, n, chunk):
            k = min(chunk, n - a)
            h, y, z = hidden[a:a + k], targets[a:a + k], tile[:k]
            _logits(z, h, weight)
            if inv_t != 1.0:
                z.mul_(inv_t)
            log_p = z.sub_(lse[a:a + k, None])
            gl = g_logp[a:a + k] * inv_t               # d z / d logits = 1 / T, folded into the coefficients
            # d log p(y) / dz = onehot(y) - p;  d H / dz = -p (log p + H)
            if g_ent is None:
                dz = log_p.exp_().mul_(-gl[:, None])
            else:
                ge = g_ent[a:a + k] * inv_t
                dz = torch.exp(log_p, out=p_tile[0][:k])     # a second tile: the entropy has a gradient
                dz.mul_(log_p.mul_(-ge[:, None]).sub_((gl + ge * ent[a:a + k])[:, None]))
            dz.scatter_add_(1, y[:, None], gl[:, None])
            _project_back(dz, h, weight, None if dh is None else dh[a:a + k], dw)
        del tile, p_tile
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=1024, return_entropy=False):
    """log p(targets | hidden) under softmax(hidden W^T / T), shaped like targets, in fp32.

    hidden (..., H) and targets (...): pass only the positions you need (the loss-mask positions).
    With return_entropy, also the per-token entropy from the same pass: (logp, entropy).
    chunk_size tokens are projected at a time (pick it with chunk_tokens(vocab, budget_mb, device)).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    _check_inputs(h, weight, y, temperature)
    out = _TokenLogprobs.apply(h, weight, y, 1.0 / temperature, int(chunk_size), bool(return_entropy))
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


# ----------------------------------------------------------------------------------------------------------
# Path 2: the fused training loss (gradients formed in the forward, one pass over the vocab per chunk)


class _FusedGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, weights, ref, cfg, need_dh, need_dw):
        n = hidden.shape[0]
        chunk = chunk_tokens(weight.shape[0], cfg.chunk_mb, hidden.device)
        inv_t = 1.0 / cfg.temperature
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        sums = hidden.new_zeros(len(STATS), dtype=torch.float32)
        tile, e_tile = _tiles(min(chunk, n), weight.shape[0], 2, hidden.device)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h, y = hidden[a:b], targets[a:b]
            e, s, _, logp, ent = _softmax_chunk(h, weight, y, inv_t, tile[:b - a], e_tile[:b - a])
            # the per-token upstream gradient g = w * dl/dlogp, by autograd on (chunk,) vectors only
            with torch.enable_grad():
                lp = logp.requires_grad_()
                l_tok, info = policy_loss(lp, old[a:b], adv[a:b], cfg, None if ref is None else ref[a:b])
                chunk_loss = (weights[a:b] * l_tok).sum()
                (g,) = torch.autograd.grad(chunk_loss, lp)
            loss += chunk_loss.detach()
            sums += _stat_sums(logp.detach(), ent, info)
            if need_dh or need_dw:
                # dLoss/dz = (g / T) (onehot(y) - e / s), written over the tile e
                g = g * inv_t
                e.mul_((-g / s)[:, None]).scatter_add_(1, y[:, None], g[:, None])
                _project_back(e, h, weight, None if dh is None else dh[a:b], dw)
        del tile, e_tile
        ctx.grads = (dh, None if dw is None else dw.to(weight.dtype))
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        dh, dw = ctx.grads
        del ctx.grads
        for t in (dh, dw):
            if t is not None:
                t.mul_(grad_loss)                  # in place: these buffers are ours, no second copy
        return dh, dw, None, None, None, None, None, None, None, None


def grpo_loss(hidden, weight, targets, old_logprobs, advantages, weights, cfg: LossConfig, ref_logprobs=None):
    """The training path: sum_t weights_t * l_t (l_t from policy_loss) and the stats of _stats.

    hidden (N, H): decoder outputs at the loss-mask positions only; weight (V, H): the lm_head (or tied
    embedding) matrix; targets, old_logprobs, advantages, weights, ref_logprobs: (N,). Gradients reach
    hidden and weight through ordinary autograd from the returned loss.
    """
    _check_inputs(hidden, weight, targets, cfg.temperature, ("old_logprobs", old_logprobs),
                  ("advantages", advantages), ("weights", weights), ("ref_logprobs", ref_logprobs))
    if cfg.kl_coef and ref_logprobs is None:   # policy_loss says the same, but only once a chunk has run
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs of the same tokens)")
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad = torch.is_grad_enabled()
    loss, sums = _FusedGRPO.apply(
        hidden, weight, targets.long(), old_logprobs.to(**f32), advantages.to(**f32), weights.to(**f32),
        None if ref_logprobs is None else ref_logprobs.to(**f32), cfg,
        grad and hidden.requires_grad, grad and weight.requires_grad)
    return loss, _stats(sums, hidden.shape[0])


def naive_grpo_loss(hidden, weight, targets, old_logprobs, advantages, weights, cfg: LossConfig, ref_logprobs=None):
    """The same loss and stats the plain way: full logits, log_softmax, gather, autograd does the rest."""
    _check_inputs(hidden, weight, targets, cfg.temperature, ("old_logprobs", old_logprobs),
                  ("advantages", advantages), ("weights", weights), ("ref_logprobs", ref_logprobs))
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp_all = torch.log_softmax((hidden @ weight.t()).float() / cfg.temperature, dim=-1)
    logp = logp_all.gather(1, targets.long()[:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(1)
    l_tok, info = policy_loss(logp, old_logprobs.to(**f32), advantages.to(**f32), cfg,
                              None if ref_logprobs is None else ref_logprobs.to(**f32))
    loss = (weights.to(**f32) * l_tok).sum()
    return loss, _stats(_stat_sums(logp, entropy, info), hidden.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Aggregation


def loss_weights(seq_lens: list[int], mode: str, n_tokens: int, n_seqs: int, norm_len: int) -> torch.Tensor:
    """Per-token weights (fp32, CPU) for the sequences of one micro-batch, so that loss = sum_t w_t l_t.

    n_tokens and n_seqs are the GLOBAL counts over every rank and micro-batch of the optimizer step, so the
    summed gradients of all micro-batches equal the gradient of one big batch:
      token-mean               1 / n_tokens                 every token counts the same (the paper's)
      seq-mean-token-mean      1 / (n_seqs * len(seq))      every sequence counts the same
      seq-mean-token-sum-norm  1 / (n_seqs * norm_len)      Dr. GRPO: no length normalisation per sequence
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGG_MODES)}")
    if any(n < 0 for n in seq_lens):
        raise ValueError(f"sequence lengths must be >= 0, got {seq_lens}")
    if mode == "token-mean" and n_tokens < sum(seq_lens):
        raise ValueError(f"n_tokens ({n_tokens}) must count at least this micro-batch's {sum(seq_lens)} tokens")
    if mode != "token-mean" and n_seqs < max(len(seq_lens), 1):
        raise ValueError(f"n_seqs ({n_seqs}) must count at least this micro-batch's {len(seq_lens)} sequences")
    if mode == "seq-mean-token-sum-norm" and norm_len <= 0:
        raise ValueError(f"norm_len must be > 0, got {norm_len}")
    lens = torch.tensor(seq_lens, dtype=torch.long)
    if mode == "token-mean":
        per_seq = torch.full((len(seq_lens),), 1.0 / max(n_tokens, 1), dtype=torch.float64)
    elif mode == "seq-mean-token-mean":
        per_seq = 1.0 / (n_seqs * lens.clamp(min=1).double())
    else:
        per_seq = torch.full((len(seq_lens),), 1.0 / (n_seqs * norm_len), dtype=torch.float64)
    return per_seq.repeat_interleave(lens).float()
