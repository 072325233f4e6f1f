"""Batched multi-turn rollouts: the policy talks to the gyms, token in and token out (UserRL, arXiv 2509.19736:
the framework's "groups of trajectories with turn-level rewards"; the original runs this loop in SGLang).

    cfg = RolloutConfig(max_turns=16, max_new_tokens=512)
    episodes = rollout(model, tokenizer, [("function", task), ...], group_size=8, cfg=cfg)   # a local HF model
    episodes = rollout(users.make_user("http", base_url=url, model="gpt-4o"), None, tasks, 1, cfg)  # HTTP agent
    write_transcripts("runs/x/eval.jsonl", episodes, tokenizer)

With a local model the call runs a small inference engine (schedule "engine", the default; nanochat's engine and
gpt-fast are its anchors):
1. All envs are reset concurrently. A prompt is the chat template of [system, opening user message] with the tool
   schema.
2. The KV cache is allocated once: one row per episode in flight (`max_rows`), as many columns as the longest
   prompt plus the episode budget. An episode's token at position p sits in column p of its row, so a row is
   described by its length alone (nanochat's cache_seqlens): no holes, nothing already cached is ever moved.
3. Episodes take free rows in task order. A prompt is prefilled once and copied into the rows of the episodes
   that share it (a GRPO group shares its prompt: nanochat's trick).
4. Each decode step feeds one token to every row whose turn is under way; a row stops at the end-of-turn token
   (eos) or at its cap. Stop conditions are checked on the device and read back every `sync_every` steps.
5. A row whose turn ended goes to its env/user in the thread pool while the others keep decoding. When the
   observation is back it is wrapped as the chat template wraps a `tool` message, tokenised on its own, appended
   to the ids and prefilled into the row, which rejoins decoding. A finished episode frees its row for the next
   waiting one. A slow user costs decode time only when nothing else is left to decode.
The conversation is never decoded and re-tokenised: `Episode.ids` are exactly the tokens the policy saw and
sampled, and `loss_mask` is 1 exactly on the sampled ones (anchors: TRL #5224, verl #3960, rllm #272).

How the engine reads the cache. Only the rows being decoded go through the model. transformers' attention layers
call `KVCache.update`, which writes the new keys and values into their columns and returns the block of cache rows
spanning the fed rows, a view; the engine's attention function (registered with transformers for the call) puts
each fed row's queries at its place in that block and drops the other rows' outputs. Position ids are the columns,
given explicitly. The last pending token of a turn (the assistant header's) is not prefilled but fed by the first
decode step, so the first token of a turn is sampled by the same code as every other one.

schedule="lockstep" is the simplest loop to read, kept for comparison (bench/rollout.py runs both): all episodes
decode a turn together on a cache that grows by torch.cat (transformers' DynamicCache) with a 0/1 column mask; rows
that ended their turn feed masked holes until the longest turn ends; then every env steps at once, all observations
are prefilled in one right-padded forward, and finished episodes' rows are dropped (the cache compacted).

Log-probs are taken at sampling time: log_softmax(logits / temperature) of the sampled token, before top-p
truncation (greedy: temperature 1). The trainer recomputes them in a no-grad pass with its own training forward
for the PPO ratio, so the ratio's two sides share numerics (bf16, kernels, batch shapes); the gap between the
two is a diagnostic of the train/inference mismatch. Sampling noise is a function of (episode seed, position,
token) only (`token_noise`), so a seeded rollout repeats exactly although the engine's batches depend on when
users answer, and both schedules sample the same episodes.

`compile=True` compiles the decode step (CUDA graphs on CUDA) at power-of-two row counts and cache widths. It has
not run on a GPU yet. On CPU it works (a test runs one compiled chunk) but each new shape takes 10-25 s to
compile on 2 cores, more than a CPU rollout gains, so it is off by default.

Simplifications and choices, each one line:
- One assistant generation is one turn, whatever it holds (as the original); the env parses the tool call.
- A turn with no tool call ends the episode with reward 0 (the original), unless `end_on_no_tool_call=False`.
- A turn that reaches `max_new_tokens` (or stops on another stop token) gets the end-of-turn token appended with
  loss_mask 0, so the template stays well formed, and its text still goes to the env.
- The episode budget counts every token after the prompt, env/user tokens included (the original's
  max_response_length); a turn cut by it ends the episode (end_reason "budget", reward 0, no env step).
- `ids` end at the last assistant turn: the final observation is in `messages` but not tokenised (nothing
  follows it).
- An env that ends an episode may name why in its info (`end_reason`, e.g. "malformed_call"); that becomes the
  episode's end_reason.
- A `users.UserError` from one env marks only that episode failed (end_reason "user_failure"), and an env/user call
  past `env_timeout` seconds does too (end_reason "env_timeout"); the batch goes on without waiting for it.
- The chat template is called without extra kwargs (Qwen3: its default thinking mode).
- Full attention is assumed (a sliding-window model is refused): Qwen2, Qwen3 and Llama-family causal LMs.
"""
import heapq
import inspect
import json
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import envs

# ----------------------------------------------------------------------------------------------------------
# Config and records


@dataclass
class RolloutConfig:
    max_turns: int = 16
    """assistant turns per episode at most (the original's multi_turn.max_turns; also each env's max_turns)"""
    max_new_tokens: int = 8192
    """tokens one turn may generate; the default leaves the episode budget as the only limit, as in the original's
    training (its evaluation used 2048 per turn)"""
    max_episode_tokens: int = 8192
    """tokens after the prompt over the whole episode, env/user tokens included (the original's max_response_length)"""
    temperature: float = 1.0
    """sampling temperature (the original's training: 1.0); log-probs are taken at this temperature"""
    top_p: float = 1.0
    """nucleus sampling; 1.0 samples from the full distribution (the original's training)"""
    greedy: bool = False
    """argmax decoding (the original's evaluation: temperature 0); log-probs are then at temperature 1"""
    end_on_no_tool_call: bool = True
    """a turn with no tool call ends the episode with reward 0 (the original); False passes its text to env.step"""
    show_reward: bool = True
    """append "Reward: r" to observations (passed to make_env): the paper's training shows it, its evaluation not"""
    eval_mode: bool = False
    """the gyms' evaluation settings (passed to make_env; e.g. TravelGym's eval rewards); pair it with show_reward
    False for the paper's evaluation"""
    malformed: str = "end"
    """a tool call the env cannot parse: "end" ends the episode (the original's rule), "retry" shows the error and
    lets the agent try again (passed to make_env)"""
    env_workers: int = 128
    """threads for concurrent env/user calls (the original allows 128 requests in flight)"""
    env_timeout: float = 120.0
    """seconds one env/user call (a reset or a step) may take; past it the episode fails with end_reason
    "env_timeout" and the rollout goes on without waiting for the call (the original: 30 s per step)"""
    schedule: str = "engine"
    """"engine": each episode runs on its own (turns overlap users, waiting episodes take free rows); "lockstep":
    all episodes decode each turn together, then all users reply (simplest to read; for comparison)"""
    max_rows: int = 0
    """engine: episodes in flight at once, i.e. cache rows (0: every episode of the call). The cache takes
    max_rows x (longest prompt + max_episode_tokens) x the model's KV bytes per token, allocated once per call"""
    sync_every: int = 4
    """engine: decode steps between reading sampled tokens back to the host. The stop test runs on the device; a row
    that stops idles, and a row whose observation is back waits, until the chunk ends: fewer steps per read back
    mean fewer syncs but later rejoins (8 took 5-8% more decode steps than 4 on bench/rollout.py's workloads)"""
    compile: bool = False
    """engine: torch.compile the decode step (CUDA graphs on CUDA), at power-of-two row counts and cache widths"""
    progress: bool = True
    """show a tqdm bar over turns"""

    def __post_init__(self):
        if self.max_turns < 1 or self.max_new_tokens < 1 or self.max_episode_tokens < 1 or self.env_workers < 1:
            raise ValueError("max_turns, max_new_tokens, max_episode_tokens and env_workers must be >= 1, got "
                             f"{self.max_turns}, {self.max_new_tokens}, {self.max_episode_tokens}, {self.env_workers}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1 (or greedy), got {self.temperature}, {self.top_p}")
        for name, allowed in (("schedule", ("engine", "lockstep")), ("malformed", ("end", "retry"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"rollout.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_rows < 0 or self.sync_every < 1 or not self.env_timeout > 0:
            raise ValueError(f"need max_rows >= 0, sync_every >= 1 and env_timeout > 0, got {self.max_rows}, "
                             f"{self.sync_every}, {self.env_timeout}")


@dataclass
class Episode:
    """One trajectory. Token fields are parallel lists over `ids` (empty for an HTTP agent, which gives no tokens)."""

    gym: str
    ids: list = field(default_factory=list)
    """the whole conversation as token ids, prompt included, ending at the last assistant turn"""
    loss_mask: list = field(default_factory=list)
    """1 exactly on tokens the policy sampled (thinking, tool call, its end-of-turn token); 0 elsewhere"""
    logprobs: list = field(default_factory=list)
    """the sampling policy's log-prob of each masked token at the sampling temperature; 0.0 elsewhere"""
    turn_rewards: list = field(default_factory=list)
    """the env reward of each assistant turn (0.0 for a turn that got no env step)"""
    turn_info: list = field(default_factory=list)
    """the env's info of each assistant turn (e.g. choice, error, missing_tool_call, end_reason); {} for a turn that
    got no env step. Parallel to turn_rewards; rewards.py's credit functions may read it"""
    turn_spans: list = field(default_factory=list)
    """(start, end) of each assistant turn in `ids`, half-open: its sampled tokens plus its end-of-turn token"""
    messages: list = field(default_factory=list)
    """the conversation as chat messages (system, user, assistant, tool), for transcripts and SFT data. Assistant
    content is the sampled text decoded (end-of-turn token stripped). Rendered by the template, these messages give
    `ids` back as text, but not always as tokens: re-tokenising can split the sampled text differently, and Qwen3's
    own template rewrites the <think> blocks of earlier turns. Hence `ids`, never a re-rendering, for training."""
    failed: bool = False
    """a user/endpoint failure or timeout ended it: the trainer leaves it out of the loss and counts it"""
    info: dict = field(default_factory=dict)
    """end_reason (done / max_turns / budget / no_tool_call / user_failure / env_timeout, or the env's own, e.g.
    malformed_call), task_id, turns, prompt_tokens, time_env (seconds in this episode's env/user calls), score,
    error (when failed)"""


def _user_error():
    """users.UserError: the one exception a user call raises after its retries (imported late: users.py is
    optional for tools that only parse actions, as in envs.py)."""
    import users

    return users.UserError


# ----------------------------------------------------------------------------------------------------------
# Tokens: the prompt and the observation pieces, from the tokenizer's own chat template


def prompt_messages(env) -> list:
    return [{"role": "system", "content": env.system()}, {"role": "user", "content": env.reset()}]


def render_ids(tokenizer, messages, add_generation_prompt: bool) -> list:
    return tokenizer.apply_chat_template(messages, tools=[envs.TOOL_SCHEMA],
                                         add_generation_prompt=add_generation_prompt,
                                         tokenize=True, return_dict=False)


def observation_wrapper(tokenizer) -> tuple:
    """(head, tail): the text the chat template puts between an assistant's end-of-turn token and a tool message's
    content, and after it up to the next assistant header. Read off one rendering with marker strings, so it is
    whatever the template does (Qwen: "\\n<|im_start|>user\\n<tool_response>\\n" and
    "\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n")."""
    said, obs = "ASSISTANT-TEXT-7f3a", "OBSERVATION-TEXT-7f3a"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
         {"role": "assistant", "content": said}, {"role": "tool", "content": obs}],
        tools=[envs.TOOL_SCHEMA], add_generation_prompt=True, tokenize=False)
    after = text[text.index(said) + len(said):]
    if not after.startswith(tokenizer.eos_token) or after.count(obs) != 1:
        raise ValueError(f"the chat template does not end an assistant turn with the eos token {tokenizer.eos_token!r} "
                         f"followed by the tool message; got {after[:80]!r}")
    head, tail = after[len(tokenizer.eos_token):].split(obs)
    return head, tail


def observation_ids(tokenizer, wrapper, observation: str) -> list:
    """The tokens appended after an assistant turn for one observation: the piece starts right after a special
    token and ends with the assistant header, so tokenising it alone gives the template's own tokens."""
    head, tail = wrapper
    return tokenizer.encode(head + observation + tail, add_special_tokens=False)


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
    golden = _SPLITMIX[0]
    key = _mix(seeds + (positions + 1) * golden)
    x = _mix(key[:, None] + torch.arange(1, vocab + 1, device=seeds.device) * golden)
    return -torch.log((_shift_right(x, 40).float() + 0.5) / (1 << 24))  # top 24 bits -> u in (0, 1)


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
    Counts positions computed (`slots`), real tokens fed, host syncs and decode steps."""

    ATTENTION = "rollout_block"

    def __init__(self, model, rows: int, columns: int, stop_ids: set, cfg: RolloutConfig):
        from transformers import AttentionInterface

        config = model.config
        if getattr(config, "use_sliding_window", False) or set(getattr(config, "layer_types", None) or []) - {
                "full_attention"}:
            raise ValueError(f"{type(model).__name__}: the rollout engine needs full attention in every layer "
                             "(sliding-window layers are not supported)")
        AttentionInterface.register(self.ATTENTION, block_attention)
        param = next(model.parameters())
        self.model, self.cfg, self.device, self.dtype, self.columns = model, cfg, param.device, param.dtype, columns
        # One more row and column than asked for: a compiled step's padding rows write into the last row, a padded
        # prefill's overflow into the last column.
        self.scratch = rows
        self.cache = KVCache(config, rows + 1, columns + 1, param.dtype, param.device)
        self.n_rep = config.num_attention_heads // config.num_key_value_heads
        self.stop = torch.tensor(sorted(stop_ids), device=self.device)
        # transformers renamed `past_key_values` to `cache` (5.x deprecates the old name); use what this model takes.
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.slots = self.real = self.syncs = self.steps = 0
        self.step = self._step
        if cfg.compile:
            # one graph per row count x width; dynamo's default limit (8 recompiles) would fall back to eager
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # reduce-overhead: CUDA graphs
            self.step = torch.compile(self._step, mode=mode, dynamic=False)

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
        places = _to(dev, [r - block.start for r in rows] + [self.scratch] * pad)
        if not self.cfg.compile and n == block.stop - block.start:  # the rows are the whole block (rows come sorted)
            places = None
        inp, pos_t, limit, seeds = (_to(dev, x + [0] * pad) for x in (first, pos, limits, seeds))
        active = torch.arange(n + pad, device=dev) < n
        count = torch.zeros_like(limit)
        toks, lps = [], []
        for _ in range(steps):
            tok, lp, pos_t, count, active = self.step(block, width, places, inp, pos_t, count, limit, active, seeds)
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


def _rollout_engine(model, tokenizer, episodes, env_list, live, cfg, pool, counts, stop_ids, seeds, bar):
    """Every episode on its own: a row decodes while others wait for their users; see the module docstring."""
    eos, wrapper = tokenizer.eos_token_id, observation_wrapper(tokenizer)
    n_rows = min(cfg.max_rows or len(live), len(live))
    columns = max(episodes[i].info["prompt_tokens"] for i in live) + cfg.max_episode_tokens
    engine = Engine(model, n_rows, columns, stop_ids, cfg)
    free = list(range(n_rows))  # a heap: taking the lowest free row keeps the decoded block narrow
    waiting = deque(live)  # episodes without a row, in task order
    # per episode: its row, how many of its ids are in the cache, its turn under way, its ids not yet in the cache
    row, cached, turn, unfed = {}, {}, {}, {}
    holder = {}  # a prompt (all but its last token) -> a row whose first columns hold it
    running = {}  # the future of an env step -> (episode, time submitted)

    def finish(i):
        heapq.heappush(free, row.pop(i))
        bar.update(1)

    config = model.config
    saved_attention, config._attn_implementation = config._attn_implementation, Engine.ATTENTION
    try:
        while waiting or turn or running:
            t0 = time.perf_counter()
            fills, copies, starts = [], [], []  # prefills (row, tokens, column), prompt copies, turns to begin
            while waiting and free:  # admit
                i = waiting.popleft()
                r = row[i] = heapq.heappop(free)
                prompt = tuple(episodes[i].ids[:-1])
                if holder.get(prompt) != r:  # unless row r still holds this prompt, it gets it now
                    for key in [k for k, v in holder.items() if v == r]:
                        del holder[key]
                    if prompt in holder:
                        copies.append((holder[prompt], r, len(prompt)))
                    else:
                        fills.append((r, list(prompt), 0))
                        holder[prompt] = r
                cached[i] = len(prompt)
                starts.append((i, episodes[i].ids[-1:]))

            now = time.perf_counter()  # observations back (or overdue): prefill and rejoin, or end
            for fut in [f for f, (_, t) in running.items() if f.done() or now - t > cfg.env_timeout]:
                i, _ = running.pop(fut)
                ep = episodes[i]
                obs = _record_step(ep, fut.result() if fut.done() else _timeout(cfg.env_timeout), cfg)
                piece = None if obs is None else observation_ids(tokenizer, wrapper, obs)
                if piece is not None and len(ep.ids) + len(piece) - ep.info["prompt_tokens"] >= cfg.max_episode_tokens:
                    ep.info["end_reason"], piece = "budget", None  # no room left to generate even one token after it
                if piece is None:
                    finish(i)
                else:
                    _append(ep, piece, 0)
                    starts.append((i, unfed.pop(i) + piece))

            # A turn's pending tokens are prefilled but the last, which its first decode step feeds.
            fills += [(row[i], pending[:-1], cached[i]) for i, pending in starts]
            engine.prefill(fills)
            for src, dst, n in copies:  # after the prefill that may have written their source
                engine.cache.copy_prefix(src, dst, n)
            counts["tokens_prefill"] += sum(len(tokens) for _, tokens, _ in fills)
            for i, pending in starts:
                ep = episodes[i]
                cached[i] += len(pending) - 1
                left = cfg.max_episode_tokens - (len(ep.ids) - ep.info["prompt_tokens"])
                turn[i] = {"next": pending[-1], "limit": min(cfg.max_new_tokens, left), "gen": [], "lps": []}

            waited = 0.0
            if turn:  # decode a chunk; rows whose turn ended go to their envs
                order = sorted(turn, key=row.get)
                left = [turn[i]["limit"] - len(turn[i]["gen"]) for i in order]
                t1 = time.perf_counter()
                sampled = engine.decode([row[i] for i in order], [turn[i]["next"] for i in order],
                                        [cached[i] for i in order], left, [seeds[i] for i in order],
                                        min(cfg.sync_every, max(left)))
                counts["time_decode"] += time.perf_counter() - t1
                for i, (toks, lps) in zip(order, sampled):
                    t = turn[i]
                    t["gen"] += toks
                    t["lps"] += lps
                    t["next"] = toks[-1]
                    cached[i] += len(toks)
                    if toks[-1] in stop_ids or len(t["gen"]) >= t["limit"]:
                        del turn[i]
                        ep = episodes[i]
                        counts["tokens_generated"] += len(t["gen"])
                        unfed[i] = _close_turn(ep, t["gen"], t["lps"], eos, stop_ids, tokenizer, cfg)
                        if "end_reason" in ep.info:
                            finish(i)
                        else:
                            text = ep.messages[-1]["content"]
                            running[pool.submit(_env_step, cfg, env_list[i], text)] = (i, time.perf_counter())
            elif running:  # nothing to decode: wait for the first observation back (or overdue call), then up to
                # one decode step's time for more, each of which would otherwise trail by a chunk
                t1 = time.perf_counter()
                overdue = min(t for _, t in running.values()) + cfg.env_timeout
                done, _ = wait(list(running), timeout=max(0.0, overdue - t1), return_when=FIRST_COMPLETED)
                if done and engine.steps:
                    wait(list(running), timeout=counts["time_decode"] / engine.steps)
                waited = time.perf_counter() - t1
            counts["time_env"] += waited
            counts["time_generate"] += time.perf_counter() - t0 - waited
    finally:
        config._attn_implementation = saved_attention
    counts.update(slots_fed=engine.slots, tokens_fed=engine.real, host_syncs=engine.syncs, rows=n_rows,
                  decode_steps=engine.steps, cache_bytes=engine.cache.nbytes,
                  cache_bytes_copied=engine.cache.bytes_copied)


# ----------------------------------------------------------------------------------------------------------
# The lockstep schedule: a growing cache over all live rows, one turn at a time


class _Batch:
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


def _decode(batch: _Batch, first: list, live: list, cfg: RolloutConfig, stop_ids: set, seeds: list):
    """Decode one turn for every live row: feed `first` (each row's last pending token), then sample until each
    row stops (a stop token, max_new_tokens, or the episode budget). Returns sampled tokens [B, S], their
    log-probs [B, S] and each row's count; rows that stopped feed masked holes until the longest is done."""
    device = batch.device
    limits = torch.tensor([min(cfg.max_new_tokens, cfg.max_episode_tokens - (len(ep.ids) - ep.info["prompt_tokens"]))
                           for ep in live], device=device)
    stop_t = torch.tensor(sorted(stop_ids), device=device)
    inp = torch.tensor(first, dtype=torch.long, device=device)
    active = torch.ones(len(live), dtype=torch.bool, device=device)
    count = torch.zeros(len(live), dtype=torch.long, device=device)
    seeds = torch.tensor(seeds, device=device)
    toks, lps = [], []
    for _ in range(int(limits.max())):
        logits = batch.forward(inp[:, None], active.long()[:, None])
        noise = None if cfg.greedy else token_noise(seeds, batch.pos, logits.shape[-1])  # pos: the sampled token's
        tok, lp = sample_tokens(logits, cfg.temperature, cfg.top_p, cfg.greedy, noise)
        toks.append(tok)
        lps.append(lp)
        count += active.long()
        active &= ~(torch.isin(tok, stop_t) | (count >= limits))
        batch.syncs += 1
        if not active.any():
            break
        inp = torch.where(active, tok, torch.full_like(tok, batch.pad_id))
    batch.syncs += 2  # int(limits.max()) above, and the read back
    return torch.stack(toks, 1).cpu(), torch.stack(lps, 1).float().cpu(), count.tolist()


def _rollout_lockstep(model, tokenizer, episodes, env_list, live, cfg, pool, counts, stop_ids, seeds, bar):
    """All live episodes decode a turn together, then all envs step, then all observations are prefilled."""
    eos, wrapper = tokenizer.eos_token_id, observation_wrapper(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # holes are masked: any id works
    batch = _Batch(model, pad_id)
    t0 = time.perf_counter()
    # Prefill each distinct prompt once (minus its last token, fed by the first decode step), then copy its
    # cache rows to every episode that shares it.
    distinct = {}
    rows = [distinct.setdefault(tuple(episodes[i].ids[:-1]), len(distinct)) for i in live]
    batch.prefill([list(k) for k in distinct])
    batch.keep(rows)
    counts["tokens_prefill"] += sum(len(k) for k in distinct)
    pending = {i: episodes[i].ids[-1:] for i in live}  # tokens in an episode's ids but not yet in the cache
    counts["time_generate"] += time.perf_counter() - t0

    while live:
        t0 = time.perf_counter()
        batch.prefill([pending[i][:-1] for i in live])
        t1 = time.perf_counter()
        toks, lps, n = _decode(batch, [pending[i][-1] for i in live], [episodes[i] for i in live], cfg, stop_ids,
                               [seeds[i] for i in live])
        counts["time_decode"] += time.perf_counter() - t1
        counts["decode_steps"] += toks.shape[1]
        items, stepped = [], []
        for r, i in enumerate(live):
            gen = toks[r, :n[r]].tolist()
            counts["tokens_generated"] += len(gen)
            pending[i] = _close_turn(episodes[i], gen, lps[r, :n[r]].tolist(), eos, stop_ids, tokenizer, cfg)
            if "end_reason" not in episodes[i].info:
                items.append((episodes[i], env_list[i], episodes[i].messages[-1]["content"]))
                stepped.append(i)
        counts["time_generate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        observations = _step_all(pool, cfg, items)
        counts["time_env"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, obs in zip(stepped, observations):
            ep = episodes[i]
            if obs is None:
                continue
            piece = observation_ids(tokenizer, wrapper, obs)
            if len(ep.ids) + len(piece) - ep.info["prompt_tokens"] >= cfg.max_episode_tokens:
                ep.info["end_reason"] = "budget"  # no room left to generate even one token after it
                continue
            _append(ep, piece, 0)
            pending[i] = pending[i] + piece
        survivors = [r for r, i in enumerate(live) if "end_reason" not in episodes[i].info]
        bar.update(len(live) - len(survivors))
        live = [live[r] for r in survivors]
        if live:
            batch.keep(survivors)
            counts["tokens_prefill"] += sum(len(pending[i]) - 1 for i in live)  # all but the turn's first input
        counts["time_generate"] += time.perf_counter() - t0
    counts.update(slots_fed=batch.slots, tokens_fed=batch.real, host_syncs=batch.syncs, rows=len(rows),
                  cache_bytes=batch.peak_bytes, cache_bytes_copied=batch.bytes_copied)


# ----------------------------------------------------------------------------------------------------------
# The rollout with a local model


@torch.no_grad()
def rollout(model, tokenizer, tasks, group_size: int, cfg: RolloutConfig, user=None, stats: dict | None = None):
    """`group_size` episodes per (gym_name, task_dict) in `tasks`, returned grouped in the order of `tasks`.

    `model` is a transformers causal LM (run in eval mode here, its mode restored after), or an HTTP agent: any
    object with `.complete(messages, tools, env=None) -> assistant message dict` (users.py's http client; `tokenizer`
    may then be None, and episodes carry messages and rewards but no tokens). `user` is passed to envs.make_env
    (None: the scripted user). If `stats` is a dict it receives this call's figures:
      time_generate  s of wall time in model forwards, sampling and token bookkeeping
      time_env       s of wall time waiting on env/user calls with nothing to decode (lockstep: its env phases)
      time_decode    s of wall time in decode steps (at least one row decoding)
      tokens_generated, tokens_prefill (tokens fed by prefills: prompts, observations), tokens_fed (all real
      tokens fed), slots_fed (positions computed, padding and holes included), slot_utilization (their ratio)
      turns (the most any episode took), decode_steps, rows (cache rows), host_syncs (device-to-host reads the
      host waits for: counted, so CPU runs show what a GPU would wait for), cache_bytes (the KV cache's size: the
      engine's allocation, lockstep's peak), cache_bytes_copied (bytes of cached keys/values moved: prompt copies,
      and for lockstep torch.cat's growth and compaction)."""
    if hasattr(model, "complete"):
        return _rollout_http(model, tasks, group_size, cfg, user, stats)
    was_training = model.training
    model.eval()
    try:
        return _rollout_local(model, tokenizer, tasks, group_size, cfg, user, stats)
    finally:
        model.train(was_training)


def _rollout_local(model, tokenizer, tasks, group_size, cfg, user, stats):
    from tqdm import tqdm

    episodes, env_list = _new_episodes(tasks, group_size, cfg, user)
    seeds = torch.randint(0, 1 << 62, (len(episodes),)).tolist()  # each episode's sampling seed (see token_noise)
    stop_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(model, "generation_config", None),
                                                               "eos_token_id", None)))
    counts = dict.fromkeys(("time_generate", "time_env", "time_decode"), 0.0)
    counts.update(dict.fromkeys(("tokens_generated", "tokens_prefill", "tokens_fed", "slots_fed", "decode_steps",
                                 "rows", "host_syncs", "cache_bytes", "cache_bytes_copied"), 0))
    bar = tqdm(total=len(episodes), desc=f"rollout ({cfg.schedule})", disable=not cfg.progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=cfg.env_workers)
    try:  # shut down without waiting: a call past env_timeout must not hold up the rollout's end
        t0 = time.perf_counter()
        _reset_all(pool, episodes, env_list, cfg)
        counts["time_env"] += time.perf_counter() - t0
        live = [i for i, ep in enumerate(episodes) if not ep.failed]
        for i in live:
            _append(episodes[i], render_ids(tokenizer, episodes[i].messages, add_generation_prompt=True), 0)
            episodes[i].info["prompt_tokens"] = len(episodes[i].ids)
        bar.update(len(episodes) - len(live))
        if live:
            schedule = _rollout_engine if cfg.schedule == "engine" else _rollout_lockstep
            schedule(model, tokenizer, episodes, env_list, live, cfg, pool, counts, stop_ids, seeds, bar)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    _record_scores(episodes, env_list)
    counts["turns"] = max(ep.info["turns"] for ep in episodes)
    counts["slot_utilization"] = counts["tokens_fed"] / max(1, counts["slots_fed"])
    if stats is not None:
        stats.update(counts)
    return episodes


def _append(ep: Episode, ids: list, mask: int, logprobs: list | None = None):
    ep.ids += ids
    ep.loss_mask += [mask] * len(ids)
    ep.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def _close_turn(ep: Episode, gen: list, logprobs: list, eos: int, stop_ids: set, tokenizer, cfg) -> list:
    """Record one sampled turn in `ep`; returns the tokens now in its ids but not in the cache. A turn that did
    not end with eos is closed with one (loss_mask 0), unless the episode budget cut it: that ends the episode."""
    start = len(ep.ids)
    _append(ep, gen, 1, logprobs)
    unfed = gen[-1:]  # the last sampled token was never fed back
    ended = gen[-1] != eos and len(ep.ids) - ep.info["prompt_tokens"] >= cfg.max_episode_tokens
    if not ended and gen[-1] != eos:
        _append(ep, [eos], 0)
        unfed.append(eos)
    ep.turn_spans.append((start, len(ep.ids)))
    text = tokenizer.decode(gen[:-1] if gen[-1] in stop_ids else gen, skip_special_tokens=False)
    ep.messages.append({"role": "assistant", "content": text})
    if ended:
        ep.turn_rewards.append(0.0)
        ep.turn_info.append({})
        ep.info["turns"] += 1
        ep.info["end_reason"] = "budget"
    return unfed


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


# ----------------------------------------------------------------------------------------------------------
# Env/user calls (every schedule and the HTTP-agent loop): each runs in a pool thread and returns an outcome
# (result, error message or None, seconds), which the main thread books into its episode


_NO_TOOL_CALL, _TIMED_OUT = object(), object()


def _timed(fn, *args, **kwargs):
    """(result, error message or None, seconds): a users.UserError is caught and returned, anything else raises."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs), None, time.perf_counter() - t0
    except _user_error() as e:
        return None, f"{type(e).__name__}: {e}", time.perf_counter() - t0


def _timeout(seconds: float):
    return _TIMED_OUT, f"env_timeout: an env/user call took longer than {seconds:g} s", seconds


def _outcomes(futures: list, timeout: float) -> list:
    """Each future's outcome, waiting at most `timeout` s for all of them; one still running then is timed out and
    left behind (its thread finishes on its own; the pool is shut down without waiting for it)."""
    done, _ = wait(futures, timeout=timeout)
    return [f.result() if f in done else _timeout(timeout) for f in futures]


def _env_step(cfg, env, text):
    """env.step(text) in a pool thread; a turn with no tool call ends its episode unstepped (end_on_no_tool_call)."""
    if cfg.end_on_no_tool_call:
        try:
            envs.parse_action(text)
        except envs.ActionError as e:
            if e.missing:
                return _NO_TOOL_CALL, None, 0.0
    return _timed(env.step, text)


def _record_step(ep: Episode, outcome, cfg) -> str | None:
    """Book one env step's outcome into `ep`; returns the observation when the episode goes on, else None."""
    res, err, secs = outcome
    ep.info["time_env"] += secs
    ep.info["turns"] += 1
    if res is _NO_TOOL_CALL or err:
        ep.turn_rewards.append(0.0)
        ep.turn_info.append({})
        if err:
            _fail(ep, err, "env_timeout" if res is _TIMED_OUT else "user_failure")
        else:
            ep.info["end_reason"] = "no_tool_call"
        return None
    obs, reward, done, info = res
    ep.turn_rewards.append(float(reward))
    ep.turn_info.append(dict(info))
    ep.messages.append({"role": "tool", "content": obs})
    if done:
        ep.info["end_reason"] = info.get("end_reason") or ("max_turns" if info.get("truncated") else "done")
    elif ep.info["turns"] >= cfg.max_turns:
        ep.info["end_reason"] = "max_turns"
    return None if "end_reason" in ep.info else obs


def _step_all(pool, cfg, items) -> list:
    """Step every (episode, env, text) concurrently; per item its observation, or None when its episode ended."""
    futures = [pool.submit(_env_step, cfg, env, text) for _, env, text in items]
    return [_record_step(ep, out, cfg) for (ep, _, _), out in zip(items, _outcomes(futures, cfg.env_timeout))]


def _new_episodes(tasks, group_size: int, cfg: RolloutConfig, user):
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError("tasks must be a non-empty list of (gym_name, task_dict) pairs")
    for t in tasks:
        if not (isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], dict)):
            raise ValueError(f"each task must be a (gym_name, task_dict) pair, got {t!r:.120}")
    cfg.__post_init__()  # a config edited after construction is checked again
    episodes, env_list = [], []
    for gym, task in tasks:
        for _ in range(group_size):
            env_list.append(envs.make_env(gym, task, user=user, max_turns=cfg.max_turns, show_reward=cfg.show_reward,
                                          eval_mode=cfg.eval_mode, malformed=cfg.malformed))
            episodes.append(Episode(gym=gym, info={"task_id": task.get("id"), "turns": 0, "time_env": 0.0}))
    return episodes, env_list


def _fail(ep: Episode, error: str, reason: str = "user_failure"):
    ep.failed = True
    ep.info["end_reason"] = reason
    ep.info["error"] = error


def _reset_all(pool, episodes, env_list, cfg):
    """Reset every env concurrently; each episode's messages become its prompt (or it fails)."""
    futures = [pool.submit(_timed, prompt_messages, env) for env in env_list]
    for ep, (msgs, err, secs) in zip(episodes, _outcomes(futures, cfg.env_timeout)):
        ep.info["time_env"] += secs
        if err:
            _fail(ep, err, "env_timeout" if msgs is _TIMED_OUT else "user_failure")
        else:
            ep.messages = msgs


# ----------------------------------------------------------------------------------------------------------
# The rollout with an HTTP agent (strong models for evaluation and SFT data: messages in, messages out)


def tool_call_text(message: dict) -> str:
    """An OpenAI assistant message as the text the env parses: content, then each tool call as the Qwen template
    writes it (`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`); the env executes the last one."""
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        f = call.get("function", call)
        call_json = json.dumps({"name": f.get("name"), "arguments": f.get("arguments")})
        text += "\n<tool_call>\n" + call_json + "\n</tool_call>"
    return text


def _observation_messages(message: dict, obs: str) -> list:
    """The env's reply as the messages an OpenAI-compatible server accepts after `message`: one `tool` message per
    tool call id (only the last call is executed, as in the original), or a `user` message when there was none."""
    calls = message.get("tool_calls") or []
    if not calls:
        return [{"role": "user", "content": obs}]
    skipped = "Not executed: only the last tool call of a turn is executed."
    return [{"role": "tool", "tool_call_id": c.get("id"), "content": obs if k == len(calls) - 1 else skipped}
            for k, c in enumerate(calls)]


def _rollout_http(agent, tasks, group_size: int, cfg: RolloutConfig, user, stats):
    """The same loop, lockstep, with `agent.complete(messages, tools, env=env)` as the policy. No tokens, so no
    budget: turns end it. An agent call that fails (users.UserError) or outlasts env_timeout marks its episode
    failed (end_reason "user_failure" or "env_timeout")."""
    from tqdm import tqdm

    episodes, env_list = _new_episodes(tasks, group_size, cfg, user)
    counts = {"time_generate": 0.0, "time_env": 0.0, "turns": 0}
    bar = tqdm(total=cfg.max_turns, desc="rollout turns (http agent)", disable=not cfg.progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=cfg.env_workers)
    try:
        t0 = time.perf_counter()
        _reset_all(pool, episodes, env_list, cfg)
        counts["time_env"] += time.perf_counter() - t0
        live = [i for i, ep in enumerate(episodes) if not ep.failed]
        while live:
            t0 = time.perf_counter()
            futures = [pool.submit(_timed, agent.complete, list(episodes[i].messages), [envs.TOOL_SCHEMA],
                                   env=env_list[i]) for i in live]
            replies = _outcomes(futures, cfg.env_timeout)
            counts["time_generate"] += time.perf_counter() - t0
            counts["turns"] += 1
            items, sent = [], []
            for i, (message, err, _) in zip(live, replies):
                ep = episodes[i]
                if err:
                    ep.info["turns"] += 1
                    ep.turn_rewards.append(0.0)
                    ep.turn_info.append({})
                    _fail(ep, f"agent endpoint: {err}", "env_timeout" if message is _TIMED_OUT else "user_failure")
                    continue
                message = {"role": "assistant", **{k: v for k, v in message.items() if k != "role"}}
                ep.messages.append(message)
                items.append((ep, env_list[i], tool_call_text(message)))
                sent.append(message)
            t0 = time.perf_counter()
            _step_all(pool, cfg, items)
            counts["time_env"] += time.perf_counter() - t0
            for (ep, _, _), message in zip(items, sent):
                if ep.messages[-1]["role"] == "tool":  # _step_all appended the observation as a tool message
                    obs = ep.messages.pop()["content"]
                    ep.messages += _observation_messages(message, obs)
            live = [i for i in live if "end_reason" not in episodes[i].info]
            bar.update(1)
            bar.set_postfix(live=len(live))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    _record_scores(episodes, env_list)
    if stats is not None:
        stats.update(counts)
    return episodes


def _record_scores(episodes, env_list):
    """info["score"]: the number the paper's evaluation reports for the episode (env.episode_score(): the sum of
    its turn rewards, or a gym's own metric such as TravelGym's per-aspect best answer)."""
    for ep, env in zip(episodes, env_list):
        ep.info["score"] = env.episode_score()


# ----------------------------------------------------------------------------------------------------------
# Transcripts


def write_transcripts(path, episodes, tokenizer=None, append: bool = False):
    """One JSON line per episode: gym, task_id, messages, turn_rewards, turn_info, failed, info. With a tokenizer and
    token ids, also `text` (the ids decoded: exactly what the policy saw) and the token counts."""
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for ep in episodes:
            rec = {"gym": ep.gym, "task_id": ep.info.get("task_id"), "messages": ep.messages,
                   "turn_rewards": ep.turn_rewards, "turn_info": ep.turn_info, "failed": ep.failed, "info": ep.info}
            if tokenizer is not None and ep.ids:
                rec["text"] = tokenizer.decode(ep.ids, skip_special_tokens=False)
                rec["num_tokens"], rec["num_generated"] = len(ep.ids), sum(ep.loss_mask)
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
