"""The SFT cold start: supervised fine-tuning on good episodes before GRPO (UserRL, arXiv 2509.19736, section 4;
the paper's finding 1: the cold start is what lets RL improve a raw model).

    python eval.py --agent expert --split train --passes 4 --out runs/expert     # demonstrations (or an API model)
    python train.py --algo sft --sft_data runs/expert/episodes.jsonl --out_dir runs/sft
    python train.py --algo grpo --model runs/sft/final ...                      # GRPO from the SFT export

Data: eval.py's episodes.jsonl (any agent: the expert, an API model, a past run; failed episodes and episodes
with a cut turn are dropped, `--sft_min_score x` keeps episodes scoring at least x), or the original UserRL SFT
layout (LLaMA-Factory's ShareGPT: `conversations` with from = human / gpt / function_call / observation, plus
`system` and `tools`).

Tokens: the layout rollout.py builds, from the same functions, so SFT and RL train on identical token sequences:
the prompt is `rollout.render_ids(system + first user message, tools=[envs.TOOL_SCHEMA])` with the assistant
header, each assistant turn is its text encoded plus the end-of-turn token (loss 1), and each observation is
`rollout.observation_ids` (the template's tool-message wrapping up to the next assistant header; loss 0). As in
the rollout, the ids end at the last assistant turn. The loss is the mean negative log-likelihood of the
assistant tokens (the fused chunked log-prob of grpo.token_logprobs on those positions only), with AdamW,
linear warm-up then cosine decay, and batches drawn from length buckets (similar lengths together, so little
padding).

Simplifications, each one line:
- The `tools` column of ShareGPT data is not read: every prompt renders the one tool, envs.TOOL_SCHEMA, as the
  rollout does.
- Every message after an assistant turn up to the next one is the env's reply; the last of them is its
  observation (an HTTP agent's skipped parallel calls get a placeholder, as in rollout.py).
- Examples longer than `max_tokens` are dropped (and counted), not truncated: a cut episode teaches half a task.
"""
import dataclasses
import json
import math
import random
from pathlib import Path

import torch

import distributed
import rollout as rollout_lib
from grpo import chunk_tokens, token_logprobs
from models import head_weight, hidden_states, pad_batch

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}


class SFTDataError(ValueError):
    """SFT data that cannot be used; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------------------------
# Reading the data


def from_sharegpt(record: dict, where: str) -> list[dict]:
    """One ShareGPT record (LLaMA-Factory's layout, as the original's sft/merged_gym_sft.json) as chat messages."""
    convo = record.get("conversations")
    if not isinstance(convo, list) or not convo:
        raise SFTDataError(f"{where}: field 'conversations' must be a non-empty list")
    messages = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
    for k, turn in enumerate(convo):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise SFTDataError(f"{where}: conversations[{k}] must be an object with 'from' (one of "
                               f"{', '.join(SHAREGPT_ROLES)}) and a text 'value'")
        text = turn["value"]
        if turn["from"] == "function_call":
            text = function_call_text(text, f"{where}: conversations[{k}]")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": text})
    return messages


def function_call_text(value: str, where: str) -> str:
    """A ShareGPT `function_call` value (JSON: one call {"name", "arguments"} or a list of them) as the text a
    policy writes for it: each call as `<tool_call>\\n{json}\\n</tool_call>` (the Qwen layout the env parses)."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise SFTDataError(f"{where}: a function_call value must be JSON, got {value[:60]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls):
        raise SFTDataError(f"{where}: a function_call value must be {{\"name\": ..., \"arguments\": ...}} or a list "
                           "of them")
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                     + "\n</tool_call>" for c in calls)


def read_sft_data(path: str, min_score: float | None = None) -> list[dict]:
    """Conversations from episodes.jsonl (eval.py's lines) or ShareGPT records (a JSON array or JSON lines), each
    {"messages", "gym", "score", "where"}. Failed episodes are dropped, and so are episodes the budget cut short
    (their last turn is half a turn) and episodes with a turn max_new_tokens cut ("cut_turns": its text would be
    trained to end with the end-of-turn token mid-sentence); with `min_score`, so are episodes scoring below it. A
    record without a score, such as ShareGPT's, passes a min_score of 0 or less (no episode scores below 0 in these
    gyms) and is an error above it: it cannot be filtered."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SFTDataError(f"{path}: cannot read the SFT data ({e.strerror})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = None
    if isinstance(records, list):  # a JSON array (LLaMA-Factory's files); anything else is read as JSON lines
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SFTDataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                where.append(f"{path}, line {n}")
    out = []
    for rec, w in zip(records, where):
        if not isinstance(rec, dict):
            raise SFTDataError(f"{w}: expected a JSON object")
        if rec.get("failed") or rec.get("end_reason") == "budget" or rec.get("cut_turns"):
            continue
        if "messages" in rec:
            messages = rec["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         for m in messages):
                raise SFTDataError(f"{w}: field 'messages' must be a list of {{role, content}} objects")
        elif "conversations" in rec:
            messages = from_sharegpt(rec, w)
        else:
            raise SFTDataError(f"{w}: neither an episode (field 'messages') nor a ShareGPT record (field "
                               "'conversations')")
        score = rec.get("score")
        if min_score is not None and (min_score > 0 or isinstance(score, (int, float))):
            if not isinstance(score, (int, float)):
                raise SFTDataError(f"{w}: --sft_min_score needs a score on every record and this one has none")
            if score < min_score:
                continue
        out.append({"messages": messages, "gym": rec.get("gym"), "score": score, "where": w})
    return out


# ----------------------------------------------------------------------------------------------------------
# The token layout (rollout.py's)


def turns_of(messages: list, where: str = "conversation") -> tuple[list, list]:
    """(prompt messages [system, user], [(assistant text, observation or None), ...])."""
    if len(messages) < 3 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        raise SFTDataError(f"{where}: a conversation must start with a system and a user message and hold at least "
                           "one assistant turn")
    turns = []
    for m in messages[2:]:
        if m["role"] == "assistant":
            turns.append([rollout_lib.tool_call_text(m), None])
        elif not turns:
            raise SFTDataError(f"{where}: a second {m['role']!r} message before the first assistant turn")
        elif turns[-1][1] is None:  # the first reply after a turn: with several tool calls, the one holding the
            turns[-1][1] = m.get("content") or ""  # env's reply (rollout._observation_messages)
    if not turns:
        raise SFTDataError(f"{where}: no assistant turn")
    return messages[:2], [tuple(t) for t in turns]


def episode_tokens(tokenizer, messages: list, wrapper=None, where: str = "conversation") -> tuple[list, list]:
    """(ids, loss_mask) of one conversation in the rollout's layout: prompt (0), each assistant turn's text + eos
    (1), each observation between turns (0); nothing after the last assistant turn."""
    wrapper = wrapper or rollout_lib.observation_wrapper(tokenizer)
    prompt, turns = turns_of(messages, where)
    ids = list(rollout_lib.render_ids(tokenizer, prompt, add_generation_prompt=True))
    mask = [0] * len(ids)
    for k, (said, obs) in enumerate(turns):
        piece = tokenizer.encode(said, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids += piece
        mask += [1] * len(piece)
        if k < len(turns) - 1:
            piece = rollout_lib.observation_ids(tokenizer, wrapper, obs or "")
            ids += piece
            mask += [0] * len(piece)
    return ids, mask


def build_examples(tokenizer, conversations: list, max_tokens: int) -> tuple[list, int]:
    """([(ids, loss_mask)], number dropped for being longer than max_tokens)."""
    wrapper = rollout_lib.observation_wrapper(tokenizer)
    out, dropped = [], 0
    for c in conversations:
        ids, mask = episode_tokens(tokenizer, c["messages"], wrapper, c.get("where", "conversation"))
        if len(ids) > max_tokens:
            dropped += 1
        else:
            out.append((ids, mask))
    return out, dropped


# ----------------------------------------------------------------------------------------------------------
# Batches, schedule, loss (pure pieces)


def length_batches(lengths: list[int], batch_size: int, rng: random.Random, window: int = 50) -> list[list[int]]:
    """One epoch's batches of example indices: shuffle, sort each window of `window` batches by length, cut into
    batches, shuffle the batches. Similar lengths share a batch (little padding) and the order still varies."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for a in range(0, len(order), span):
        chunk = sorted(order[a:a + span], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, base_lr: float, warmup: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warm-up over the first `warmup`
    fraction of the steps, then cosine decay to 0 (LLaMA-Factory's cosine schedule, warm-up ratio 0.1, one step
    earlier: its first step has learning rate 0, ours 1 / n_warm of the peak)."""
    n_warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step < n_warm:
        return base_lr * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sft_loss_sum(model, ids, attn, lmask, chunk_mb: float = 0, bf16: bool = False) -> torch.Tensor:
    """The summed negative log-likelihood of the loss-mask targets. Only the final hidden states of those
    positions reach the vocab projection (grpo.token_logprobs, chunked): SFT uses the same fused log-prob as GRPO."""
    h = hidden_states(model, ids, attn, bf16)[:, :-1][lmask]
    w = head_weight(model)
    logp = token_logprobs(h, w, ids[:, 1:][lmask], chunk_size=chunk_tokens(w.shape[0], chunk_mb, ids.device))
    return -logp.sum()


@torch.no_grad()
def mean_loss(model, examples: list, pad_id: int, device, micro_batch_size: int = 8, chunk_mb: float = 0) -> float:
    """The mean negative log-likelihood per loss token over `examples` [(ids, loss_mask)] (no gradient)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for a in range(0, len(examples), micro_batch_size):
        ids, attn, lmask = pad_batch(examples[a:a + micro_batch_size], pad_id, device)
        total += float(sft_loss_sum(model, ids, attn, lmask, chunk_mb))
        n += int(lmask.sum())
    model.train(was_training)
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------------------
# The loop


def total_steps(n_examples: int, cfg) -> int:
    """The run's SFT steps: cfg.sft_steps, or (-1) as many as cfg.sft_epochs passes over the data take."""
    if cfg.sft_steps >= 0:
        return cfg.sft_steps
    return max(1, math.ceil(cfg.sft_epochs * math.ceil(n_examples / cfg.sft_batch_size)))


def batches_forever(lengths: list[int], batch_size: int, seed: int):
    """Length-bucketed batches, epoch after epoch (a new shuffle each epoch); the same on every rank."""
    rng = random.Random(seed)
    while True:
        yield from length_batches(lengths, batch_size, rng)


def train_sft(model, optimizer, examples: list, cfg, pad_id: int, start: int = 0, on_step=None,
              bf16: bool = False) -> list[float]:
    """SFT optimizer steps `start`..total on `examples` [(ids, loss_mask)]; returns each step's mean token loss.
    `cfg` is the run's train.Config: its sft_* fields, micro_batch_size, grad_clip, seed and loss.chunk_mb.

    Every rank draws the same batch and trains on its share (every world-th conversation); each token's loss is
    divided by the batch's token count over ALL ranks, and the gradients are summed over micro-batches and ranks
    (distributed.py), so the update is the token-mean of the whole batch however it is cut. `on_step(step,
    stats)` runs after each optimizer step (logging, checkpoints)."""
    rank, world = distributed.rank(), len(distributed.gather(None))
    device = next(model.parameters()).device
    total = total_steps(len(examples), cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batches = batches_forever([len(x) for x, _ in examples], cfg.sft_batch_size, cfg.seed)
    for _ in range(start):  # a resumed run draws the batches it would have drawn
        next(batches)
    model.train()
    losses = []
    for step in range(start, total):
        batch = next(batches)
        n_tok = sum(sum(examples[i][1][1:]) for i in batch)
        mine = [examples[i] for i in batch[rank::world]]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg.sft_lr, cfg.sft_warmup)
        loss_sum = 0.0
        slices = distributed.micro_slices(len(mine), cfg.micro_batch_size, model)
        for sl in slices:
            part = mine[sl] or [([pad_id, pad_id], [0, 0])]  # FSDP: a rank out of data still joins the forward
            ids, attn, lmask = pad_batch(part, pad_id, device)
            loss = sft_loss_sum(model, ids, attn, lmask, cfg.loss.chunk_mb, bf16) / max(n_tok, 1)
            loss.backward()
            loss_sum += loss.item()
        norm = distributed.optimizer_step(model, optimizer, params, cfg.grad_clip)
        loss_sum = distributed.all_reduce_sums({"loss": loss_sum})["loss"]
        losses.append(loss_sum)
        if on_step is not None:
            on_step(step + 1, {"sft_loss": loss_sum, "grad_norm": norm, "lr": optimizer.param_groups[0]["lr"],
                               "tokens": n_tok, "epoch": (step + 1) * cfg.sft_batch_size / len(examples)})
    return losses


# ----------------------------------------------------------------------------------------------------------
# The run (python train.py --algo sft; the recipe's first stage)


def conversations_for(cfg, tasks, run_dir: Path, rank: int) -> list[dict]:
    """The run's SFT data: --sft_data, or (when it is empty) `sft_expert_passes` expert episodes of every training
    task, played now and written to RUN/expert-episodes.jsonl in eval.py's format (the same on every rank)."""
    if cfg.sft_data:
        return read_sft_data(cfg.sft_data, cfg.sft_min_score)
    import eval as evaluation

    work = [(g, t, p) for p in range(cfg.sft_expert_passes) for g in sorted(tasks.train) for t in tasks.train[g]]
    records = evaluation.play("expert", None, work, evaluation.eval_settings(cfg.rollout), seed=cfg.seed)
    path = run_dir / "expert-episodes.jsonl"
    if rank == 0:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return [{"messages": r["messages"], "gym": r["gym"], "score": r["score"], "where": f"{path}: {r['gym']} "
             f"{r['task_id']} pass {r['pass']}"} for r in records
            if not r["failed"] and r["score"] >= cfg.sft_min_score]


def run(cfg, run_dir: Path, tasks, ranks, user_url: str | None, at: dict):
    """SFT in `run_dir` (train.py's in_run_folder claimed it): the model (from its latest checkpoint on --resume),
    the data, then `train_sft` with one metrics.jsonl line per step, a resumable checkpoint every `save_every`
    steps, an evaluation every `eval_every` steps and at the end (RUN/evals.jsonl, phase "sft"), and RUN/final, the
    Hugging Face folder that is the next stage's --model. `user_url`: the user server started for the run, if any."""
    import checkpoints
    import eval as evaluation
    import users
    from models import load_model, refresh_rollout_copy, rollout_copy

    rank, world, device = ranks
    ckpt = checkpoints.latest_checkpoint(run_dir) if cfg.resume else None
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)  # on the CPU; on resume the checkpoint replaces these
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.dtype == "bfloat16"
    # the export needs the whole model: under FSDP a full copy (bf16 with --dtype bfloat16), refreshed at the end
    plain = model
    if bf16 or cfg.fsdp:
        plain = rollout_copy(model, torch.bfloat16 if bf16 else torch.float32).to(device)
    if cfg.fsdp:  # each block goes to the device as it is sharded
        distributed.shard(model, bf16)
    else:
        model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.sft_weight_decay,
                                  fused=device.type == "cuda")
    start = checkpoints.load_checkpoint(ckpt, model, optimizer, rank)["step"] if ckpt else 0
    examples, dropped = build_examples(tokenizer, conversations_for(cfg, tasks, run_dir, rank), cfg.sft_max_tokens)
    if not examples:
        raise SFTDataError(f"no SFT example left ({cfg.sft_data or 'expert episodes'}: {dropped} longer than "
                           f"--sft_max_tokens {cfg.sft_max_tokens}, the rest failed or scored below --sft_min_score)")
    at["steps"] = total = total_steps(len(examples), cfg)
    user_cfg = dataclasses.replace(cfg.user, base_url=user_url) if user_url else cfg.user
    user = users.from_config(user_cfg) if cfg.eval_every else None
    if rank == 0:
        config = dataclasses.asdict(cfg) | {"out_dir": str(run_dir)}
        checkpoints.start_run(run_dir, config, start if cfg.resume else None)
        n_tok = sum(len(x) for x, _ in examples)
        print(f"run folder {run_dir} | SFT of {cfg.model} | {len(examples)} conversations ({n_tok:,} tokens; "
              f"{dropped} over {cfg.sft_max_tokens} left out) | {total} steps of {cfg.sft_batch_size} | {world} rank(s)",
              flush=True)

    def on_step(n: int, stats: dict):
        at["step"] = n
        m = {"step": n, **stats}
        if cfg.eval_every and (n % cfg.eval_every == 0 or n == total):
            if plain is not model:  # generation runs on the whole model (a sharded one would need every rank in step)
                refresh_rollout_copy(plain, model)
            results = evaluation.evaluate_ranks(plain, tokenizer, tasks.test, evaluation.eval_settings(cfg.rollout),
                                                user=user)
            m.update(evaluation.eval_metrics(results))
            if rank == 0:
                evaluation.log_eval(run_dir, "sft", n, results)
            model.train()
        if rank == 0:
            checkpoints.append_step(run_dir, m, [], tokenizer)
            if n % max(1, total // 10) == 0 or n == total:
                print(f"sft step {n:5d}/{total} | loss {m['sft_loss']:.3f} | lr {m['lr']:.2e} | epoch "
                      f"{m['epoch']:.2f}" + (f" | eval avg {evaluation.fmt(m['eval/avg'])}" if "eval/avg" in m else ""),
                      flush=True)
        if cfg.save_every and n % cfg.save_every == 0:
            checkpoints.save_checkpoint(run_dir, n, model, optimizer, {}, rank, cfg.keep_last)

    at["step"] = start
    train_sft(model, optimizer, examples, cfg, tokenizer.pad_token_id, start=start, on_step=on_step, bf16=bf16)
    if start < total or not (run_dir / "final").exists():  # RUN/final: the next stage's --model
        if plain is not model:
            refresh_rollout_copy(plain, model)
        if rank == 0:
            checkpoints.export_model(run_dir / "final", plain, tokenizer)
        distributed.barrier()
