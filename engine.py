"""The model side of a rollout (rollout.py runs the episodes, the envs and the users): how a token is sampled, and
the two ways the policy is run over a batch of episodes, the engine's static KV cache and lockstep's growing one.

How the engine reads the cache. `KVCache` is allocated once per rollout call: one row per episode in flight, an
episode's token at position p in column p of its row (nanochat's cache_seqlens). Only the rows being decoded go
through the model. transformers' attention layers call `KVCache.update`, which writes the new keys and values into
their columns and returns the block of cache rows spanning the fed rows, a view; the engine's attention function
(`block_attention`, registered with transformers for the call) puts each fed row's queries at its place in that
block and drops the other rows' outputs. Position ids are the columns, given explicitly. Stop conditions are
tested on the device and read back every `sync_every` steps (one host sync per chunk, not per token).

Log-probs are taken at sampling time: log_softmax(logits / temperature) of the sampled token, before top-p
truncation (greedy: temperature 1). The logits are fp32 even from a bf16 model where the device allows it
(`fp32_head`), as the trainer's are. The trainer recomputes them in a no-grad pass with its own training forward
for the PPO ratio, so the ratio's two sides share numerics (bf16, kernels, batch shapes); the gap between the
two is a diagnostic of the train/inference mismatch. Sampling noise is a function of (episode seed, position,
token) only (`token_noise`), so a seeded rollout repeats exactly although the engine's batches depend on when
users answer, and both schedules sample the same episodes.

RolloutConfig's `compile=True` compiles the decode step (CUDA graphs on CUDA) at power-of-two row counts and cache
widths. The cache itself is then allocated in those buckets (a new size per call was a recompile per call) and its
tensors are marked as static addresses (CUDA graphs skip a step that writes into an input that is not); each call
still allocates a new cache, so its graphs are recorded again per call, and a compiled step reads the whole cache
(every row, up to the bucketed width) where the eager one reads only the rows it decodes. It has not run on a GPU
yet (bench/gpu_smoke.py reports the compile time, graphs and CUDA-graph skips). On CPU it works (a test runs one
compiled chunk) but each new shape takes 10-25 s to compile on 2 cores, more than a CPU rollout gains, so it is
off by default.

`LockstepBatch` is the simplest cache to read: it grows by torch.cat (transformers' DynamicCache) with a 0/1 column
mask, and is compacted when episodes end; bench/rollout.py counts what that costs against the engine.
"""
import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from grpo import fp32_out_matmuls


# ----------------------------------------------------------------------------------------------------------
# Sampling (pure)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                  noise: torch.Tensor | None = None):
    """One token per row of `logits` [B, V] and its log-prob under softmax(logits / temperature), before top-p.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (always at least one) and
    samples from it renormalised. Greedy takes the argmax and reports the temperature-1 log-prob. The sample is
    argmax(p / noise) with Exp(1) noise [B, V] (drawn here when None; see token_noise): the first of independent
    exponential clocks of rates p to ring, an exact sample of p that, unlike torch.multinomial, needs no host sync
    on CUDA (pytorch #108968; gpt-fast samples so)."""
    logits = logits.float()
    if greedy:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before this token already reaches top_p
        probs = probs.masked_fill(torch.empty_like(outside).scatter_(1, order, outside), 0.0)
    if noise is None:  # the clamp keeps 0 / 0 = NaN, which argmax would take, off tokens of probability 0
        noise = torch.empty_like(probs).exponential_().clamp_(min=torch.finfo(probs.dtype).tiny)
    tokens = (probs / noise).topk(1).indices[:, 0]  # = argmax, which torch.compile's CPU code crashes on here
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


@contextmanager
def fp32_head(model):
    """While open, the lm_head of a bf16/fp16 `model` hands out fp32 logits computed as the trainer computes them
    (grpo._logits): on CUDA its matmul writes fp32 (fp32 accumulation, no logit rounded), where transformers' would
    round every logit to bf16 (spacing 0.125 at |logit| in [16, 32)) and the rollout would sample from, and record
    log-probs of, a distribution the trainer never scores. MiniMax-M1 (arXiv 2506.13585) traced most of its
    training/inference probability gap to the LM head's precision and raised it to fp32; TRL has the same option
    (cast_lm_head_to_fp32). The CPU has no fp32-output kernel: there the logits are the bf16 matmul's, handed on in
    fp32. An fp32 model, a head with a bias or a model without get_output_embeddings (a wrapper) is left as it is."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype == torch.float32:
        yield
        return
    fp32_out = fp32_out_matmuls(head.weight.device.type)["mm"]  # decided here: nothing to trace in the step

    def forward(hidden):
        h = hidden.reshape(-1, hidden.shape[-1])
        if fp32_out:
            logits = torch.mm(h, head.weight.t(), out_dtype=torch.float32,
                              out=h.new_empty(h.shape[0], head.out_features, dtype=torch.float32))
        else:
            logits = torch.mm(h, head.weight.t()).float()
        return logits.view(*hidden.shape[:-1], head.out_features)

    head.forward = forward  # the instance's attribute, over the class's method; deleted on the way out
    try:
        yield
    finally:
        del head.forward


_SPLITMIX = [c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]  # as int64


def _shift_right(x, n: int):
    return (x >> n) & ((1 << (64 - n)) - 1)  # logical: torch shifts int64 arithmetically


def _mix(x):
    """splitmix64's output function (Java's SplittableRandom) on int64 tensors."""
    _, mix1, mix2 = _SPLITMIX
    x = (x ^ _shift_right(x, 30)) * mix1
    x = (x ^ _shift_right(x, 27)) * mix2
    return x ^ _shift_right(x, 31)


def token_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab], a function of (episode seed, position of the token being sampled, token id) only:
    token t's uniform is output t of a splitmix64 stream keyed by output `position` of the stream seeded by the
    episode, computed on the device. An episode then samples the same tokens whichever rows share its decode steps,
    so a seeded rollout repeats exactly although the engine's batches depend on when users answer, and both
    schedules sample the same episodes."""
    golden, mix1, mix2 = _SPLITMIX
    key = _mix(seeds + (positions + 1) * golden)
    # _mix on the [B, vocab] stream, in place (each op over B x vocab int64 is a pass over memory); its last step,
    # x ^ (x >>> 31), leaves the top 24 bits as they are, and those are all that is used.
    x = key[:, None] + torch.arange(1, vocab + 1, device=seeds.device) * golden
    x.bitwise_xor_(_shift_right(x, 30)).mul_(mix1)
    x.bitwise_xor_(_shift_right(x, 27)).mul_(mix2)
    u = _shift_right(x, 40).float().add_(0.5).mul_(2.0 ** -24)  # top 24 bits k -> u = (k + 1/2) / 2^24
    # float32 rounds k + 1/2 to even, so k = 2^24 - 1 gives u = 1 and noise -0.0: a token of probability 0 (outside the
    # top-p nucleus) would then score 0 / -0 = NaN, which topk takes. Its true noise is -log(1 - 2^-25) = 2^-25 (to
    # float32 precision); every other k gives more, so the clamp changes that case only.
    return u.log_().neg_().clamp_(min=2.0 ** -25)


# ----------------------------------------------------------------------------------------------------------
# The engine: a preallocated KV cache with one row per episode, read in place


def kv_bytes_per_token(config, dtype) -> int:
    """Bytes of keys and values one token takes in the cache, all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


class KVCache:
    """Keys and values of `rows` episodes, allocated once: per layer [rows, kv_heads, columns, head_dim]. A row holds
    one episode, its token at position p in column p. It is transformers' Cache interface as far as attention layers
    use it: before a forward the engine points it at the rows and columns being fed (`at`); each layer's `update`
    writes its new keys and values there and returns the block of rows attention reads, a view (no copy)."""

    def __init__(self, config, rows: int, columns: int, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (rows, config.num_key_value_heads, columns, head_dim)
        # zeros, not empty: a masked column still meets a zero attention weight, and 0 x NaN garbage is NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.bytes_per_token = kv_bytes_per_token(config, dtype)
        self.nbytes = self.bytes_per_token * rows * columns
        self.bytes_copied = 0

    def at(self, rows, cols, block: slice, width: int):
        """The next forward writes row rows[i] at columns cols[i] ([n], [n, L]); attention reads block x :width."""
        self.rows, self.cols, self.block, self.width = rows[:, None], cols, block, width

    def update(self, key, value, layer_idx, *args, **kwargs):
        out = []
        for cache, new in ((self.keys[layer_idx], key), (self.values[layer_idx], value)):
            cache[self.rows, :, self.cols] = new.transpose(1, 2)  # new: [n, kv_heads, L, dim]
            out.append(cache[self.block, :, :self.width])
        return tuple(out)

    def copy_prefix(self, src: int, dst: int, n: int):
        """Row dst's first n columns := row src's (a prompt the two episodes share)."""
        for cache in self.keys + self.values:
            cache[dst, :, :n] = cache[src, :, :n]
        self.bytes_copied += n * self.bytes_per_token


def block_attention(module, query, key, value, attention_mask, scaling=None, rows=None, **kwargs):
    """The engine's attention, called by every attention layer: `query` [n, heads, L, dim] for the fed rows, `key` and
    `value` [B, kv_heads, W, dim] the cache block, `rows` where each fed row sits in the block: None (the fed rows
    are the block), a tensor (a decode step: the block's other rows get zero queries, whose outputs are dropped), or
    a list (a prefill: one attention call per fed row, on its own view, so long queries never meet other rows).
    Query heads that share a key head go along the query axis, so grouped-query attention copies no keys
    (transformers' pack_gqa does the same for one token)."""
    n, heads, length, dim = query.shape
    block, kv_heads = key.shape[:2]
    if isinstance(rows, list):
        q = query.reshape(n, kv_heads, heads // kv_heads * length, dim)
        out = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], key[r:r + 1], value[r:r + 1],
                                                        attn_mask=attention_mask[i:i + 1], scale=scaling)
                         for i, r in enumerate(rows)])
        return out.reshape(n, heads, length, dim).transpose(1, 2), None
    q = query if rows is None else query.new_zeros(block, heads, length, dim).index_copy_(0, rows, query)
    q = q.reshape(block, kv_heads, heads // kv_heads * length, dim)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    out = out.reshape(block, heads, length, dim)
    return (out if rows is None else out[rows]).transpose(1, 2), None


def _to(device, values: list):
    """A tensor of `values` on `device`, copied without waiting for the device (a blocking copy to a GPU waits for
    all queued work first: a host sync)."""
    return torch.tensor(values).to(device, non_blocking=True)


def _bucket(n: int) -> int:
    """n rounded up to a power of two (to 1024), then to a multiple of 1024: the few shapes a compiled step meets."""
    return 1 << max(0, n - 1).bit_length() if n <= 1024 else -(-n // 1024) * 1024


class Engine:
    """The policy over a KVCache: one-row prefills, prompt copies, and chunks of decode steps over any set of rows.
    Counts positions computed (`slots`), real tokens fed, host syncs and decode steps. `cfg` is the rollout's
    RolloutConfig (temperature, top_p, greedy, compile)."""

    ATTENTION = "rollout_block"

    def __init__(self, model, rows: int, columns: int, stop_ids: set, cfg):
        from transformers import AttentionInterface

        config = model.config
        if getattr(config, "use_sliding_window", False) or set(getattr(config, "layer_types", None) or []) - {
                "full_attention"}:
            raise ValueError(f"{type(model).__name__}: the rollout engine needs full attention in every layer "
                             "(sliding-window layers are not supported)")
        AttentionInterface.register(self.ATTENTION, block_attention)
        if cfg.compile:  # the cache is an input of the compiled step: its shape, in buckets, must not vary per call
            rows, columns = _bucket(rows), _bucket(columns)
        param = next(model.parameters())
        self.model, self.cfg, self.device, self.dtype, self.columns = model, cfg, param.device, param.dtype, columns
        # One more row and column than asked for: a compiled step's padding rows write into the last row, a padded
        # prefill's overflow into the last column.
        self.scratch = rows
        self.cache = KVCache(config, rows + 1, columns + 1, param.dtype, param.device)
        if cfg.compile:  # written in place by the step: CUDA graphs capture only mutated inputs of static address
            for t in self.cache.keys + self.cache.values:
                torch._dynamo.mark_static_address(t)
        self.n_rep = config.num_attention_heads // config.num_key_value_heads
        self.stop = torch.tensor(sorted(stop_ids), device=self.device)
        # transformers renamed `past_key_values` to `cache` (5.x deprecates the old name); use what this model takes.
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.slots = self.real = self.syncs = self.steps = 0
        # The class's function, called with the engine as its first argument: an engine holding its own bound method
        # would be a reference cycle, and its cache would outlive the rollout (GPU memory the update then lacks)
        # until Python's cycle collector happens to run.
        self.step = Engine._step
        if cfg.compile:
            # one graph per row count x width; dynamo's default limit (8 recompiles) would fall back to eager
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # reduce-overhead: CUDA graphs
            self.step = torch.compile(Engine._step, mode=mode, dynamic=False)

    def _forward(self, block: slice, rows, ids, pos, width: int, logits: bool):
        """Feed ids [n, L] to the rows at places `rows` of `block` (see block_attention), from positions pos [n]; the
        last position's logits. A right-padded row's padding lands past its length (its next real tokens overwrite
        it) or in the last column, which holds no real token."""
        length = ids.shape[1]
        cols = (pos[:, None] + torch.arange(length, device=self.device)).clamp(max=self.columns)
        if rows is None or isinstance(rows, list):
            places = torch.arange(block.start, block.stop, device=self.device) if rows is None else \
                _to(self.device, [block.start + r for r in rows])
            self.cache.at(places, cols, block, width)
            qpos = cols
        else:
            self.cache.at(rows + block.start, cols, block, width)
            # A block row not fed counts from 0: it sees column 0, so no row is all masked (sdpa would give NaN).
            qpos = torch.zeros(block.stop - block.start, length, dtype=torch.long, device=self.device)
            qpos = qpos.index_copy(0, rows, cols)
        if length > 1:  # one query row per query head sharing a key head (see block_attention); one token broadcasts
            qpos = qpos.repeat(1, self.n_rep)
        seen = torch.arange(width, device=self.device) <= qpos[:, None, :, None]
        mask = torch.where(seen, 0.0, float("-inf")).to(self.dtype)
        # A prefill needs no logits: an empty index list skips the lm_head.
        keep = 1 if logits else torch.zeros(0, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, position_ids=cols, attention_mask=mask, use_cache=True, logits_to_keep=keep,
                         rows=rows, **{self.cache_kw: self.cache})
        return out.logits[:, -1] if logits else None

    def prefill(self, fills: list):
        """Write each (row, tokens, column) of `fills` into the cache, no logits: one right-padded forward per group
        of similar lengths (a row is never padded to more than twice its length)."""
        fills = sorted((f for f in fills if f[1]), key=lambda f: -len(f[1]))
        while fills:
            group = [f for f in fills if 2 * len(f[1]) > len(fills[0][1])]
            fills = fills[len(group):]
            rows, tokens, pos = zip(*sorted(group))
            length = max(len(t) for t in tokens)
            block = slice(min(rows), max(rows) + 1)
            ids = _to(self.device, [t + t[-1:] * (length - len(t)) for t in tokens])  # any id pads
            self._forward(block, [r - block.start for r in rows], ids, _to(self.device, list(pos)),
                          min(self.columns, max(p + len(t) for p, t in zip(pos, tokens))), logits=False)
            self.slots += len(group) * length
            self.real += sum(len(t) for t in tokens)

    def _step(self, block: slice, width: int, rows, inp, pos, count, limit, active, seeds):
        """One decode step for the fed rows: the next token of each, its log-prob, and the rows' new state. The stop
        test runs here, on the device; a row that stopped keeps being fed (its writes land past its length, where
        its next real token will overwrite them) until the host reads the chunk back."""
        logits = self._forward(block, rows, inp[:, None], pos, width, logits=True)
        noise = None if self.cfg.greedy else token_noise(seeds, pos + 1, logits.shape[-1])
        tok, lp = sample_tokens(logits, self.cfg.temperature, self.cfg.top_p, self.cfg.greedy, noise)
        count, pos = count + active, pos + active
        active = active & ~(torch.isin(tok, self.stop) | (count >= limit))
        return tok, lp, pos, count, active

    def decode(self, rows: list, first: list, pos: list, limits: list, seeds: list, steps: int) -> list:
        """Up to `steps` decode steps for `rows` (per row: its first input token, its position, how many tokens it may
        still sample, its episode's sampling seed). Returns the (tokens, log-probs) each row sampled, read back to
        the host in one transfer."""
        n, dev = len(rows), self.device
        if self.cfg.compile:  # fixed shapes: the whole cache is the block; padding rows write into the scratch row
            block, pad, width = slice(0, self.scratch + 1), _bucket(n) - n, min(self.columns, _bucket(max(pos) + steps))
        else:
            block, pad, width = slice(min(rows), max(rows) + 1), 0, min(self.columns, max(pos) + steps)
        places = None  # the rows are the whole block (rows come sorted)
        if self.cfg.compile or n < block.stop - block.start:
            places = _to(dev, [r - block.start for r in rows] + [self.scratch] * pad)
        inp, pos_t, limit, seeds = (_to(dev, x + [0] * pad) for x in (first, pos, limits, seeds))
        active = torch.arange(n + pad, device=dev) < n
        count = torch.zeros_like(limit)
        toks, lps = [], []
        for _ in range(steps):
            tok, lp, pos_t, count, active = self.step(self, block, width, places, inp, pos_t, count, limit, active,
                                                      seeds)
            if self.cfg.compile:  # a CUDA graph's outputs are overwritten by its next replay
                tok, lp, pos_t, count, active = (x.clone() for x in (tok, lp, pos_t, count, active))
            toks.append(tok)
            lps.append(lp)
            inp = tok
        back = torch.cat([torch.stack(toks).double(), torch.stack(lps).double(), count[None].double()]).cpu()
        self.syncs += 1
        self.steps += steps
        self.slots += steps * (n + pad)
        counts = back[-1, :n].long().tolist()
        self.real += sum(counts)
        return [(back[:c, j].long().tolist(), back[steps:steps + c, j].tolist()) for j, c in enumerate(counts)]


# ----------------------------------------------------------------------------------------------------------
# The lockstep schedule's batch: a growing cache over all live rows


class LockstepBatch:
    """The live rows' KV cache (transformers' DynamicCache), its 0/1 column mask and each row's next position id.
    Counts what the bench compares with the engine: positions computed, real tokens, host syncs, bytes of cache
    copied (DynamicCache's torch.cat copies every cached column of every row at each forward)."""

    def __init__(self, model, pad_id: int):
        from transformers import DynamicCache

        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.bytes_per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
        self.slots = self.real = self.syncs = self.bytes_copied = self.peak_bytes = 0

    def forward(self, ids: torch.Tensor, new_mask: torch.Tensor, logits: bool = True):
        """Feed `ids` [B, L] (real where `new_mask` is 1, right-padded) after the cache; the last column's logits."""
        if self.mask.shape[0] == 0:
            self.mask = self.mask.new_zeros(ids.shape[0], 0)
            self.pos = self.pos.new_zeros(ids.shape[0])
        position_ids = self.pos[:, None] + torch.arange(ids.shape[1], device=self.device)
        self.bytes_copied += ids.shape[0] * self.mask.shape[1] * self.bytes_per_token
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        self.peak_bytes = max(self.peak_bytes, self.mask.numel() * self.bytes_per_token)
        # A prefill needs no logits: an empty index list skips the lm_head (B x vocab floats per call otherwise).
        keep = 1 if logits else torch.zeros(0, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: self.cache})
        self.pos = self.pos + new_mask.sum(dim=1)
        self.slots += ids.numel()
        self.real += int(new_mask.sum())
        self.syncs += 2  # int(...) above, and transformers' check of the 2D mask for padding
        return out.logits[:, -1] if logits else None

    def prefill(self, chunks: list):
        """Append one token list per row (right-padded into one batched forward); lists may be empty."""
        width = max(len(c) for c in chunks)
        if width == 0:
            return
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for r, c in enumerate(chunks):
            ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, :len(c)] = 1
        self.forward(ids.to(self.device), mask.to(self.device), logits=False)

    def keep(self, rows: list):
        """Keep (or repeat) the given rows in this order and move each row's real columns to the left, cutting the
        columns that are holes in every row. Keys already carry their rotary positions, so moving them is free."""
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask[rows_t]
        lengths = mask.sum(dim=1)
        width = int(lengths.max()) if len(rows) else 0
        self.syncs += 1
        self.bytes_copied += len(rows) * (self.mask.shape[1] + width) * self.bytes_per_token  # rows, then columns
        # A stable sort on "is a hole" lists each row's real columns first, in order.
        cols = torch.sort(1 - mask, dim=1, stable=True).indices[:, :width]
        for layer in self.cache.layers:  # transformers' DynamicLayer holds `keys`/`values` [B, heads, T, dim]
            for name in ("keys", "values"):
                t = getattr(layer, name)[rows_t]
                idx = cols[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                setattr(layer, name, t.gather(2, idx))
        self.mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
        self.pos = self.pos[rows_t]
