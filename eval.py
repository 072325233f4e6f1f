"""The paper's evaluation: every gym's test split played by an agent, one score per gym and their Avg (UserRL,
arXiv 2509.19736, section 5: `eval/eval.py` + `eval/analyze.py` of the original).

    python eval.py --model runs/x/final --out runs/x/eval           # a local model (greedy, through rollout.py)
    python eval.py --agent_base_url http://localhost:8500/v1 --agent_model gpt-4o --out runs/eval-gpt4o
    python eval.py --agent expert --split train --passes 4 --out runs/expert   # oracle demonstrations (SFT data)
    python eval.py --out runs/eval-gpt4o --resume true ...            # go on after an interruption, paying once
    python eval.py --table runs/x/eval runs/eval-gpt4o                # the paper's table: a row per run

The agent is a local model (`--model`: a hub id, a model folder such as a run's final/ or export-N/, or "tiny"), any
OpenAI-compatible endpoint (`--agent_base_url/--agent_model`, users.HTTPUser as the agent), or the scripted
expert (`--agent expert`: envs.ExpertAgent, an ORACLE that reads each task's hidden fields; its episodes are
demonstrations, not a baseline a policy could reach). The simulated user is configured as in training
(`--user.backend http --user.model ...`; scripted by default).

The paper's settings are the defaults: the test split of every gym, 16 turns, greedy decoding, the gyms'
evaluation rewards (`eval_mode`), no reward shown to the agent, 2,048 new tokens per turn. The score of an
episode is `env.episode_score()` (the sum of its turn rewards; TravelGym's best answer per aspect); a gym's
score is the mean over its items and passes; Avg is the mean over gyms weighted by their item counts, as the
original's analyze.py. An episode whose user or agent endpoint failed is reported as failed and left out of
the score, never scored 0.

Writes OUT/episodes.jsonl (one line per episode, appended as each batch of episodes ends: the unit --resume
skips; OUT/eval.lock keeps a second eval.py out of the folder while one plays) and OUT/results.json
({"per_gym": {gym: {score, n, failed, turns, valid_call_rate, pass_at_k}}, "avg": x, "n": items}), and prints
the per-gym table. `valid_call_rate` is the share of the agent's turns that held a well-formed call of
interact_with_env.
"""
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import checkpoints
import distributed
import envs
import rollout as rollout_lib
import users
from config import HELP, ConfigError, apply_args, check_model, help_text, probe
from rollout import RolloutConfig
from users import UserConfig

LOCK = "eval.lock"
"""OUT/eval.lock: the pid and host of the eval.py that holds the folder (checkpoints.take_lock)"""


@dataclass
class EvalConfig:
    model: str = ""
    """a local policy: a hub id (Qwen/Qwen3-4B), a model folder (a run's final/ or export-N/) or "tiny"; played
    through rollout.py"""
    agent: str = ""
    """"expert": the scripted oracle of every gym (envs.ExpertAgent), e.g. to write SFT demonstrations"""
    agent_base_url: str = ""
    """an OpenAI-compatible endpoint serving the agent (e.g. http://localhost:8500/v1, or OpenAI's)"""
    agent_model: str = ""
    """the model name that endpoint serves (e.g. gpt-4o)"""
    agent_api_key_env: str = "OPENAI_API_KEY"
    """the environment variable holding the agent endpoint's key"""
    agent_max_concurrency: int = 10
    """agent requests in flight at once (the original's MAX_WORKER_NUM)"""
    agent_probe: bool = True
    """check before playing that GET {agent_base_url}/models answers and serves --agent_model; false for endpoints
    that have no /models route"""
    gyms: str = ""
    """comma-separated gyms; empty means every registered gym"""
    split: str = "test"
    """test (the paper's table) or train (e.g. expert demonstrations for SFT)"""
    tasks: int = 0
    """tasks per gym, the first N of the split (0 = all of them)"""
    passes: int = 1
    """episodes per task (pass@k; the paper: 1). Greedy decoding repeats itself, so use passes > 1 with
    --rollout.temperature sampling or with the expert (whose phrasing varies per pass)"""
    out: str = ""
    """output folder; empty means runs/eval-<timestamp>"""
    resume: bool = False
    """keep OUT/episodes.jsonl and play only the episodes it lacks"""
    batch: int = 64
    """episodes per rollout call; each batch is appended to episodes.jsonl as soon as it ends"""
    seed: int = 0
    """seeds the expert's choices and torch (sampling)"""
    data_dir: str = ""
    """a folder with the original UserRL task files, used instead of data/ (see envs.load_tasks)"""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda: where a local model runs"""
    dtype: str = "float32"
    """float32 or bfloat16, for a local model"""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        max_new_tokens=2048, greedy=True, show_reward=False, eval_mode=True))
    """the paper's evaluation: 16 turns, 2,048 new tokens per turn, greedy, no reward shown, eval rewards"""
    user: UserConfig = field(default_factory=UserConfig)
    """the simulated user, as in training"""


def parse_config(argv: list[str]) -> EvalConfig:
    cfg = apply_args(EvalConfig(), argv)
    agents = [bool(cfg.model), bool(cfg.agent), bool(cfg.agent_base_url or cfg.agent_model)]
    if sum(agents) != 1:
        raise ConfigError("name one agent: --model PATH, --agent expert, or --agent_base_url URL --agent_model NAME")
    if cfg.agent and cfg.agent != "expert":
        raise ConfigError(f"--agent: the only built-in agent is 'expert', got {cfg.agent!r}")
    if agents[2] and not (cfg.agent_base_url and cfg.agent_model):
        raise ConfigError("--agent_base_url and --agent_model go together (the endpoint and the model it serves)")
    for gym in split_gyms(cfg.gyms):
        if gym not in envs.GYMS:
            raise ConfigError(f"--gyms: unknown gym {gym!r}; known: {', '.join(envs.GYMS)}")
    if cfg.split not in ("train", "test"):
        raise ConfigError(f"--split: expected train or test, got {cfg.split!r}")
    for key in ("tasks", "passes", "batch"):
        if getattr(cfg, key) < (0 if key == "tasks" else 1):
            raise ConfigError(f"--{key}: must be >= {0 if key == 'tasks' else 1}, got {getattr(cfg, key)}")
    if cfg.model:
        check_model("model", cfg.model)
    if cfg.dtype not in ("float32", "bfloat16") or cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--dtype / --device: expected float32|bfloat16 and auto|cpu|cuda, got {cfg.dtype!r}, "
                          f"{cfg.device!r}")
    if cfg.user.backend not in users.BACKENDS:
        raise ConfigError(f"--user.backend: expected one of {', '.join(users.BACKENDS)}, got {cfg.user.backend!r}")
    if cfg.user.backend != "scripted" and not cfg.user.model:
        raise ConfigError(f"--user.model: the {cfg.user.backend} user needs a model")
    try:
        RolloutConfig(**dataclasses.asdict(cfg.rollout))
    except ValueError as e:
        raise ConfigError(f"--rollout: {e}") from None
    return cfg


def split_gyms(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


# ----------------------------------------------------------------------------------------------------------
# Playing episodes


def select_tasks(gyms: list[str], split: str, n: int, data_dir: str = "") -> list[tuple[str, dict]]:
    """(gym, task) for the first `n` tasks (0 = all) of each gym's split, in gym order then file order. A gym with
    no task file for the split (e.g. search has no original train split) is an error naming the file."""
    return [(g, t) for g in gyms for t in envs.load_tasks(g, split, data_dir or None)[: n or None]]


def valid_call(message: dict) -> bool:
    """Whether an assistant turn holds a usable call of interact_with_env (envs.parse_action's rules)."""
    try:
        envs.parse_action(rollout_lib.tool_call_text(message))
    except envs.ActionError:
        return False
    return True


def episode_record(ep, pass_index: int) -> dict:
    """One line of episodes.jsonl: what the table needs, the conversation (SFT data), and the rollout's info."""
    said = [m for m in ep.messages if m["role"] == "assistant"]
    return {"gym": ep.gym, "task_id": ep.info.get("task_id"), "pass": pass_index, "messages": ep.messages,
            "turn_rewards": ep.turn_rewards, "score": None if ep.failed else ep.info.get("score"),
            "failed": ep.failed, "turns": len(ep.turn_rewards),
            "valid_calls": sum(valid_call(m) for m in said), "end_reason": ep.info.get("end_reason"),
            "cut_turns": ep.info.get("cut_turns", 0),
            "error": ep.info.get("error"), "num_tokens": len(ep.ids), "num_generated": sum(ep.loss_mask)}


def play(agent, tokenizer, work: list, cfg: RolloutConfig, user=None, batch: int = 64, seed: int = 0,
         on_records=None) -> list[dict]:
    """Play each (gym, task, pass) of `work`, `batch` episodes per rollout call; returns their records and hands
    each batch's records to `on_records` as soon as it ends. `agent` is a transformers model (with `tokenizer`),
    an HTTP agent, or "expert" (a fresh envs.ExpertAgent per pass, seeded by `seed` and the pass, so a pass is
    the same transcript however the work was cut into batches or resumed)."""
    records = []
    passes = sorted({p for _, _, p in work})
    for p in passes:
        items = [(g, t) for g, t, q in work if q == p]
        player = envs.ExpertAgent(seed * 10_000 + p) if agent == "expert" else agent
        for i in range(0, len(items), batch):
            eps = rollout_lib.rollout(player, tokenizer, items[i:i + batch], 1, cfg, user=user)
            recs = [episode_record(ep, p) for ep in eps]
            records += recs
            if on_records is not None:
                on_records(recs)
    return records


def evaluate(agent, tokenizer, tasks: list, cfg: RolloutConfig, user=None, passes: int = 1, batch: int = 64,
             seed: int = 0) -> tuple[dict, list]:
    """(results, records) for `tasks` [(gym, task)] played `passes` times each, in this process and without files
    (train.py's evaluations deal their tasks over the ranks: evaluate_ranks). `cfg` should be the evaluation's
    RolloutConfig (greedy, eval_mode, no reward shown)."""
    work = [(g, t, p) for p in range(passes) for g, t in tasks]
    records = play(agent, tokenizer, work, cfg, user=user, batch=batch, seed=seed)
    return summarize(records), records


def eval_settings(cfg: RolloutConfig) -> RolloutConfig:
    """A training rollout config turned into the paper's evaluation settings (greedy, the gyms' eval rewards, no
    reward shown), its limits kept."""
    return dataclasses.replace(cfg, greedy=True, show_reward=False, eval_mode=True)


def evaluate_ranks(model, tokenizer, tasks: list, cfg: RolloutConfig, user=None) -> dict:
    """The results of `tasks` played once each, with the tasks dealt over the ranks of a process group (every rank
    calls it and gets the same results): train.py's periodic evaluation and the recipe's."""
    rank, world = distributed.rank(), len(distributed.gather(None))
    mine = tasks[rank::world]
    recs = play(model, tokenizer, [(g, t, 0) for g, t in mine], cfg, user=user) if mine else []
    recs = [{k: v for k, v in r.items() if k != "messages"} for r in recs]  # the table needs no conversations
    return summarize([r for part in distributed.gather(recs) for r in part])


def log_eval(run_dir: Path, phase: str, step: int, results: dict):
    """One line of RUN/evals.jsonl: {"phase", "step", "avg", "per_gym"}."""
    with open(Path(run_dir) / "evals.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"phase": phase, "step": step, "avg": results["avg"], "per_gym": results["per_gym"]}) + "\n")


def eval_metrics(results: dict) -> dict:
    """The results as metrics.jsonl keys: eval/<gym> (score), eval/valid_calls/<gym>, eval/avg."""
    out = {}
    for gym, v in results["per_gym"].items():
        out[f"eval/{gym}"] = v["score"]
        out[f"eval/valid_calls/{gym}"] = v["valid_call_rate"]
    out["eval/avg"] = results["avg"]
    return out


# ----------------------------------------------------------------------------------------------------------
# The numbers


def summarize(records: list[dict]) -> dict:
    """Per gym, over the episodes that did not fail: score (the mean over its scored items of each item's mean
    over its passes), n (items), scored (items with a score), failed (episodes), turns (mean), valid_call_rate
    (valid calls / turns), pass_at_k (mean over items of the best pass), task_scores ({task id: mean over its
    passes}, for paired comparisons: `gap`); avg: the mean of the gym scores weighted by their scored items (the
    paper's Avg, weighted by item counts), n: the items scored. A gym whose every episode failed has score None."""
    per_gym = {}
    for gym in sorted({r["gym"] for r in records}):
        rs = [r for r in records if r["gym"] == gym]
        ok = [r for r in rs if not r["failed"]]
        best, by_task = {}, {}
        for r in ok:
            best[r["task_id"]] = max(best.get(r["task_id"], r["score"]), r["score"])
            by_task.setdefault(r["task_id"], []).append(r["score"])
        # Over the episodes that did not fail: a task's score is the mean of its scored passes, a gym's the mean
        # of its tasks' (a task whose other passes failed weighs no more than one that kept them all)
        task_scores = {t: sum(s) / len(s) for t, s in sorted(by_task.items())}
        turns = sum(r["turns"] for r in ok)
        per_gym[gym] = {"score": sum(task_scores.values()) / len(task_scores) if task_scores else None,
                        "n": len({r["task_id"] for r in rs}), "scored": len(task_scores), "failed": len(rs) - len(ok),
                        "turns": turns / len(ok) if ok else 0.0,
                        "valid_call_rate": sum(r["valid_calls"] for r in ok) / turns if turns else 0.0,
                        "pass_at_k": sum(best.values()) / len(best) if best else None,
                        "task_scores": task_scores}
    scored = {g: v for g, v in per_gym.items() if v["score"] is not None}
    n = sum(v["scored"] for v in scored.values())  # weights: the tasks scored (failed ones are out of the score)
    avg = sum(v["score"] * v["scored"] for v in scored.values()) / n if n else None
    return {"per_gym": per_gym, "avg": avg, "n": n}


def gap(new: dict, old: dict) -> tuple[float, float | None, int] | None:
    """(mean difference, its standard error, tasks) of results `new` over `old` on the tasks both scored: the
    per-task differences are paired, so the error is what these test tasks leave uncertain about the gap (greedy
    decoding and the scripted users are deterministic; the tasks are the sample). None without common tasks."""
    diffs = [s - old["per_gym"][g]["task_scores"][t] for g, v in new["per_gym"].items() if g in old["per_gym"]
             for t, s in v.get("task_scores", {}).items() if t in old["per_gym"][g].get("task_scores", {})]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:  # one task leaves the error unknown, not 0
        return mean, None, 1
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5, len(diffs)


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def gym_table(results: dict) -> str:
    """One row per gym: score, items, failed episodes, mean turns, valid-call rate; then Avg."""
    lines = [f"{'gym':12s} {'score':>7s} {'n':>5s} {'failed':>7s} {'turns':>6s} {'valid calls':>12s}"]
    for gym, v in results["per_gym"].items():
        lines.append(f"{gym:12s} {fmt(v['score']):>7s} {v['n']:5d} {v['failed']:7d} {v['turns']:6.1f} "
                     f"{v['valid_call_rate']:12.1%}")
    lines.append(f"{'Avg':12s} {fmt(results['avg']):>7s} {results['n']:5d}")
    return "\n".join(lines)


def runs_table(rows: dict, valid: bool = False) -> str:
    """The paper's table: one row per run ({name: results}), one column per gym, then Avg. A gym with failed
    episodes shows their count, e.g. 0.512 (3 failed). With `valid`, each cell adds the valid-call rate."""
    gyms = sorted({g for r in rows.values() for g in r["per_gym"]})
    width = max([len(n) for n in rows] + [8])

    def cell(v):
        if v is None:
            return "-"
        text = fmt(v["score"])
        if valid:
            text += f" ({v['valid_call_rate']:.0%})"
        if v["failed"]:
            text += f" ({v['failed']} failed)"
        return text

    cells = {name: [cell(r["per_gym"].get(g)) for g in gyms] + [fmt(r["avg"])] for name, r in rows.items()}
    widths = [max([len(h)] + [len(c[i]) for c in cells.values()]) for i, h in enumerate(gyms + ["Avg"])]
    head = f"{'':{width}s}  " + "  ".join(f"{h:>{w}s}" for h, w in zip(gyms + ["Avg"], widths))
    body = [f"{name:{width}s}  " + "  ".join(f"{c:>{w}s}" for c, w in zip(cs, widths)) for name, cs in cells.items()]
    return "\n".join([head, *body])


def read_records(path: Path) -> list[dict]:
    """The records of an episodes.jsonl; a line cut off by an interruption (the last one) is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ConfigError(f"{path}, line {n}: not valid JSON; the file is damaged") from None
    return records


def load_results(folder: str) -> dict:
    path = Path(folder) / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--table: cannot read {path} ({e}); is {folder} an eval.py output folder?") from None


# ----------------------------------------------------------------------------------------------------------
# The command


def make_agent(cfg: EvalConfig):
    """(agent, tokenizer): a local model with its tokenizer, an HTTP agent, or "expert"."""
    if cfg.agent == "expert":
        return "expert", None
    if cfg.agent_base_url:
        return users.make_user("http", base_url=cfg.agent_base_url, model=cfg.agent_model,
                               api_key_env=cfg.agent_api_key_env, max_concurrency=cfg.agent_max_concurrency,
                               temperature=0.0 if cfg.rollout.greedy else cfg.rollout.temperature), None
    import torch

    from models import load_model

    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, dtype=getattr(torch, cfg.dtype))
    return model.to(device).eval(), tokenizer


def probe_endpoints(cfg: EvalConfig, agent, user):
    """Before the first episode: an HTTP agent or user that cannot be reached, refuses the key or serves another
    model is one error naming it, not every episode played and failed."""
    if cfg.agent_base_url and cfg.agent_probe:
        probe(agent, "--agent_base_url", "--agent_probe false")
    if cfg.user.backend == "http" and cfg.user.probe:
        probe(user, "--user.base_url", "--user.probe false")


def run(cfg: EvalConfig) -> dict:
    import torch

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    path = out / "episodes.jsonl"
    if path.exists() and not cfg.resume:
        raise ConfigError(f"--out: {out} already holds episodes.jsonl; add --resume true to go on with it, or "
                          "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    # One process per folder: two would both play the episodes it lacks and append them (counted twice)
    note = checkpoints.take_lock(out, "--out", LOCK)
    if note:
        print(note, flush=True)
    try:
        return play_into(cfg, out, path)
    finally:
        checkpoints.release(out, LOCK)


def play_into(cfg: EvalConfig, out: Path, path: Path) -> dict:
    """run()'s work once it holds the folder: play the episodes OUT/episodes.jsonl lacks, then score them all."""
    tasks = select_tasks(split_gyms(cfg.gyms) or list(envs.GYMS), cfg.split, cfg.tasks, cfg.data_dir)
    wanted = {(g, t.get("id"), p) for p in range(cfg.passes) for g, t in tasks}
    existing = read_records(path)
    if path.exists():  # rewritten without a line an interruption cut off (even when it is the only one, else the
        # next record would be glued onto it); records of other selections stay
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing), encoding="utf-8")
    kept = [r for r in existing if (r["gym"], r["task_id"], r["pass"]) in wanted]
    done = {(r["gym"], r["task_id"], r["pass"]) for r in kept}
    work = [(g, t, p) for p in range(cfg.passes) for g, t in tasks if (g, t.get("id"), p) not in done]
    print(f"{len(work)} episodes to play ({len(done)} already in {path})", flush=True)
    agent, tokenizer = make_agent(cfg) if work else (None, None)
    user = users.from_config(cfg.user)
    if work:
        probe_endpoints(cfg, agent, user)

    def append(recs):
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in recs))

    try:
        records = kept + play(agent, tokenizer, work, cfg.rollout, user=user, batch=cfg.batch, seed=cfg.seed,
                              on_records=append) if work else kept
    except KeyboardInterrupt:  # every finished batch is in episodes.jsonl
        sys.exit(f"interrupted; {len(read_records(path))} episodes are in {path}: continue with the same command "
                 f"and --out {out} --resume true")
    results = summarize(records)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(gym_table(results))
    failed = sum(v["failed"] for v in results["per_gym"].values())
    if failed:
        print(f"{failed} episode(s) failed (a user or agent endpoint error): left out of the scores; see "
              f"'error' in {path}")
    print(f"wrote {out / 'results.json'} and {path}")
    return results


def main(argv: list[str]):
    if set(argv) & set(HELP):
        print(help_text(__doc__, EvalConfig(), "defaults: the paper's evaluation"))
        return
    try:
        if argv[:1] == ["--table"]:
            if len(argv) < 2:
                raise ConfigError("--table: name one or more eval.py output folders")
            print(runs_table({f: load_results(f) for f in argv[1:]}))
            return
        run(parse_config(argv))
    except (ConfigError, envs.TaskDataError) as e:
        sys.exit(f"eval error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
