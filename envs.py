"""The gym interface: one tool, action parsing, the `Env` base, the registry and task loading (UserRL, arXiv
2509.19736, section 3). The gyms themselves live in gyms/<name>.py, one module each.

Every gym shares one interface and one tool. The agent acts by calling

    interact_with_env(choice, content)      choice in {action, search, answer}

`action` talks to the user, `search` queries the gym's search/tool backend, `answer` commits an answer.
Plain text that starts with `[action]`, `[search]`, `[answer]` or `[finish]` is accepted too.

    env = make_env("function", task, user=None)   # user=None: the offline scripted user
    first_message = env.reset()
    observation, reward, done, info = env.step(agent_turn_text)
    env.episode_score()                           # at the end: the number the paper's evaluation reports
    env.expert_action(random.Random(0))           # an oracle's next turn, for demonstrations (ExpertAgent)

`make_env(..., eval_mode=True)` plays the paper's evaluation settings instead of its training settings (see Env).
Whatever the agent writes, `step` never raises and never executes it. A malformed tool call (broken JSON, an
unknown tool, bad arguments) ends the episode with reward 0, as in the original (`malformed="retry"` instead
answers it with an error observation and goes on); any other mistake gets an observation that says what was
wrong, reward 0, and costs a turn.

Import order: this module imports the gym modules at its bottom to build GYMS, and gyms/__init__.py imports
this module first, so `import envs` and `import gyms.travel` both work.
"""
import importlib
import json
import random
import re
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import users

DATA_DIR = Path(__file__).resolve().parent / "data"

# The one tool every gym exposes (the original's `interact_with_env`). This dict is what the chat template
# renders into the system turn, so its wording is part of every prompt.
TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": "interact_with_env",
        "description": ("Interact with the environment. What each choice means in the current task is "
                        "explained in the system prompt."),
        "parameters": {
            "type": "object",
            "properties": {
                "choice": {"type": "string", "enum": ["action", "search", "answer"],
                           "description": "action: talk to the user; search: query the environment's "
                                          "search or tools; answer: give your answer."},
                "content": {"type": "string", "description": "The message, query or answer."},
            },
            "required": ["choice", "content"],
        },
    },
}


class TaskDataError(ValueError):
    """A task file or record a gym cannot use. The message names the file, the line (or record) and the field."""


# ----------------------------------------------------------------------------------------------------------
# Parsing the agent's turn


class ActionError(ValueError):
    """The agent's turn holds no usable action. `missing`: there was no tool call at all (the rollout ends such an
    episode, as the original does). `malformed`: a tool call was there but is not a call of interact_with_env
    with an object of arguments (broken JSON, an unknown tool, arguments that are no object); the original ends
    the episode."""

    def __init__(self, message: str, missing: bool = False, malformed: bool = False):
        super().__init__(message)
        self.missing, self.malformed = missing, malformed


@dataclass
class Action:
    choice: str
    content: str


TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
PLAIN_RE = re.compile(r"^\s*\[(action|search|answer|finish)\]\s*(.*)$", re.S | re.I)


def parse_actions(text: str) -> list[Action]:
    """Every usable action in `text`, in order: one per `<tool_call>` block (thinking before them is ignored),
    or a plain `[choice] content`. Calls that cannot be used are dropped when others can (the original drops a
    call whose arguments do not decode); when none can, raises the last one's ActionError."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    calls = TOOL_CALL_RE.findall(text)
    if not calls:
        m = PLAIN_RE.match(text.replace("<|im_end|>", ""))
        if not m:
            raise ActionError("No tool call found. Call interact_with_env with a choice and a content.", missing=True)
        return [_check(m.group(1).lower(), m.group(2).strip())]
    actions, error = [], None
    for raw in calls:
        try:
            actions.append(_parse_call(raw.strip()))
        except ActionError as e:
            error = e
    if not actions:
        raise error
    return actions


def parse_action(text: str) -> Action:
    """The action a turn ends with: the last usable one of `parse_actions`."""
    return parse_actions(text)[-1]


def _parse_call(raw: str) -> Action:
    try:
        call = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError also covers integers past Python's digit limit
        raise ActionError("The tool call is not valid JSON. Write "
                          '{"name": "interact_with_env", "arguments": {"choice": ..., "content": ...}}.',
                          malformed=True)
    if not isinstance(call, dict) or call.get("name") != "interact_with_env":
        raise ActionError("Unknown tool. The only tool is interact_with_env.", malformed=True)
    args = call.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            args = None
    if not isinstance(args, dict):
        raise ActionError('The arguments must be an object with the fields "choice" and "content".', malformed=True)
    # As the original's tool reads them: each field as a string (content 61 is "61"), a missing one as "", and
    # the choice matched exactly ("Answer" is no choice; the env decides what an unknown choice means, see _act).
    choice, content = str(args.get("choice", "")), str(args.get("content", "")).strip()
    m = PLAIN_RE.match(content)  # "[answer] 42" inside content means the same as content "42"
    if m and m.group(1).lower() == choice:
        content = m.group(2).strip()
    return _check(choice, content)


def _check(choice: str, content: str) -> Action:
    if not content and choice != "finish":
        raise ActionError(f"The content of your {choice} is empty.")
    return Action(choice, content)


def expert_turn(think: str, choice: str, content: str) -> str:
    """An agent turn as a policy writes it: its reasoning, then one call of the tool (Qwen3's layout)."""
    call = json.dumps({"name": "interact_with_env", "arguments": {"choice": choice, "content": content}},
                      ensure_ascii=False)
    return f"<think>\n{think}\n</think>\n\n<tool_call>\n{call}\n</tool_call>"


def pick(rng: random.Random, forms: list, fits=None, default=None):
    """A random one of `forms` for which `fits(form)` holds (every form when `fits` is None); `default` if none
    does. The experts phrase a turn this way: varied, and checked against the scripted rule that will judge it."""
    forms = list(forms)
    rng.shuffle(forms)
    return next((f for f in forms if fits is None or fits(f)), default)


# ----------------------------------------------------------------------------------------------------------
# The interface every gym implements

MAX_CONTENT_CHARS = 8000  # longer contents are refused: they would only overflow the user model's context
FOOTER = ("\n\nThink step by step inside <think></think> before each call of interact_with_env. You have at "
          "most {max_turns} turns, and every call uses one, valid or not.")
MALFORMED = ("end", "retry")


def _type_ok(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _type_name(kind) -> str:
    names = {str: "text", int: "an integer", float: "a number", list: "a list", dict: "an object", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


class Env:
    """One episode of one task. A gym subclasses this: it sets `name`, `choices` (those its prompt offers),
    `fields` (the task fields it needs, with their types), `system_prompt` (with a `{max_turns}` slot), and
    implements `opening()` (start the episode: set per-episode state, return the first message),
    `act(choice, content) -> (observation, reward, done)` and `expert_action(rng)`. `act` may raise
    ActionError for a malformed content and may add entries to `self.info`. A UserError from the user
    propagates out of `step`.

    Constructor arguments every gym takes (through `make_env(name, task, user, **overrides)`):
    - `max_turns`: the turn limit; the turn that reaches it ends the episode (`info["truncated"]`) with that
      turn's own reward and nothing more (the original pays no closing reward, not even TauGym).
    - `eval_mode`: False plays the paper's training settings, True its evaluation settings. Where a gym's
      two settings differ (TravelGym's search and preference rewards, whether observations show the
      reward) it follows this switch; a gym without a difference ignores it. One switch, so a trainer
      can pass the same value to every gym.
    - `show_reward`: append "Reward: r" to observations; None follows `eval_mode` (the paper's training
      shows the reward, its evaluation does not).
    - `malformed`: "end" (the original) ends the episode at a malformed tool call, reward 0,
      `info["end_reason"] = "malformed_call"`; "retry" answers it with an error observation and goes on.

    `step`'s info: `turn`; `choice` (of the turn's last call); `calls` when a turn held several (all run, in order,
    their observations joined by a blank line, the turn's reward the last one's; in eval_mode only the first runs);
    `error`, `missing_tool_call`, `malformed_call` on a mistake; `end_reason` when the env itself ends the episode
    early ("malformed_call"); `truncated` at the turn limit; `user_fallback` when a user's reply could not be read;
    and the gym's own (`score` in turtle, `covered` in intention, `stance` in persuade)."""

    name = "base"
    choices = ("action", "search", "answer")
    other_choices_as = None
    """the choice that a choice outside `choices` is played as (the original's gyms accept any prefix: e.g.
    TelepathyGym treats everything but an answer as a question); None refuses it with an error"""
    fields: dict = {}
    """task field -> type (or tuple of types) every task of this gym must have"""
    optional_fields: dict = {}
    """task field -> type, checked where present (e.g. the keyword lists only the scripted user reads)"""
    system_prompt = ""
    original_files = ()
    """names of the original UserRL data files that `load_original` reads"""

    def __init__(self, task: dict, user=None, max_turns: int = 16, show_reward: bool | None = None,
                 eval_mode: bool = False, malformed: str = "end"):
        try:
            self.check_task(task)
        except ValueError as e:
            task_id = task.get("id", "?") if isinstance(task, dict) else "?"
            raise ValueError(f"{self.name} task {task_id!r}: {e}") from None
        if malformed not in MALFORMED:
            raise ValueError(f"malformed must be one of {MALFORMED}, not {malformed!r}")
        self.task = task
        self.user = user if user is not None else users.make_user("scripted")
        self.max_turns = max_turns
        self.eval_mode = eval_mode
        self.show_reward = (not eval_mode) if show_reward is None else show_reward
        self.malformed = malformed
        self.turn = 0
        self.info = {}
        self.rewards = []  # this episode's turn rewards, for episode_score()
        self.plan = None  # the expert's per-episode choices (expert_action), made at its first turn

    @classmethod
    def check_task(cls, task) -> None:
        """Raise ValueError naming the field when `task` cannot be played by this gym. Gyms extend it with
        checks deeper than types (FunctionGym compiles its rule here, so a bad rule fails when it is loaded)."""
        if not isinstance(task, dict):
            raise ValueError(f"a task must be a JSON object, not {type(task).__name__}")
        for name in cls.fields:
            if name not in task:
                raise ValueError(f"missing field {name!r}")
        for name, kind in {**cls.optional_fields, **cls.fields}.items():
            if name in task and not _type_ok(task[name], kind):
                raise ValueError(f"field {name!r} must be {_type_name(kind)}, not {type(task[name]).__name__}")

    def system(self) -> str:
        return self.system_prompt.format(max_turns=self.max_turns)

    def reset(self) -> str:
        self.turn = 0
        self.rewards = []
        self.plan = None
        return self.opening()

    def step(self, text: str):
        self.turn += 1
        self.info = {"turn": self.turn}
        obs, reward, done = self._play(text)
        if not done and self.turn >= self.max_turns:
            done, self.info["truncated"] = True, True
        self.rewards.append(float(reward))
        if self.show_reward:
            obs = f"{obs}\nReward: {round(float(reward), 4)}"
        return obs, float(reward), done, self.info

    def _play(self, text: str):
        """Every call of the turn in order, as the original executes all of them: the turn's reward is the last
        call's, and it ends when a call ends the episode (later calls are not run)."""
        try:
            actions = parse_actions(text)
        except ActionError as e:
            self.info.update(error=str(e), missing_tool_call=e.missing, malformed_call=e.malformed)
            if e.malformed and self.malformed == "end":
                self.info["end_reason"] = "malformed_call"
                return f"Error: {e} The episode ends.", 0.0, True
            return f"Error: {e}", 0.0, False
        if self.eval_mode:  # the original's evaluation runs a turn's first call only (its training runs them all)
            actions = actions[:1]
        if len(actions) > 1:
            self.info["calls"] = len(actions)
        observations, reward, done = [], 0.0, False
        for action in actions:
            self.info["choice"] = action.choice
            try:
                obs, reward, done = self._act(action)
            except ActionError as e:
                obs, reward, done = f"Error: {e}", 0.0, False
                self.info["error"] = str(e)
            observations.append(obs)
            if done:
                break
        return "\n\n".join(observations), reward, done

    def _act(self, action: Action):
        if action.choice == "finish":  # the original pays nothing for finishing (TauGym: its last reward, 0 here)
            return "The episode is finished.", 0.0, True
        # A choice the gym does not take (an unknown one too: the original sends its content on as it is) is
        # played as the gym's other_choices_as, when it has one.
        choice = action.choice if action.choice in self.choices else self.other_choices_as
        if choice is None:
            raise ActionError(f"The choice {action.choice[:40]!r} is not allowed in this task. Allowed: "
                              f"{', '.join(self.choices)}.")
        if len(action.content) > MAX_CONTENT_CHARS:
            raise ActionError(f"The content is too long ({len(action.content)} characters; the limit is "
                              f"{MAX_CONTENT_CHARS}).")
        return self.act(choice, action.content)

    def episode_score(self) -> float:
        """The number the paper's evaluation reports for this episode: the sum of its turn rewards (TravelGym
        overrides it). The rollout calls it when an episode ends."""
        return float(sum(self.rewards))

    def max_score(self) -> float:
        """The best `episode_score()` this task allows (what "full reward" means for it): 1 unless a gym says
        otherwise (TurtleGym: its criteria's weights; IntentionGym: every detail asked about on its own)."""
        return 1.0

    def fallback(self, observation: str):
        """The turn when the user's reply could not be understood: reward 0, as in the original."""
        self.info["user_fallback"] = True
        return observation, 0.0, False

    def turns_left(self) -> int:
        """Turns the agent still has, counting the one about to be played."""
        return self.max_turns - self.turn

    def opening(self) -> str:
        raise NotImplementedError

    def act(self, choice: str, content: str):
        raise NotImplementedError

    def expert_action(self, rng: random.Random) -> str:
        """The next agent turn of an oracle that reads the task's hidden fields and this env's state, written as a
        policy writes it (`expert_turn`). It plays the way a good agent would; `rng` varies its phrasing and order."""
        raise NotImplementedError

    @staticmethod
    def from_original(record: dict) -> dict | None:
        """One original UserRL record as a task in this gym's fields; None for a record the original skips."""
        raise NotImplementedError

    @classmethod
    def original_path(cls, data_dir: Path, names=None) -> Path:
        """The first of `names` (default: `original_files`) in `data_dir`; TaskDataError listing them if none is."""
        names = list(names or cls.original_files)
        path = next((data_dir / f for f in names if (data_dir / f).is_file()), None)
        if path is None:
            found = sorted(p.name for p in data_dir.iterdir())[:12] if data_dir.is_dir() else None
            where = f"{data_dir} does not exist" if found is None else f"{data_dir} holds {found or 'nothing'}"
            raise TaskDataError(f"{cls.name}: expected the original UserRL file {' or '.join(names)} in data_dir; "
                                f"{where}")
        return path

    @classmethod
    def load_original(cls, data_dir: Path, split: str) -> list[dict]:
        """This gym's tasks from its original UserRL file in `data_dir`. The original ships one file per gym
        and splits it while building its parquet files; we split with a seeded shuffle, 1/10 to test (the same
        proportions, not the same rows)."""
        tasks = cls.read_original(cls.original_path(data_dir))
        return seeded_split(tasks, split, max(1, round(len(tasks) / 10)))

    @classmethod
    def read_original(cls, path: Path) -> list[dict]:
        """Every record of an original file (a JSON array, JSON lines, or an object keyed by record id, whose key
        becomes the record's "id" unless it has one) converted by `from_original` and checked, less those it
        skips; TaskDataError names the file and the record."""
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}: neither a JSON array nor JSON lines ({e})") from None
        if isinstance(records, dict) and all(isinstance(r, dict) for r in records.values()):  # TurtleGym's file
            records = [{"id": key, **r} for key, r in records.items()]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TaskDataError(f"{path}: expected a JSON array of objects, JSON lines or an object of objects")
        tasks = [cls.convert(record, f"{path}: record {i}") for i, record in enumerate(records)]
        return [t for t in tasks if t is not None]

    @classmethod
    def convert(cls, record: dict, where: str) -> dict | None:
        """`from_original(record)`, checked (None: skipped); TaskDataError starting with `where` when either fails."""
        try:
            task = cls.from_original(record)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise TaskDataError(f"{where} does not have the original {cls.name} layout ({e!r})") from None
        if task is None:
            return None
        try:
            cls.check_task(task)
        except ValueError as e:
            raise TaskDataError(f"{where} ({task.get('id', '?')!r}): {e}") from None
        return task


def seeded_split(tasks: list, split: str, n_test: int) -> list:
    """`split` of `tasks` after a shuffle with seed 42: the first `n_test` shuffled positions go to test."""
    order = list(range(len(tasks)))
    random.Random(42).shuffle(order)
    return [tasks[i] for i in sorted(order[n_test:] if split == "train" else order[:n_test])]


def role_messages(system: str, turns, last: str) -> list[dict]:
    """A role's prompt: its system text, earlier (agent, role) exchanges, then the agent's latest turn."""
    messages = [{"role": "system", "content": system}]
    for said, answered in turns:
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": last}]


def as_bool(value):
    """True / False from a JSON boolean or "true"/"yes"/"false"/"no" as LLMs write them; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        return value.strip().lower() in ("true", "yes")
    return None


# ----------------------------------------------------------------------------------------------------------
# The expert as an agent


class ExpertAgent:
    """An agent for rollout's agent loop that plays every env's expert (`Env.expert_action`): an oracle reading
    the task's hidden fields, for demonstrations and for the evaluation table's upper row. Each env gets its own
    random stream, seeded by (seed, gym, task id, how many envs of that task came before), so a group of episodes
    of one task differs and a seed gives the same set of transcripts."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rngs = weakref.WeakKeyDictionary()
        self._seen = Counter()
        self._lock = threading.Lock()  # the rollout calls complete() from several threads

    def complete(self, messages: list, tools: list | None = None, env=None) -> dict:
        if env is None:
            raise ValueError("the expert agent reads the env it plays: call complete(messages, tools, env=env)")
        with self._lock:
            rng = self._rngs.get(env)
            if rng is None:
                key = f"{env.name}/{env.task.get('id')}"
                rng = self._rngs[env] = random.Random(f"{self.seed}/{key}/{self._seen[key]}")
                self._seen[key] += 1
        return {"role": "assistant", "content": env.expert_action(rng)}


# ----------------------------------------------------------------------------------------------------------
# Registry and task data. A new gym is one module in gyms/ and one line here: (its name, its class in
# gyms/<name>.py). Imported here, at the bottom, because the gym modules build on everything above.

GYMS: dict = {name: getattr(importlib.import_module(f"gyms.{name}"), cls) for name, cls in [
    ("function", "FunctionGym"),
    ("telepathy", "TelepathyGym"),
    ("turtle", "TurtleGym"),
    ("intention", "IntentionGym"),
    ("persuade", "PersuadeGym"),
    ("travel", "TravelGym"),
    ("tau", "TauGym"),
    ("search", "SearchGym"),
]}


def load_tasks(name: str, split: str = "train", data_dir: str | None = None) -> list[dict]:
    """The tasks of one gym: `data/<gym>/<split>.jsonl`, or the original UserRL files under `data_dir`. Every
    record is checked against the gym's fields when it is read; TaskDataError names the file, line and field."""
    if name not in GYMS:
        raise KeyError(f"unknown gym {name!r}; known: {sorted(GYMS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    gym = GYMS[name]
    if data_dir is not None:
        return gym.load_original(Path(data_dir), split)
    path = DATA_DIR / name / f"{split}.jsonl"
    if not path.is_file():
        raise TaskDataError(f"{path}: no such task file")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                gym.check_task(task)
            except ValueError as e:
                task_id = task.get("id", "?") if isinstance(task, dict) else "?"
                raise TaskDataError(f"{path}, line {n} ({name} task {task_id!r}): {e}") from None
            tasks.append(task)
    return tasks


def make_env(name: str, task: dict, user=None, **overrides) -> Env:
    if name not in GYMS:
        raise KeyError(f"unknown gym {name!r}; known: {sorted(GYMS)}")
    return GYMS[name](task, user=user, **overrides)
