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

The model side (sampling, the KV cache read in place, the decode steps) is engine.py; this file runs the episodes.

schedule="lockstep" is the simplest loop to read, kept for comparison (bench/rollout.py runs both): all episodes
decode a turn together on a cache that grows by torch.cat (transformers' DynamicCache) with a 0/1 column mask; rows
that ended their turn feed masked holes until the longest turn ends; then every env steps at once, all observations
are prefilled in one right-padded forward, and finished episodes' rows are dropped (the cache compacted).

Log-probs are taken at sampling time (engine.sample_tokens). Each episode gets a sampling seed from torch's RNG, and
its sampling noise is a function of (seed, position, token) only, so a seeded rollout repeats exactly whichever
rows share its decode steps, and both schedules sample the same episodes.

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
import gc
import heapq
import json
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

import envs
from engine import Engine, LockstepBatch, fp32_head, sample_tokens, token_noise

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
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1 (or greedy), got {self.temperature}, "
                             f"{self.top_p}")
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
    malformed_call), task_id, turns, cut_turns (turns max_new_tokens ended), prompt_tokens, time_env (seconds in
    this episode's env/user calls), score, error (when failed)"""


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
# The engine schedule: every episode on its own (the model side is engine.Engine)


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
                    src = holder.get(prompt)
                    if src is None:
                        fills.append((r, list(prompt), 0))
                        holder[prompt] = r
                    elif any(f[0] == src for f in fills):  # prefilled in this round: copied after the prefill
                        copies.append((src, r, len(prompt)))
                    else:  # copied now: a later admission of this round may take row src and prefill over it
                        engine.cache.copy_prefix(src, r, len(prompt))
                cached[i] = len(prompt)
                starts.append((i, episodes[i].ids[-1:]))

            now = time.perf_counter()  # observations back (or overdue): prefill and rejoin, or end
            for fut in [f for f, (_, t) in running.items() if f.done() or now - t > cfg.env_timeout]:
                i, _ = running.pop(fut)
                ep = episodes[i]
                outcome = fut.result() if fut.done() else None
                if outcome is None or outcome[2] > cfg.env_timeout:  # a call found done, late, after a long chunk
                    outcome = _timeout(cfg.env_timeout)  # is as late as one still running (lockstep's rule)
                obs = _record_step(ep, outcome, cfg)
                piece = None if obs is None else observation_ids(tokenizer, wrapper, obs)
                if piece is not None and _append_observation(ep, piece, cfg):
                    starts.append((i, unfed.pop(i) + piece))
                else:
                    finish(i)

            # A turn's pending tokens are prefilled but the last, which its first decode step feeds.
            fills += [(row[i], pending[:-1], cached[i]) for i, pending in starts]
            engine.prefill(fills)
            for src, dst, n in copies:  # after the prefill that may have written their source
                engine.cache.copy_prefix(src, dst, n)
            counts["tokens_prefill"] += sum(len(tokens) for _, tokens, _ in fills)
            for i, pending in starts:
                cached[i] += len(pending) - 1
                turn[i] = {"next": pending[-1], "limit": _turn_limit(episodes[i], cfg), "gen": [], "lps": []}

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
        if cfg.compile:  # compiling leaves reference cycles that hold the KV cache: free it now, not at some later
            gc.collect()  # collection (on a GPU the update needs that memory)
    counts.update(slots_fed=engine.slots, tokens_fed=engine.real, host_syncs=engine.syncs, rows=n_rows,
                  decode_steps=engine.steps, cache_bytes=engine.cache.nbytes,
                  cache_bytes_copied=engine.cache.bytes_copied)


# ----------------------------------------------------------------------------------------------------------
# The lockstep schedule: a growing cache over all live rows, one turn at a time


def _decode(batch: LockstepBatch, first: list, live: list, cfg: RolloutConfig, stop_ids: set, seeds: list):
    """Decode one turn for every live row: feed `first` (each row's last pending token), then sample until each
    row stops (a stop token, max_new_tokens, or the episode budget). Returns sampled tokens [B, S], their
    log-probs [B, S] and each row's count; rows that stopped feed masked holes until the longest is done."""
    device = batch.device
    limits = torch.tensor([_turn_limit(ep, cfg) for ep in live], device=device)
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
    batch = LockstepBatch(model, pad_id)
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
            piece = None if obs is None else observation_ids(tokenizer, wrapper, obs)
            if piece is not None and _append_observation(episodes[i], piece, cfg):
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
            with fp32_head(model):
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
    not end with eos is closed with one (loss_mask 0), unless the episode budget cut it: that ends the episode.
    A turn max_new_tokens cut is counted in info["cut_turns"] (its text stops mid-turn: SFT leaves such episodes
    out, as it would otherwise teach the end-of-turn token there)."""
    start = len(ep.ids)
    _append(ep, gen, 1, logprobs)
    unfed = gen[-1:]  # the last sampled token was never fed back
    ended = gen[-1] != eos and _used(ep) >= cfg.max_episode_tokens
    if not ended and gen[-1] not in stop_ids:
        ep.info["cut_turns"] += 1
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


def _used(ep: Episode) -> int:
    """Tokens of the episode budget spent: every token after the prompt, env/user tokens included."""
    return len(ep.ids) - ep.info["prompt_tokens"]


def _turn_limit(ep: Episode, cfg) -> int:
    """How many tokens the next turn may sample: max_new_tokens, or what is left of the episode budget."""
    return min(cfg.max_new_tokens, cfg.max_episode_tokens - _used(ep))


def _append_observation(ep: Episode, piece: list, cfg) -> bool:
    """Append an observation's tokens (loss_mask 0) if room for one more sampled token is left after them; else
    end the episode (end_reason "budget") without them. Returns whether the episode goes on."""
    if _used(ep) + len(piece) >= cfg.max_episode_tokens:
        ep.info["end_reason"] = "budget"
        return False
    _append(ep, piece, 0)
    return True


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
            episodes.append(Episode(gym=gym, info={"task_id": task.get("id"), "turns": 0, "cut_turns": 0,
                                                  "time_env": 0.0}))
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
    writes it (`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`); the env runs them in order
    (in evaluation the first only, see envs.Env._play)."""
    text = message.get("content") or ""
    if message.get("reasoning_content"):  # a served reasoning model's thinking, as the template would show it
        text = f"<think>\n{message['reasoning_content']}\n</think>\n\n{text}"
    for call in message.get("tool_calls") or []:
        f = call.get("function", call)
        args = f.get("arguments")
        if isinstance(args, str):  # the OpenAI API sends the arguments as a JSON string: written once, as an object
            try:
                args = json.loads(args)
            except ValueError:
                pass
        call_json = json.dumps({"name": f.get("name"), "arguments": args})
        text += "\n<tool_call>\n" + call_json + "\n</tool_call>"
    return text


def _observation_messages(message: dict, obs: str, first_only: bool) -> list:
    """The env's reply as the messages an OpenAI-compatible server accepts after `message`: one `tool` message per
    tool call id, or a `user` message when there was none. The first call's message holds the reply: with
    `first_only` (evaluation, where the env runs a turn's first call only, as the original's eval.py) it is that
    call's, otherwise every call ran, in order, and it holds the replies of them all (sft.turns_of reads it there)."""
    calls = message.get("tool_calls") or []
    if not calls:
        return [{"role": "user", "content": obs}]
    other = ("Not executed: only the first tool call of a turn is executed." if first_only else
             "Executed; the replies of this turn's calls are in its first tool message.")
    return [{"role": "tool", "tool_call_id": c.get("id"), "content": obs if k == 0 else other}
            for k, c in enumerate(calls)]


def _rollout_http(agent, tasks, group_size: int, cfg: RolloutConfig, user, stats):
    """The same loop, lockstep, with `agent.complete(messages, tools, env=env)` as the policy. No tokens, so no
    budget: turns end it. An agent call that fails (users.UserError) or outlasts env_timeout marks its episode
    failed (end_reason "user_failure" or "env_timeout")."""
    from tqdm import tqdm

    from users import CUT

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
                ep.info["cut_turns"] += bool(message.get(CUT))  # finish_reason "length"
                message = {"role": "assistant", **{k: v for k, v in message.items() if k not in ("role", CUT)}}
                ep.messages.append(message)
                items.append((ep, env_list[i], tool_call_text(message)))
                sent.append(message)
            t0 = time.perf_counter()
            _step_all(pool, cfg, items)
            counts["time_env"] += time.perf_counter() - t0
            for (ep, _, _), message in zip(items, sent):
                if ep.messages[-1]["role"] == "tool":  # _step_all appended the observation as a tool message
                    obs = ep.messages.pop()["content"]
                    ep.messages += _observation_messages(message, obs, cfg.eval_mode)
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
