"""Deliberate one-line bugs in the trainer, the loss, the rollout, the rewards, the run folder and the evaluation
settings, and whether the tests catch each one (the mutation habit of issue 16: a test suite is only as good as the
bugs it fails on).

    python tests/mutants.py              # every mutant: its targeted tests, one mutant at a time (~35 min, 2 cores)
    python tests/mutants.py --quick      # the mutants whose tests take seconds (loss, rewards, rollout, phase 3)
    python tests/mutants.py --only 3,17  # some of them, by number (--list prints the numbers)

The working tree is never changed: it is copied once to a temporary folder (the files git tracks plus the untracked
ones it does not ignore), each bug is applied to the copy, its targeted tests run there, and the file is put back.
A failing test catches the mutant; a mutant whose tests all pass survives, and is a gap in the suite. Before the
mutants, the targeted tests run on the unchanged copy: they must pass, or every mutant would look caught. A mutant
whose original text is not (or not exactly once) in its file is reported as stale, not run: the code moved on, and
the list needs the new text. The last line printed is one JSON object:
{"mutants": N, "caught": C, "survivors": [...], "stale": [...]} (N counts the mutants run; names are "file:number").

Not a test module: pytest collects only test_*.py, and nothing here is named test_*. Each entry below is
(file, original text, replacement, targeted tests, what the bug is); the targeted tests are the ones that should
fail, cheapest first (pytest stops at the first failure).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900
"""a mutant's tests that run longer than this are stopped; a hang counts as caught (the suite noticed)"""


@dataclass
class Mutant:
    file: str
    original: str
    replacement: str
    tests: tuple
    what: str
    quick: bool = False
    """its targeted tests take seconds (no training run): part of --quick"""


GOLDEN = "tests/test_golden.py::test_one_step_equals_the_update_written_out"
GOLDEN_STD, GOLDEN_MEAN = f"{GOLDEN}[std-kl-clip]", f"{GOLDEN}[mean-only]"
HAND = "tests/test_grpo.py::test_asymmetric_clip_k3_approx_kl_and_the_log_ratio_clamp_by_hand"
HAND0 = "tests/test_grpo.py::test_loss_equals_a_hand_computation"
FUSED = "tests/test_grpo.py::test_fused_loss_matches_naive_values_and_grads"
WEIGHTS = "tests/test_grpo.py::test_loss_weights_by_hand"
RESUME = "tests/test_train.py::test_resume_continues_exactly"
BEHAVIOURS = "tests/test_behaviours.py"
SETTINGS = f"{BEHAVIOURS}::test_every_reward_setting_reaches_the_advantages"
BUDGET = f"{BEHAVIOURS}::test_the_episode_budget_ends_an_episode_exactly_at_its_boundary"
EVAL = f"{BEHAVIOURS}::test_evaluation_plays_greedy_in_the_gyms_evaluation_settings"
MASK = "tests/test_rollout.py::test_loss_mask_is_exactly_the_sampled_tokens_under_greedy"
REWARDS = "tests/test_rewards.py"
FOLDER = "tests/test_run_folder.py"

MUTANTS = [
    # ---- grpo.py: the objective
    Mutant("grpo.py", "log_ratio = (logp - old_logprobs).clamp(-20, 20)", "log_ratio = logp - old_logprobs",
           (HAND,), "no clamp on the log-ratio", quick=True),
    Mutant("grpo.py", "ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)",
           "ratio.clamp(1 - cfg.clip_high, 1 + cfg.clip_low)",
           (HAND, GOLDEN_STD), "clip_low and clip_high swapped", quick=True),
    Mutant("grpo.py", "ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)",
           "ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_low)",
           (HAND, GOLDEN_STD), "clip_high ignored (clip_low on both sides)", quick=True),
    Mutant("grpo.py", '"approx_kl": (ratio - 1 - log_ratio).detach()', '"approx_kl": (-log_ratio).detach()',
           (HAND,), "approx_kl is k1, not k3", quick=True),
    Mutant("grpo.py", "capped = (advantages < 0) & (loss > cap)", "capped = loss > cap",
           (HAND0,), "dual clip applied to positive advantages too", quick=True),
    Mutant("grpo.py", "kl = (d.exp() - d - 1).clamp(max=10)", "kl = (d.exp() - 1).clamp(max=10)", (HAND0,),
           "KL to the reference is not k3", quick=True),
    Mutant("grpo.py", "inv_t = 1.0 / cfg.temperature", "inv_t = 1.0", (FUSED,),
           "the fused loss ignores the temperature", quick=True),
    Mutant("grpo.py", "gl = g_logp[a:a + k] * inv_t", "gl = g_logp[a:a + k]",
           ("tests/test_grpo.py::test_token_logprobs_matches_log_softmax_values_and_grads",),
           "token_logprobs' backward drops 1/T", quick=True),
    Mutant("grpo.py", "                g = g * inv_t", "                g = g", (FUSED,),
           "the fused gradient drops 1/T", quick=True),
    Mutant("grpo.py", "e.mul_((-g / s)[:, None])", "e.mul_((g / s)[:, None])", (FUSED,),
           "the fused gradient's softmax term has the wrong sign", quick=True),
    Mutant("grpo.py", "1.0 / max(n_tokens, 1), dtype=torch.float64)",
           "1.0 / max(sum(seq_lens), 1), dtype=torch.float64)",
           (WEIGHTS, GOLDEN_STD), "token-mean over the micro-batch, not the global count", quick=True),
    # ---- train.py: the step
    Mutant("train.py", "cfg.loss.temperature = 1.0 if cfg.rollout.greedy else cfg.rollout.temperature",
           "cfg.loss.temperature = 1.0",
           ("tests/test_checks.py::test_the_loss_temperature_is_the_rollouts", GOLDEN_STD),
           "the loss ignores the sampling temperature"),
    Mutant("train.py", "ids[:, 1:][sel], temperature=cfg.loss.temperature,", "ids[:, 1:][sel], temperature=1.0,",
           (GOLDEN_STD,), "old log-probs recomputed at temperature 1"),
    Mutant("train.py", "    for _ in range(cfg.ppo_epochs):", "    for _ in range(1):", (GOLDEN_STD,),
           "ppo_epochs ignored"),
    Mutant("train.py", "lr=cfg.lr, weight_decay=cfg.weight_decay,\n", "lr=cfg.lr, weight_decay=0.0,\n",
           (GOLDEN_MEAN,), "weight decay never reaches AdamW"),
    Mutant("train.py", "optimizer_step(model, optimizer, params, cfg.grad_clip)",
           'optimizer_step(model, optimizer, params, float("inf"))', (GOLDEN_STD,), "no gradient clipping"),
    Mutant("train.py", "rewards.group_advantages(scores, groups, cfg.use_std)",
           "rewards.group_advantages(scores, groups)",
           (GOLDEN_MEAN,), "use_std ignored by the group advantage"),
    Mutant("train.py", "kept = [j for j, e in enumerate(episodes) if not e.failed]",
           "kept = list(range(len(episodes)))",
           (GOLDEN_STD,), "failed episodes trained on"),
    Mutant("train.py", 'm = {"reward_mean": mean([r["reward"] for r in ok]),',
           'm = {"reward_mean": mean([r["reward"] for r in rows]),',
           (f"{BEHAVIOURS}::test_failed_episodes_count_only_as_failures_in_the_metrics",),
           "failed episodes count as zeros in reward_mean", quick=True),
    Mutant("train.py", '"tokens": int(sum(e.loss_mask)), "end"', '"tokens": len(e.ids), "end"',
           (f"{BEHAVIOURS}::test_failed_episodes_count_only_as_failures_in_the_metrics",),
           "response_tokens_mean counts the prompt and observations", quick=True),
    Mutant("eval.py", "replace(cfg, greedy=True,", "replace(cfg, greedy=False,", (EVAL,),
           "evaluation samples instead of greedy"),
    Mutant("eval.py", "replace(cfg, greedy=True, show_reward=False, eval_mode=True)",
           "replace(cfg, greedy=True, show_reward=False, eval_mode=False)", (EVAL,),
           "evaluation plays the gyms' training settings"),
    Mutant("train.py", "if task // cfg.mini_batch_size == k])", "if task % cfg.mini_batch_size == k])",
           (GOLDEN_STD,), "mini-batches hold the wrong tasks"),
    Mutant("train.py", "return loss_cfg.kl_coef > 0 or bool(advantages.any())", "return bool(advantages.any())",
           (f"{BEHAVIOURS}::test_with_kl_an_episode_without_advantage_still_trains",),
           "with KL on, zero-advantage episodes are skipped", quick=True),
    Mutant("models.py", "lmask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)", "lmask[i, :len(m)] = True",
           (GOLDEN_STD,), "the loss covers prompt and observation tokens"),
    Mutant("models.py", "attn.to(device), lmask[:, 1:].to(device)", "attn.to(device), lmask[:, :-1].to(device)",
           (GOLDEN_STD,), "loss positions off by one"),
    Mutant("train.py", 'cfg.loss.agg, int(totals["tokens"]),', "cfg.loss.agg, int(sum(lens[sl])),",
           (GOLDEN_STD,), "token mean per micro-batch, not per mini-batch"),
    Mutant("train.py", 'out["grad_norm"] = float(np.mean(norms))', 'out["grad_norm"] = float(np.max(norms))',
           (GOLDEN_STD,), "grad_norm metric is not the mean over updates"),
    Mutant("train.py", "task_of = [mine[j // cfg.group_size] for j", "task_of = [mine[0] for j", (GOLDEN_STD,),
           "every episode in one GRPO group"),
    Mutant("train.py", "rewards.turn_credits(e.turn_rewards, cfg.credit, cfg.gamma",
           'rewards.turn_credits(e.turn_rewards, "equalized", cfg.gamma', (SETTINGS,), "--credit ignored", quick=True),
    Mutant("train.py", "rewards.trajectory_score(e.turn_rewards, cfg.score, cfg.gamma)",
           "rewards.trajectory_score(e.turn_rewards, cfg.score, 0.8)", (SETTINGS,), "--gamma ignored by the score",
           quick=True),
    Mutant("train.py", "groups, cfg.use_std, cfg.lam)", "groups, cfg.use_std, 1.0)", (SETTINGS,), "--lam ignored",
           quick=True),
    Mutant("train.py", "group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)", "group.update(lr=cfg.lr)",
           (f"{FOLDER}::test_resume_records_what_the_overrides_change_and_keeps_the_checkpoints_model",),
           "--weight_decay on resume keeps the checkpoint's value"),
    Mutant("train.py", 'sampler.rng.setstate(state["sampler"])', "sampler.rng.getstate()", (RESUME,),
           "resume restarts the task sampler"),
    Mutant("train.py", 'start = state["step"]', "start = 0", (RESUME,), "resume starts again from step 1"),
    Mutant("train.py", "episodes[: cfg.transcripts], t.tokenizer)", "episodes, t.tokenizer)", (RESUME,),
           "--transcripts ignored"),
    Mutant("train.py", 'e.info["step"] = n', 'e.info["step"] = 0', (RESUME,), "transcripts do not carry their step"),
    Mutant("train.py", 'if m["failed_episodes"] * 2 > m["episodes"]:', 'if m["failed_episodes"] * 8 > m["episodes"]:',
           ("tests/test_checks.py::test_a_step_in_which_most_episodes_failed_says_so",),
           "the failure warning fires for a few failures"),
    Mutant("train.py", '            if totals["sequences"] == 0:  # the same on every rank\n'
                       '                continue\n', "",
           ("tests/test_train.py::test_a_mini_batch_with_no_episode_takes_no_optimizer_step",),
           "a mini-batch with no episode still takes an AdamW step (its momentum moves the weights)"),
    Mutant("train.py", "        where = keep_state_before(t, n, sampler, rng)\n        raise TooManyFailures(",
           "        where = \"nothing saved\"\n        raise TooManyFailures(",
           ("tests/test_reliability.py::test_a_stop_for_failures_keeps_the_steps_since_the_last_checkpoint",),
           "a stop for failed episodes loses the steps since the last checkpoint"),
    Mutant("train.py", "if not failed or len(failed) <= t.cfg.max_failed_frac * total:", "if True:",
           ("tests/test_reliability.py::test_a_step_with_too_many_failures_stops_the_run_naming_the_endpoint_and_"
            "reasons",),
           "--max_failed_frac never stops a step"),
    Mutant("train.py", 'check(cfg.score in rewards.SCORES, "score"', 'check(True, "score"',
           ("tests/test_train.py::test_bad_config_fails_before_any_model_is_loaded",),
           "an unknown --score passes the checks (and fails after the model loads)"),
    # ---- rollout.py: the token layout and the episode's contract
    Mutant("rollout.py", "ep.loss_mask += [mask] * len(ids)", "ep.loss_mask += [1] * len(ids)", (MASK,),
           "loss mask 1 on prompt and observations", quick=True),
    Mutant("rollout.py", "_append(ep, [eos], 0)", "_append(ep, [eos], 1)", (MASK,),
           "the closing eos of a capped turn is trained on", quick=True),
    Mutant("rollout.py", "ended = gen[-1] != eos and _used(ep) >= cfg.max_episode_tokens",
           "ended = gen[-1] != eos and _used(ep) > cfg.max_episode_tokens", (BUDGET,),
           "a turn that fills the budget exactly does not end the episode", quick=True),
    Mutant("rollout.py", "if _used(ep) + len(piece) >= cfg.max_episode_tokens:",
           "if _used(ep) + len(piece) > cfg.max_episode_tokens:", (BUDGET,),
           "an observation that fills the budget exactly is appended", quick=True),
    Mutant("rollout.py", "return min(cfg.max_new_tokens, cfg.max_episode_tokens - _used(ep))",
           "return cfg.max_new_tokens", (BUDGET,), "a turn's token cap ignores the budget left", quick=True),
    Mutant("rollout.py", "ep.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)",
           "ep.logprobs += [0.0] * len(ids)",
           ("tests/test_rollout.py::test_cached_multiturn_logprobs_equal_one_full_forward",),
           "sampling log-probs not stored", quick=True),
    Mutant("rollout.py", 'elif ep.info["turns"] >= cfg.max_turns:', 'elif ep.info["turns"] > cfg.max_turns:',
           ("tests/test_rollout.py::test_budget_and_max_turns_end_episodes",), "one turn past max_turns", quick=True),
    Mutant("rollout.py", "ep.turn_rewards.append(float(reward))", "ep.turn_rewards.append(0.0)", (BUDGET,),
           "the env's turn reward is dropped", quick=True),
    Mutant("engine.py", "        self.step = Engine._step\n", "        self.step, self.me = Engine._step, self\n",
           ("tests/test_rollout.py::test_the_kv_cache_is_freed_when_the_rollout_returns",),
           "the engine refers to itself: its KV cache waits for the cycle collector", quick=True),
    Mutant("engine.py", "    return u.log_().neg_().clamp_(min=2.0 ** -25)", "    return u.log_().neg_()",
           ("tests/test_rollout.py::test_no_token_of_probability_zero_is_ever_sampled",),
           "sampling noise can be -0.0: a token of probability 0 is sampled", quick=True),
    Mutant("engine.py", "    x.bitwise_xor_(_shift_right(x, 27)).mul_(mix2)\n", "",
           ("tests/test_rollout.py::test_token_noise_is_the_documented_splitmix64_stream",),
           "the sampling noise skips a round of splitmix64's mixing (tokens' noises correlate)", quick=True),
    Mutant("engine.py", "    head.forward = forward  #", "    forward = forward  #",
           ("tests/test_rollout.py::test_a_bf16_policy_samples_from_fp32_logits",),
           "a bf16 policy samples from its bf16 logits, not the trainer's fp32 ones", quick=True),
    Mutant("rollout.py", "                        engine.cache.copy_prefix(src, r, len(prompt))",
           "                        copies.append((src, r, len(prompt)))",
           ("tests/test_rollout.py::test_a_prompt_copied_from_a_row_that_the_same_round_refills",),
           "a prompt is copied after the same round has prefilled another prompt into its source row", quick=True),
    Mutant("rollout.py", "if outcome is None or outcome[2] > cfg.env_timeout:", "if outcome is None:",
           ("tests/test_rollout.py::test_an_env_call_found_done_after_its_timeout_times_out",),
           "an env call found done past env_timeout is accepted", quick=True),
    Mutant("engine.py", "            rows, columns = _bucket(rows), _bucket(columns)\n", "            pass\n",
           ("tests/test_rollout.py::test_compiled_rollouts_with_other_prompts_reuse_the_compiled_step",),
           "the compiled step's cache is sized per call: every call recompiles", quick=True),
    Mutant("models.py", "        return cast_parameters(build_tiny_model(tokenizer, seed=seed), dtype), tokenizer",
           "        return build_tiny_model(tokenizer, seed=seed).to(dtype), tokenizer",
           ("tests/test_models.py::test_a_model_loaded_in_bf16_keeps_its_rope_buffers",),
           "a tiny model loaded in bf16 rounds its RoPE buffers", quick=True),
    Mutant("rollout.py", "    ep.failed = True", "    ep.failed = False",
           ("tests/test_rollout.py::test_a_failing_user_fails_only_its_episodes",),
           "a user failure does not mark the episode failed", quick=True),
    Mutant("rollout.py", "pool = ThreadPoolExecutor(max_workers=cfg.env_workers)\n    try:  # shut down",
           "pool = ThreadPoolExecutor(max_workers=1)\n    try:  # shut down",
           (f"{BEHAVIOURS}::test_the_users_of_a_rollout_are_called_concurrently",),
           "env/user steps run one at a time", quick=True),
    # ---- rewards.py
    Mutant("rewards.py", "return round(sum(turn_rewards) / len(turn_rewards), 4)", "return round(sum(turn_rewards), 4)",
           (REWARDS,), "Sum score is the total, not the mean turn reward", quick=True),
    Mutant("envs.py", "            actions = actions[:1]\n", "            pass\n",
           ("tests/test_envs.py::test_evaluation_runs_only_the_first_call_of_a_turn",),
           "evaluation runs every call of a turn (the original's eval runs the first)", quick=True),
    Mutant("envs.py", 'str(args.get("content", "")).strip()', 'str(args.get("content") or "").strip()',
           ("tests/test_envs.py::test_tool_arguments_are_read_as_strings_as_the_original_tool_reads_them",),
           "a numeric answer 0 is read as no answer", quick=True),
    Mutant("rewards.py", "/ (n - 1))", "/ n)", (REWARDS,), "biased group std", quick=True),
    Mutant("rewards.py", "        if len(members) < 2:\n            continue\n", "", (REWARDS,),
           "the additive scheme gives a lone group's turns advantages", quick=True),
    Mutant("grpo.py", "kl = (d.exp() - d - 1).clamp(max=10)", "kl = d.exp() - d - 1", (HAND,),
           "the KL penalty's k3 is unbounded (one far-off token swamps the loss)", quick=True),
    Mutant("train.py", '"zero_std": [float(max(v) == min(v))', '"zero_std": [float(np.std(v) == 0)',
           ("tests/test_behaviours.py::test_failed_episodes_count_only_as_failures_in_the_metrics",),
           "frac_zero_std misses groups of equal scores whose float std is not 0", quick=True),
    Mutant("rewards.py", "    if not use_std:", "    if use_std:", (REWARDS,), "use_std inverted", quick=True),
    Mutant("rewards.py", "running = r + gamma * running", "running = r + running", (REWARDS,),
           "r2g credit undiscounted",
           quick=True),
    Mutant("rewards.py", "gamma ** t * r for t, r", "gamma * r for t, r", (REWARDS,), "r2g score discounted once",
           quick=True),
    Mutant("train.py", "inspect.signature(rewards.CREDITS[cfg.credit]).bind([], cfg.gamma, None)",
           "inspect.signature(rewards.CREDITS[cfg.credit])", ("tests/test_config.py",),
           "a credit of another signature accepted at start (fails after the first rollout)", quick=True),
    Mutant("rewards.py", "scale = advantage * n_nonzero / total", "scale = advantage / total", (REWARDS,),
           "token advantages not rescaled to mean A", quick=True),
    Mutant("rewards.py", "n_nonzero = sum(n for c, n in zip(credits, turn_lengths) if c != 0)",
           "n_nonzero = sum(turn_lengths)", (REWARDS,), "zero-credit tokens counted in the rescale", quick=True),
    Mutant("rewards.py", "[[t + lam * a for t, n", "[[t + a for t, n", (REWARDS,), "additive scheme ignores lam",
           quick=True),
    # ---- checkpoints.py: the run folder
    Mutant("checkpoints.py", "if step_of(json.loads(line), phase) <= step:",
           "if step_of(json.loads(line), phase) < step:", (RESUME,),
           "resume drops the checkpoint's own step from the logs"),
    Mutant("checkpoints.py", '"transcripts.jsonl": lambda rec, phase: rec.get("info", {}).get("step", 0),',
           '"transcripts.jsonl": lambda rec, phase: rec.get("step", 0),', (RESUME,),
           "transcripts are not truncated on resume"),
    Mutant("checkpoints.py", 'rec.get("step", 0) if rec.get("phase") == phase else 0}', 'rec.get("step", 0)}',
           ("tests/test_run_folder.py::test_resume_drops_the_log_lines_after_the_checkpoint_of_its_own_phase_only",),
           "resume drops the recipe's earlier phases from evals.jsonl", quick=True),
    Mutant("checkpoints.py", "        truncate_logs(run_dir, resumed_at, config.get(\"algo\"))", "        pass", (RESUME,),
           "resume keeps the lines of the steps it redoes"),
    Mutant("checkpoints.py",
           'return (run_dir / "config.json").exists() or (run_dir / "metrics.jsonl").exists() or any(',
           'return (run_dir / "config.json").exists() or any(',
           (f"{FOLDER}::test_a_folder_with_only_metrics_or_a_checkpoint_holds_a_run",),
           "a folder holding only metrics.jsonl is taken as new"),
    Mutant("checkpoints.py", '(run_dir / "metrics.jsonl").exists() or any(run_dir.glob("ckpt-*"))',
           '(run_dir / "metrics.jsonl").exists()',
           (f"{FOLDER}::test_a_folder_with_only_metrics_or_a_checkpoint_holds_a_run",),
           "a folder holding only a checkpoint is taken as new"),
    Mutant("checkpoints.py", "return ckpts[-1] if ckpts else None", "return ckpts[0] if ckpts else None", (RESUME,),
           "resume from the oldest checkpoint"),
    Mutant("sft.py", 'or rec.get("end_reason") == "budget" or rec.get("cut_turns"):',
           'or rec.get("end_reason") == "budget":',
           ("tests/test_sft.py::test_episodes_cut_by_the_budget_or_max_new_tokens_are_left_out_and_observations_are_"
            "the_envs",),
           "SFT trains episodes whose turn max_new_tokens cut (an end-of-turn token mid-sentence)", quick=True),
    Mutant("rollout.py", '        ep.info["cut_turns"] += 1', '        pass',
           ("tests/test_rollout.py::test_budget_and_max_turns_end_episodes",), "cut turns are not counted", quick=True),
    Mutant("eval.py", "        probe_endpoints(cfg, agent, user)", "        pass",
           ("tests/test_eval.py::test_an_endpoint_that_cannot_serve_stops_before_any_episode",),
           "eval.py plays every episode against an endpoint it could have found unreachable"),
    Mutant("eval.py", 'note = checkpoints.take_lock(out, "--out", LOCK)', 'note = ""',
           ("tests/test_eval.py::test_a_second_eval_on_a_folder_in_use_is_refused",),
           "eval.py takes no lock on --out (two runs on one folder count episodes twice)"),
    Mutant("distributed.py", "    os._exit(code)", "    sys.exit(code)",
           ("tests/test_distributed.py::test_an_interrupted_rank_skips_the_interpreters_shutdown",),
           "an interrupted rank runs Python's shutdown (which can abort it)", quick=True),
    Mutant("checkpoints.py", "for old in checkpoints_in(run_dir)[:-keep_last]:",
           "for old in checkpoints_in(run_dir)[:keep_last]:",
           ("tests/test_checkpoints.py::test_keep_last_and_a_save_cut_short_by_ctrl_c",),
           "--keep_last prunes the newest"),
    Mutant("checkpoints.py", 'if json.loads(path.read_text())["pid"] == os.getpid():',
           'if json.loads(path.read_text())["pid"] != os.getpid():',
           (f"{FOLDER}::test_config_json_is_written_only_once_the_model_has_loaded",), "the lock is never released"),
    Mutant("checkpoints.py", "if host != socket.gethostname() or pid_alive(pid):", "if host != socket.gethostname():",
           (f"{FOLDER}::test_a_live_lock_keeps_a_second_process_out_and_a_stale_one_is_taken_over",),
           "a live lock is taken over"),
    Mutant("checkpoints.py", 'torch.save({"step": step, "world"', 'torch.save({"step": step - 1, "world"', (RESUME,),
           "a checkpoint records the wrong step"),
    Mutant("checkpoints.py", "    if resume:  # what a save", "    if False:  # what a save",
           (f"{FOLDER}::test_resume_clears_what_a_save_an_export_or_a_deletion_cut_short_left",),
           "a save cut short is left in the folder on resume"),
]


# ----------------------------------------------------------------------------------------------------------


def copy_tree(dest: Path):
    """The working tree as git sees it (tracked files and untracked ones not ignored), or all of it without git."""
    git = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if git.returncode:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__", "runs"))
        return
    for rel in filter(None, git.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(tree: Path, tests) -> tuple[str, float]:
    """pytest on `tests` in `tree`: "passed", "failed", "timeout" or "error" (pytest could not run them), and the
    seconds it took."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc of a mutated module outlives its mutant
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    # 1: tests failed; 2: collection failed (the mutant broke an import); 3-5: pytest itself could not run them
    return {0: "passed", 1: "failed", 2: "failed"}.get(p.returncode, "error"), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the mutants whose tests take seconds")
    ap.add_argument("--only", default="", help="comma-separated mutant numbers (see --list)")
    ap.add_argument("--list", action="store_true", help="print the numbered list and exit")
    args = ap.parse_args()
    numbered = list(enumerate(MUTANTS, 1))
    if args.list:
        for i, m in numbered:
            print(f"{i:3d} {m.file:15s} {m.what}  [{', '.join(m.tests)}]")
        return
    if args.only:
        wanted = {int(x) for x in args.only.split(",")}
        numbered = [(i, m) for i, m in numbered if i in wanted]
    if args.quick:
        numbered = [(i, m) for i, m in numbered if m.quick]

    with tempfile.TemporaryDirectory(prefix="userrl-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        sources = {name: (tree / name).read_text(encoding="utf-8") for name in {m.file for _, m in numbered}}
        stale, runnable = [], []
        for i, m in numbered:
            count = sources[m.file].count(m.original)
            if count != 1:
                stale.append(f"{m.file}:{i}")
                print(f"[{i:3d}] stale     {m.file}: its original text is in the file {count} times: {m.original!r}")
            else:
                runnable.append((i, m))
        baseline = sorted({t for _, m in runnable for t in m.tests})
        print(f"baseline: {len(baseline)} targeted test(s) on the unchanged copy ...", flush=True)
        outcome, secs = run_tests(tree, baseline)
        if outcome != "passed":
            sys.exit(f"the targeted tests do not pass on the unchanged tree ({outcome}, {secs:.0f} s): fix that first; "
                     f"rerun them with python -m pytest -x {' '.join(baseline)}")
        print(f"baseline passed in {secs:.0f} s", flush=True)

        caught, survivors, errors = 0, [], []
        for i, m in runnable:
            path = tree / m.file
            path.write_text(sources[m.file].replace(m.original, m.replacement), encoding="utf-8")
            try:
                outcome, secs = run_tests(tree, m.tests)
            finally:
                path.write_text(sources[m.file], encoding="utf-8")
            if outcome in ("failed", "timeout"):
                caught += 1
                verdict = "caught" if outcome == "failed" else "caught (timeout)"
            elif outcome == "passed":
                survivors.append(f"{m.file}:{i}")
                verdict = "SURVIVED"
            else:
                errors.append(f"{m.file}:{i}")
                verdict = "ERROR"
            print(f"[{i:3d}] {verdict:16s} {secs:5.0f} s  {m.file}: {m.what}", flush=True)

    print(f"\n{caught}/{len(runnable)} mutants caught; survivors: {', '.join(survivors) or 'none'}; "
          f"stale: {', '.join(stale) or 'none'}" + (f"; pytest could not run: {', '.join(errors)}" if errors else ""))
    print(json.dumps({"mutants": len(runnable), "caught": caught, "survivors": survivors, "stale": stale}))


if __name__ == "__main__":
    main()
