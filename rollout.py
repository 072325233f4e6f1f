"""Batched multi-turn rollouts: the policy talks to the gyms, token in and token out (UserRL, arXiv 2509.19736:
the framework's "groups of trajectories with turn-level rewards"; the original runs this loop in SGLang).

    cfg = RolloutConfig(max_turns=16, max_new_tokens=512)
    episodes = rollout(model, tokenizer, [("function", task), ...], group_size=8, cfg=cfg)   # a local HF model
    episodes = rollout(users.make_user("http", base_url=url, model="gpt-4o"), None, tasks, 1, cfg)  # HTTP agent
    write_transcripts("runs/x/eval.jsonl", episodes, tokenizer)

One call, with a local model:
1. All envs are reset (concurrently). A prompt is the chat template of [system, opening user message] with the
   tool schema. Each distinct prompt is prefilled ONCE and its KV cache is copied to the rows that share it (a
   GRPO group shares its prompt: nanochat's trick).
2. Each turn, all live episodes decode together, one token per row per step (temperature / top-p, or greedy),
   each row stopping at the end-of-turn token (eos) or at its cap.
3. The env/user steps of all live episodes run concurrently in a thread pool: a simulated user over HTTP is the
   slow part, so 32 replies cost about one reply's latency, not 32.
4. Each observation is wrapped as the chat template wraps a `tool` message, tokenised on its own, appended to
   the ids, and prefilled onto the KEPT cache in one batched forward. Finished episodes leave the batch.
The conversation is never decoded and re-tokenised: `Episode.ids` are exactly the tokens the policy saw and
sampled, and `loss_mask` is 1 exactly on the sampled ones (anchors: TRL #5224, verl #3960, rllm #272).

KV cache layout. Rows have different lengths: each layer's cache is a rectangle [rows, heads, columns, dim] plus a
0/1 mask over columns, passed to the model as the 2D attention mask over [cache + new]. A token's position id is
the number of real tokens before it in its row, given explicitly, so holes change no number (the key test
compares the log-probs with one plain forward over the final ids). New chunks are right-padded, so column 0 of
every row is real and no query ever has nothing to attend to (a fully masked sdpa row is NaN, and 0 * NaN would
leak into the real rows). Rows that finish a turn early feed masked holes until the batch's longest turn ends;
then the cache is compacted: finished episodes' rows are dropped and each row's real columns are moved left,
so holes never outlive one turn. The last token of each chunk is not prefilled but fed as the first decode step,
so the first token of a turn is sampled by the same code as every other one.

Log-probs are taken at sampling time: log_softmax(logits / temperature) of the sampled token, before top-p
truncation (greedy: temperature 1). The trainer recomputes them in a no-grad pass with its own training forward
for the PPO ratio, so the ratio's two sides share numerics (bf16, kernels, batch shapes); the gap between the
two is a diagnostic of the train/inference mismatch.

Simplifications and choices, each one line:
- One assistant generation is one turn, whatever it holds (as the original); the env parses the tool call.
- A turn with no tool call ends the episode with reward 0 (the original), unless `end_on_no_tool_call=False`.
- A turn that reaches `max_new_tokens` (or stops on another stop token) gets the end-of-turn token appended with
  loss_mask 0, so the template stays well formed, and its text still goes to the env.
- The episode budget counts every token after the prompt, env/user tokens included (the original's
  max_response_length); a turn cut by it ends the episode (end_reason "budget", reward 0, no env step).
- `ids` end at the last assistant turn: the final observation is in `messages` but not tokenised (nothing
  follows it).
- A `users.UserError` from one env marks only that episode failed (end_reason "user_failure"); the batch goes on.
- The chat template is called without extra kwargs (Qwen3: its default thinking mode).
- Full attention is assumed: a sliding-window layer would measure its window in cache columns, which holes stretch.
"""
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

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
    env_workers: int = 128
    """threads for concurrent env/user calls (the original allows 128 requests in flight)"""
    progress: bool = True
    """show a tqdm bar over turns"""

    def __post_init__(self):
        if self.max_turns < 1 or self.max_new_tokens < 1 or self.max_episode_tokens < 1 or self.env_workers < 1:
            raise ValueError("max_turns, max_new_tokens, max_episode_tokens and env_workers must be >= 1, got "
                             f"{self.max_turns}, {self.max_new_tokens}, {self.max_episode_tokens}, {self.env_workers}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1 (or greedy), got {self.temperature}, {self.top_p}")


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
    turn_spans: list = field(default_factory=list)
    """(start, end) of each assistant turn in `ids`, half-open: its sampled tokens plus its end-of-turn token"""
    messages: list = field(default_factory=list)
    """the conversation as chat messages (system, user, assistant, tool), for transcripts and SFT data. Assistant
    content is the sampled text decoded (end-of-turn token stripped). Rendered by the template, these messages give
    `ids` back as text, but not always as tokens: re-tokenising can split the sampled text differently, and Qwen3's
    own template rewrites the <think> blocks of earlier turns. Hence `ids`, never a re-rendering, for training."""
    failed: bool = False
    """a user/endpoint failure ended it: the trainer leaves it out of the loss and counts it"""
    info: dict = field(default_factory=dict)
    """end_reason (done / max_turns / budget / no_tool_call / user_failure), task_id, turns, prompt_tokens,
    time_env (seconds in this episode's env/user calls), error (when failed)"""


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


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False):
    """One token per row of `logits` [B, V] and its log-prob under softmax(logits / temperature), before top-p.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (always at least one) and
    samples from it renormalised. Greedy takes the argmax and reports the temperature-1 log-prob."""
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
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1)
        tokens = order.gather(1, choice)[:, 0]
    else:
        tokens = torch.multinomial(probs, 1)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------
# The batched KV cache: forward over [cache + new] with explicit positions, and compaction between turns


class _Batch:
    """The live rows' KV cache, its column mask and each row's next position id."""

    def __init__(self, model, pad_id: int):
        from transformers import DynamicCache

        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)
        # transformers renamed `past_key_values` to `cache` (5.x deprecates the old name); use what this model takes.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.slots = 0  # positions computed, holes and padding included (the cost)
        self.real = 0  # real tokens fed

    def forward(self, ids: torch.Tensor, new_mask: torch.Tensor, logits: bool = True):
        """Feed `ids` [B, L] (real where `new_mask` is 1, right-padded) after the cache; the last column's logits."""
        if self.mask.shape[0] == 0:
            self.mask = self.mask.new_zeros(ids.shape[0], 0)
            self.pos = self.pos.new_zeros(ids.shape[0])
        position_ids = self.pos[:, None] + torch.arange(ids.shape[1], device=self.device)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        # A prefill needs no logits: an empty index list skips the lm_head (B x vocab floats per call otherwise).
        keep = 1 if logits else torch.zeros(0, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: self.cache})
        self.pos = self.pos + new_mask.sum(dim=1)
        self.slots += ids.numel()
        self.real += int(new_mask.sum())
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
        # A stable sort on "is a hole" lists each row's real columns first, in order.
        cols = torch.sort(1 - mask, dim=1, stable=True).indices[:, :width]
        for layer in self.cache.layers:  # transformers' DynamicLayer holds `keys`/`values` [B, heads, T, dim]
            for name in ("keys", "values"):
                t = getattr(layer, name)[rows_t]
                idx = cols[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                setattr(layer, name, t.gather(2, idx))
        self.mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
        self.pos = self.pos[rows_t]


# ----------------------------------------------------------------------------------------------------------
# Env/user calls (shared by the local-model and the HTTP-agent loops)


def _timed(fn, *args, **kwargs):
    """(result, error message or None, seconds): a users.UserError is caught and returned, anything else raises."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs), None, time.perf_counter() - t0
    except _user_error() as e:
        return None, f"{type(e).__name__}: {e}", time.perf_counter() - t0


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
                                          eval_mode=cfg.eval_mode))
            episodes.append(Episode(gym=gym, info={"task_id": task.get("id"), "turns": 0, "time_env": 0.0}))
    return episodes, env_list


def _fail(ep: Episode, error: str):
    ep.failed = True
    ep.info["end_reason"] = "user_failure"
    ep.info["error"] = error


def _reset_all(pool, episodes, env_list) -> list:
    """Reset every env concurrently; the prompt messages of each episode (None where the user failed)."""
    results = list(pool.map(lambda env: _timed(prompt_messages, env), env_list))
    out = []
    for ep, (msgs, err, secs) in zip(episodes, results):
        ep.info["time_env"] += secs
        if err:
            _fail(ep, err)
        else:
            ep.messages = msgs
        out.append(msgs)
    return out


_NO_TOOL_CALL = object()


def _step_all(pool, cfg, items):
    """Run env.step for every (episode, env, text) concurrently. A turn with no tool call ends its episode first
    (when cfg.end_on_no_tool_call); returns, per item, (obs, reward, done, info) or None when the episode ended."""
    def one(item):
        ep, env, text = item
        if cfg.end_on_no_tool_call:
            try:
                envs.parse_action(text)
            except envs.ActionError as e:
                if e.missing:
                    return _NO_TOOL_CALL, None, 0.0
        return _timed(env.step, text)

    results = []
    for (ep, env, text), (res, err, secs) in zip(items, pool.map(one, items)):
        ep.info["time_env"] += secs
        ep.info["turns"] += 1
        if res is _NO_TOOL_CALL:
            ep.turn_rewards.append(0.0)
            ep.info["end_reason"] = "no_tool_call"
            results.append(None)
        elif err:
            ep.turn_rewards.append(0.0)
            _fail(ep, err)
            results.append(None)
        else:
            obs, reward, done, info = res
            ep.turn_rewards.append(float(reward))
            ep.messages.append({"role": "tool", "content": obs})
            if done:
                ep.info["end_reason"] = "max_turns" if info.get("truncated") else "done"
            elif ep.info["turns"] >= cfg.max_turns:
                ep.info["end_reason"] = "max_turns"
            results.append(None if done or "end_reason" in ep.info else res)
    return results


# ----------------------------------------------------------------------------------------------------------
# The rollout with a local model


@torch.no_grad()
def rollout(model, tokenizer, tasks, group_size: int, cfg: RolloutConfig, user=None, stats: dict | None = None):
    """`group_size` episodes per (gym_name, task_dict) in `tasks`, returned grouped in the order of `tasks`.

    `model` is a transformers causal LM (run in eval mode here, its mode restored after), or an HTTP agent: any
    object with `.complete(messages, tools) -> assistant message dict` (users.py's http client; `tokenizer` may
    then be None, and episodes carry messages and rewards but no tokens). `user` is passed to envs.make_env
    (None: the scripted user). If `stats` is a dict it receives this call's figures: time_generate (s in model
    forwards, sampling and token bookkeeping), time_env (s of wall time in the concurrent env/user phases: where
    simulated users spend theirs), tokens_generated, tokens_prefill (tokens fed that the policy did not just
    sample), tokens_fed (all real tokens fed), slots_fed (positions computed, padding and holes included), turns."""
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
    eos = tokenizer.eos_token_id
    stop_ids = {eos} | set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    wrapper = observation_wrapper(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # holes are masked: any id works
    counts = {"time_generate": 0.0, "time_env": 0.0, "tokens_generated": 0, "tokens_prefill": 0, "turns": 0}
    batch = _Batch(model, pad_id)
    bar = tqdm(total=cfg.max_turns, desc="rollout turns", disable=not cfg.progress, leave=False)
    with ThreadPoolExecutor(max_workers=cfg.env_workers) as pool:
        t0 = time.perf_counter()
        prompts = _reset_all(pool, episodes, env_list)
        counts["time_env"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        live = [i for i, ep in enumerate(episodes) if not ep.failed]
        for i in live:
            _append(episodes[i], render_ids(tokenizer, prompts[i], add_generation_prompt=True), 0)
            episodes[i].info["prompt_tokens"] = len(episodes[i].ids)
        # Prefill each distinct prompt once (minus its last token, fed by the first decode step), then copy its
        # cache rows to every episode that shares it.
        distinct = {}
        rows = [distinct.setdefault(tuple(episodes[i].ids[:-1]), len(distinct)) for i in live]
        if live:
            batch.prefill([list(k) for k in distinct])
            batch.keep(rows)
        counts["tokens_prefill"] += sum(len(k) for k in distinct) + len(live)
        pending = {i: episodes[i].ids[-1:] for i in live}  # tokens in an episode's ids but not yet in the cache
        counts["time_generate"] += time.perf_counter() - t0

        while live:
            t0 = time.perf_counter()
            batch.prefill([pending[i][:-1] for i in live])
            toks, lps, n = _decode(batch, [pending[i][-1] for i in live], [episodes[i] for i in live], cfg, stop_ids)
            items, stepped = [], []
            for r, i in enumerate(live):
                gen = toks[r, :n[r]].tolist()
                counts["tokens_generated"] += len(gen)
                pending[i] = _close_turn(episodes[i], gen, lps[r, :n[r]].tolist(), eos, stop_ids, tokenizer, cfg)
                if "end_reason" not in episodes[i].info:
                    items.append((episodes[i], env_list[i], episodes[i].messages[-1]["content"]))
                    stepped.append(i)
            counts["time_generate"] += time.perf_counter() - t0
            counts["turns"] += 1

            t0 = time.perf_counter()
            results = _step_all(pool, cfg, items)
            counts["time_env"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            for i, res in zip(stepped, results):
                ep = episodes[i]
                if res is None:
                    continue
                piece = observation_ids(tokenizer, wrapper, res[0])
                if len(ep.ids) + len(piece) - ep.info["prompt_tokens"] >= cfg.max_episode_tokens:
                    ep.info["end_reason"] = "budget"  # no room left to generate even one token after it
                    continue
                _append(ep, piece, 0)
                pending[i] += piece
            survivors = [r for r, i in enumerate(live) if "end_reason" not in episodes[i].info]
            live = [live[r] for r in survivors]
            if live:
                batch.keep(survivors)
                counts["tokens_prefill"] += sum(len(pending[i]) - 1 for i in live)  # all but the sampled token
            counts["time_generate"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(live=len(live))
    bar.close()
    _record_scores(episodes, env_list)
    counts["slots_fed"], counts["tokens_fed"] = batch.slots, batch.real
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
        ep.info["turns"] += 1
        ep.info["end_reason"] = "budget"
    return unfed


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _decode(batch: _Batch, first: list, live: list, cfg: RolloutConfig, stop_ids: set):
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
    toks, lps = [], []
    for _ in range(int(limits.max())):
        logits = batch.forward(inp[:, None], active.long()[:, None])
        tok, lp = sample_tokens(logits, cfg.temperature, cfg.top_p, cfg.greedy)
        toks.append(tok)
        lps.append(lp)
        count += active.long()
        active &= ~(torch.isin(tok, stop_t) | (count >= limits))
        if not active.any():
            break
        inp = torch.where(active, tok, torch.full_like(tok, batch.pad_id))
    return torch.stack(toks, 1).cpu(), torch.stack(lps, 1).float().cpu(), count.tolist()


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
    """The same loop with `agent.complete(messages, tools, env=env)` as the policy. No tokens, so no budget: turns end it.
    An agent endpoint failure (users.UserError) marks the episode failed, end_reason "user_failure"."""
    from tqdm import tqdm

    episodes, env_list = _new_episodes(tasks, group_size, cfg, user)
    counts = {"time_generate": 0.0, "time_env": 0.0, "turns": 0}
    bar = tqdm(total=cfg.max_turns, desc="rollout turns (http agent)", disable=not cfg.progress, leave=False)
    with ThreadPoolExecutor(max_workers=cfg.env_workers) as pool:
        t0 = time.perf_counter()
        _reset_all(pool, episodes, env_list)
        counts["time_env"] += time.perf_counter() - t0
        live = [i for i, ep in enumerate(episodes) if not ep.failed]
        while live:
            t0 = time.perf_counter()
            replies = list(pool.map(lambda i: _timed(agent.complete, list(episodes[i].messages), [envs.TOOL_SCHEMA],
                                                     env=env_list[i]), live))  # the expert (an oracle) reads its env
            counts["time_generate"] += time.perf_counter() - t0
            counts["turns"] += 1
            items, sent = [], []
            for i, (message, err, _) in zip(live, replies):
                ep = episodes[i]
                if err:
                    ep.info["turns"] += 1
                    ep.turn_rewards.append(0.0)
                    _fail(ep, f"agent endpoint: {err}")
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
    """One JSON line per episode: gym, task_id, messages, turn_rewards, failed, info. With a tokenizer and token
    ids, also `text` (the ids decoded: exactly what the policy saw) and the token counts."""
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for ep in episodes:
            rec = {"gym": ep.gym, "task_id": ep.info.get("task_id"), "messages": ep.messages,
                   "turn_rewards": ep.turn_rewards, "failed": ep.failed, "info": ep.info}
            if tokenizer is not None and ep.ids:
                rec["text"] = tokenizer.decode(ep.ids, skip_special_tokens=False)
                rec["num_tokens"], rec["num_generated"] = len(ep.ids), sum(ep.loss_mask)
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
