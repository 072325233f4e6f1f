"""The gyms: environments in which the agent helps a simulated user (UserRL, arXiv 2509.19736, section 3).

Every gym shares one interface and one tool. The agent acts by calling

    interact_with_env(choice, content)      choice in {action, search, answer}

`action` talks to the user, `search` queries the gym's search/tool backend, `answer` commits an answer.
Plain text that starts with `[action]`, `[search]`, `[answer]` or `[finish]` is accepted too.

    env = make_env("function", task, user=None)   # user=None: the offline scripted user
    first_message = env.reset()
    observation, reward, done, info = env.step(agent_turn_text)
    env.episode_score()                           # at the end: the number the paper's evaluation reports

`make_env(..., eval_mode=True)` plays the paper's evaluation settings instead of its training settings (see Env).
The eight gyms: function, telepathy, turtle, intention, persuade (dialogue), travel, tau, search (tool-backed,
their worlds in travel.py, retail.py, search.py).

Whatever the agent writes, `step` never raises and never executes it: a malformed turn gets an
observation that says what was wrong, reward 0, and costs a turn.
"""
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import retail
import search
import travel
import users
from function_rules import apply_rule, compile_rule, fmt_number

DATA_DIR = Path(__file__).resolve().parent / "data"
# The tool-backed gyms' scripted roles live next to their worlds, which import users for its parsers and keyword
# rules; they join the scripted user's table here, where the gyms are assembled (users.py cannot import them).
users.ROLES.update({**travel.ROLES, **retail.ROLES, **search.ROLES})

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
CHOICES = ("action", "search", "answer", "finish")

# ----------------------------------------------------------------------------------------------------------
# Parsing the agent's turn


class ActionError(ValueError):
    """The agent's turn holds no usable action. `missing` is True when there was no tool call at all
    (the rollout ends such an episode, as the original does); False when one was there but malformed."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


@dataclass
class Action:
    choice: str
    content: str


TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
PLAIN_RE = re.compile(r"^\s*\[(action|search|answer|finish)\]\s*(.*)$", re.S | re.I)


def parse_action(text: str) -> Action:
    """The agent's action in `text`: the LAST `<tool_call>` block (as in the original, one assistant turn
    is one env turn, and when it holds several calls the last one wins), else a plain `[choice] content`.
    Thinking (`<think>...</think>`) before the call is ignored. Raises ActionError saying what is wrong."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    calls = TOOL_CALL_RE.findall(text)
    if not calls:
        m = PLAIN_RE.match(text.replace("<|im_end|>", ""))
        if not m:
            raise ActionError("No tool call found. Call interact_with_env with a choice and a content.", missing=True)
        return _check(m.group(1).lower(), m.group(2).strip())
    raw = calls[-1].strip()
    try:
        call = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError also covers integers past Python's digit limit
        raise ActionError("The tool call is not valid JSON. Write "
                          '{"name": "interact_with_env", "arguments": {"choice": ..., "content": ...}}.')
    if not isinstance(call, dict) or call.get("name") != "interact_with_env":
        raise ActionError("Unknown tool. The only tool is interact_with_env.")
    args = call.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            args = None
    if not isinstance(args, dict) or not isinstance(args.get("choice"), str) or not isinstance(args.get("content"), str):
        raise ActionError('The arguments must be an object with string fields "choice" and "content".')
    choice = args["choice"].strip().lower()
    content = args["content"].strip()
    m = PLAIN_RE.match(content)  # "[answer] 42" inside content means the same as content "42"
    if m and m.group(1).lower() == choice:
        content = m.group(2).strip()
    return _check(choice, content)


def _check(choice: str, content: str) -> Action:
    if choice not in CHOICES:
        raise ActionError(f"Unknown choice {choice[:40]!r}. Use one of: action, search, answer.")
    if not content and choice != "finish":
        raise ActionError(f"The content of your {choice} is empty.")
    return Action(choice, content)


# ----------------------------------------------------------------------------------------------------------
# The interface every gym implements

MAX_CONTENT_CHARS = 8000  # longer contents are refused: they would only overflow the user model's context
FOOTER = ("\n\nThink step by step inside <think></think> before each call of interact_with_env. You have at "
          "most {max_turns} turns, and every call uses one, valid or not.")


class Env:
    """One episode of one task. A gym subclasses this: it sets `name`, `choices` (those it allows),
    `required` (task fields it needs) and `system_prompt` (with a `{max_turns}` slot), and implements
    `opening()` (start the episode: set per-episode state, return the first message) and
    `act(choice, content) -> (observation, reward, done)`. `act` may raise ActionError for a malformed
    content and may add entries to `self.info`. A UserError from the user propagates out of `step`.

    Constructor arguments every gym takes (through `make_env(name, task, user, **overrides)`):
    - `max_turns`: the turn limit; the turn that reaches it ends the episode (`info["truncated"]`).
    - `eval_mode`: False plays the paper's training settings, True its evaluation settings. Where a gym's
      two settings differ (TravelGym's search and preference rewards, whether observations show the
      reward) it follows this switch; a gym without a difference ignores it. One switch, so a trainer
      can pass the same value to every gym.
    - `show_reward`: append "Reward: r" to observations; None follows `eval_mode` (the paper's training
      shows the reward, its evaluation does not)."""

    name = "base"
    choices = ("action", "search", "answer")
    required = ()
    system_prompt = ""
    original_files = ()
    """names of the original UserRL data files that `load_original` reads"""

    def __init__(self, task: dict, user=None, max_turns: int = 16, show_reward: bool | None = None,
                 eval_mode: bool = False, malformed: str = "end"):
        missing = [k for k in self.required if k not in task]
        if missing:
            raise ValueError(f"{self.name} task {task.get('id', '?')!r}: missing field(s) {missing}")
        self.task = task
        self.user = user if user is not None else users.make_user("scripted")
        self.max_turns = max_turns
        self.eval_mode = eval_mode
        self.malformed = malformed
        self.show_reward = (not eval_mode) if show_reward is None else show_reward
        self.turn = 0
        self.info = {}
        self.rewards = []  # this episode's turn rewards, for episode_score()

    def system(self) -> str:
        return self.system_prompt.format(max_turns=self.max_turns)

    def reset(self) -> str:
        self.turn = 0
        self.rewards = []
        return self.opening()

    def step(self, text: str):
        self.turn += 1
        self.info = {"turn": self.turn}
        try:
            action = parse_action(text)
            self.info["choice"] = action.choice
            if action.choice == "finish":
                obs, reward, done = "The episode is finished.", self.closing_reward(), True
            elif action.choice not in self.choices:
                allowed = ", ".join(self.choices)
                raise ActionError(f"The choice {action.choice!r} is not allowed in this task. Allowed: {allowed}.")
            elif len(action.content) > MAX_CONTENT_CHARS:
                raise ActionError(f"The content is too long ({len(action.content)} characters; the limit is "
                                  f"{MAX_CONTENT_CHARS}).")
            else:
                obs, reward, done = self.act(action.choice, action.content)
        except ActionError as e:
            obs, reward, done = f"Error: {e}", 0.0, False
            self.info["error"] = str(e)
            self.info["missing_tool_call"] = e.missing
        if not done and self.turn >= self.max_turns:
            done, self.info["truncated"] = True, True
            reward += self.closing_reward()
        self.rewards.append(float(reward))
        if self.show_reward:
            obs = f"{obs}\nReward: {round(float(reward), 4)}"
        return obs, float(reward), done, self.info

    def closing_reward(self) -> float:
        """Added to the last turn when the agent finishes (`[finish]`) or the turn limit cuts the episode off.
        0 where rewards are paid per turn; a gym that scores the whole episode at its end (TauGym) pays here."""
        return 0.0

    def episode_score(self) -> float:
        """The number the paper's evaluation reports for this episode: the sum of its turn rewards (TravelGym
        overrides it). The rollout calls it when an episode ends."""
        return float(sum(self.rewards))

    def fallback(self, observation: str):
        """The turn when the user's reply could not be understood: reward 0, as in the original."""
        self.info["user_fallback"] = True
        return observation, 0.0, False

    def opening(self) -> str:
        raise NotImplementedError

    def act(self, choice: str, content: str):
        raise NotImplementedError

    @staticmethod
    def from_original(record: dict) -> dict:
        """One original UserRL record as a task in this gym's fields."""
        raise NotImplementedError

    @classmethod
    def load_original(cls, data_dir: Path, split: str) -> list[dict]:
        """This gym's tasks from its original UserRL file in `data_dir`. The original ships one file per gym
        and splits it while building its parquet files; we split with a seeded shuffle, 1/10 to test (the same
        proportions, not the same rows)."""
        path = next((data_dir / f for f in cls.original_files if (data_dir / f).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{cls.name}: none of {list(cls.original_files)} found in {data_dir}")
        tasks = cls.read_original(path)
        order = list(range(len(tasks)))
        random.Random(42).shuffle(order)
        n_test = max(1, round(len(tasks) / 10))
        return [tasks[i] for i in sorted(order[n_test:] if split == "train" else order[:n_test])]

    @classmethod
    def read_original(cls, path: Path) -> list[dict]:
        """Every record of an original file (a JSON array, or JSON lines) converted by `from_original`."""
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: expected a JSON array of objects or JSON lines")
        tasks = []
        for i, record in enumerate(records):
            try:
                tasks.append(cls.from_original(record))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: record {i} does not have the original {cls.name} layout ({e!r})") from None
        return tasks


def role_messages(system: str, turns, last: str) -> list[dict]:
    """A role's prompt: its system text, earlier (agent, role) exchanges, then the agent's latest turn."""
    messages = [{"role": "system", "content": system}]
    for said, answered in turns:
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": last}]


# ----------------------------------------------------------------------------------------------------------
# FunctionGym: find a hidden arithmetic rule f(a, b, c, d) by querying it. Rule-based: the rule is the user.
# Rules are parsed and evaluated by function_rules.py, never by `eval`.

NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


FUNCTION_PROMPT = """You are working out a hidden function f(a, b, c, d) of four numbers. It combines them with +, -, *, / and powers. Your goal is the value of f on a secret test case.

Call interact_with_env with one of these choices:
- search: the content "test" shows the four numbers of the test case.
- action: the content is four numbers a b c d, e.g. "1 2 3 4"; you are told f at those numbers (rounded to 4 decimals). Querying the test case itself is not allowed.
- answer: the content is one number, your value of f on the test case; it must be right to within 1e-6. A right answer ends the task; a wrong one costs a turn.
Choose queries that tell you how each input enters f.""" + FOOTER


class FunctionGym(Env):
    name = "function"
    choices = ("action", "search", "answer")
    required = ("rule", "test_case", "expected_result")
    system_prompt = FUNCTION_PROMPT
    original_files = ("functions.json", "functiongym-functions.json")

    def __init__(self, task, user=None, **kwargs):
        super().__init__(task, user, **kwargs)
        self.tree = compile_rule(task["rule"])

    def opening(self):
        return ('I have a hidden function f(a, b, c, d). What is its value on my test case? Search for "test" '
                "to see the test case, query f at numbers of your choice, then answer.")

    def act(self, choice, content):
        if choice == "search":
            if content.strip(" .!?\"'`").lower() != "test":
                raise ActionError('Search accepts only "test", which shows the test case.')
            return f"The test case is {self.task['test_case']}.", 0.0, False
        xs = [float(n) for n in NUMBER_RE.findall(content)]
        if not all(math.isfinite(x) for x in xs):
            raise ActionError("The numbers must be finite.")
        if choice == "action":
            if len(xs) != 4:
                raise ActionError(f'Give exactly four numbers a b c d, e.g. "1 2 3 4" (found {len(xs)}).')
            if xs == [float(x) for x in self.task["test_case"]]:
                raise ActionError("You may not query the test case itself.")
            shown = "[" + ", ".join(fmt_number(x) for x in xs) + "]"
            y = apply_rule(self.tree, xs)
            if y is None:
                return f"For numbers {shown}, f is undefined (a division by zero or a power out of range).", 0.0, False
            return f"For numbers {shown}, the result is {fmt_number(y)}.", 0.0, False
        if len(xs) != 1:
            raise ActionError(f"Answer with exactly one number (found {len(xs)}).")
        if abs(xs[0] - float(self.task["expected_result"])) <= 1e-6:
            return "Correct!", 1.0, True
        return "That is not the value of f on the test case.", 0.0, False

    @staticmethod
    def from_original(record):
        return {k: record[k] for k in ("id", "rule", "test_case", "expected_result")}


# ----------------------------------------------------------------------------------------------------------
# TelepathyGym: twenty questions. The user thinks of an entity and answers yes/no questions; a judge rules
# on guesses. Reward 1 for the (first, and final) correct guess.

TELEPATHY_PROMPT = """I am thinking of something, and you must find out what it is, as in twenty questions.

Call interact_with_env with one of these choices:
- action: ask me one yes/no question; I answer Yes, No or Maybe.
- answer: name what you think it is. A right guess ends the game; a wrong one costs a turn.
Ask questions that split the remaining possibilities in half, and guess when you are fairly sure.""" + FOOTER

TELEPATHY_ANSWERER = """You are playing twenty questions. The thing you have in mind is: {entity} (category: {category}). {description}

The player asks yes/no questions about it. Answer each with one word: Yes, No or Maybe. Say Maybe only when the honest answer depends on circumstances or nobody knows. Never name the thing and never add hints."""

TELEPATHY_JUDGE = """You judge a guessing game. The hidden answer is: {entity} (category: {category}; other names: {synonyms}). {description}

Decide whether the player's guess names exactly this thing or an unmistakable synonym of it. A broader class, a related thing, or several guesses at once is wrong.
Reply with JSON only: {{"correct": true}} or {{"correct": false}}."""


class TelepathyGym(Env):
    name = "telepathy"
    choices = ("action", "answer")
    required = ("entity", "category", "description")
    system_prompt = TELEPATHY_PROMPT
    original_files = ("all_entities_refined.json",)

    def opening(self):
        return f'I am thinking of something in the category "{self.task["category"]}". What is it?'

    def act(self, choice, content):
        t = self.task
        if choice == "action":
            system = TELEPATHY_ANSWERER.format(entity=t["entity"], category=t["category"], description=t["description"])
            reply = self.user.act("telepathy.answerer", role_messages(system, [], content), task=t, question=content)
            answer = users.extract_yes_no(reply)
            return (answer, 0.0, False) if answer else self.fallback("I cannot answer that; ask another yes/no question.")
        system = TELEPATHY_JUDGE.format(entity=t["entity"], category=t["category"], description=t["description"],
                                        synonyms=", ".join(t.get("synonyms", [])) or "none")
        verdict = users.extract_json(self.user.act("telepathy.judge", role_messages(system, [], f"The guess: {content}"),
                                                   task=t, guess=content))
        correct = None if verdict is None else _as_bool(verdict.get("correct"))
        if correct is None:
            return self.fallback("I could not decide on that guess; try again.")
        if correct:
            return f"Correct! I was thinking of {t['entity']}.", 1.0, True
        return "No, that is not what I am thinking of.", 0.0, False

    @staticmethod
    def from_original(record):
        # The original entities carry no keyword lists: the scripted answerer then says Maybe to every
        # question, so train on them with an LLM user.
        return {"id": record.get("id", record["target_entity"]), "category": record["category"],
                "entity": record["target_entity"], "synonyms": [], "description": record["description"],
                "attributes": {"yes": [], "no": []}}


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        return value.strip().lower() in ("true", "yes")
    return None


# ----------------------------------------------------------------------------------------------------------
# TurtleGym: lateral-thinking ("turtle soup") puzzles. A host answers yes/no questions about the hidden
# story; a judge scores each told story against weighted criteria. The reward is the improvement over the
# best score so far, so an episode's rewards sum to its best score.

TURTLE_PROMPT = """You are solving a lateral-thinking puzzle ("turtle soup"). You are shown a short, strange story; a host knows the full hidden story behind it. Work out what really happened.

Call interact_with_env with one of these choices:
- action: ask the host one yes/no question; the host answers Yes, No or Maybe.
- answer: tell the whole story as you now believe it happened. It is scored against the key points of the hidden story; you may answer again to improve your score, and the puzzle ends when every key point is right.""" + FOOTER

TURTLE_HOST = """You host a lateral-thinking puzzle. The player was shown this story:
{surface}

What really happened (secret: never reveal it):
{bottom}

The player asks yes/no questions. Answer each with one word, Yes, No or Maybe, according to what really happened. Use Maybe rarely: only when the hidden story does not settle the question or it does not matter."""

TURTLE_JUDGE = """You score a player's solution to a lateral-thinking puzzle.

What really happened:
{bottom}

Key points, numbered:
{points}

For each key point, give 1 if the player's story states it clearly, 0.5 if it states it partly or vaguely, and 0 if it is missing or contradicted.
Reply with JSON only: {{"scores": [one number per key point, in order]}}."""


class TurtleGym(Env):
    name = "turtle"
    choices = ("action", "answer")
    required = ("title", "surface", "bottom", "criteria")
    system_prompt = TURTLE_PROMPT
    original_files = ("all_stories_refined.json",)

    def __init__(self, task, user=None, success_threshold: float = 1.0, **kwargs):
        super().__init__(task, user, **kwargs)
        self.success_threshold = success_threshold  # the original trains and evaluates at 1.0
        self.best = 0.0

    def opening(self):
        self.best = 0.0
        return f"{self.task['title']}\n\n{self.task['surface']}\n\nWhat really happened?"

    def act(self, choice, content):
        t = self.task
        if choice == "action":
            system = TURTLE_HOST.format(surface=t["surface"], bottom=t["bottom"])
            answer = users.extract_yes_no(self.user.act("turtle.host", role_messages(system, [], content),
                                                        task=t, question=content))
            return (answer, 0.0, False) if answer else self.fallback("The host cannot answer that; ask another yes/no question.")
        points = "\n".join(f"{i}. {c['statement']}" for i, c in enumerate(t["criteria"], 1))
        system = TURTLE_JUDGE.format(bottom=t["bottom"], points=points)
        verdict = users.extract_json(self.user.act("turtle.judge", role_messages(system, [], f"The player's story:\n{content}"),
                                                   task=t, story=content))
        scores = _criterion_scores(verdict, len(t["criteria"]))
        if scores is None:
            return self.fallback("Your story could not be scored this time; tell it again.")
        score = sum(float(c["weight"]) * s for c, s in zip(t["criteria"], scores))
        reward = max(0.0, score - self.best)
        self.best = max(self.best, score)
        self.info["score"] = score
        done = score >= self.success_threshold - 1e-9  # weights such as 0.5 + 0.3 + 0.2 sum to 0.99999...
        right = [c["statement"] for c, s in zip(t["criteria"], scores) if s == 1.0]
        obs = f"Your story scores {score:.2f} out of 1."
        if right:
            obs += " Points you have right: " + " ".join(right)
        return obs + (" You solved it!" if done else " Something is still missing: keep asking."), reward, done

    @staticmethod
    def from_original(record):
        return {"id": record["new_title"], "title": record["new_title"], "surface": record["new_surface"],
                "bottom": record["new_bottom"],
                "criteria": [{"statement": e["statement"], "weight": float(e["score"]), "keywords": []}
                             for e in record["evaluation"]],
                "host_facts": {"yes": [], "no": []}}


def _criterion_scores(verdict, n: int):
    """The judge's n scores, each snapped to 0 / 0.5 / 1, or None when they are not n numbers."""
    scores = verdict.get("scores") if isinstance(verdict, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        return None
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        return None
    return [round(2 * min(1.0, max(0.0, float(s)))) / 2 for s in scores]


# ----------------------------------------------------------------------------------------------------------
# IntentionGym: a vague request with hidden missing details; the agent may only ask. A user who does not see
# the detail list answers; an evaluator who does decides which remaining details the question covers.

INTENTION_PROMPT = """A user asks you for help, but the request is vague: details that matter are missing. Find them out before any work starts.

Call interact_with_env with this choice:
- action: ask the user one clarifying question.
Ask one focused question per turn, most important details first. Do not do the task itself. The conversation ends when every important detail is clear.""" + FOOTER

INTENTION_USER = """You asked an assistant for help with this: {task}

The assistant asks you questions to understand what you want. Answer as a real person would: briefly, naturally, and only what was asked. Do not bring up details the assistant has not asked about, and never do the task yourself. If you have no preference on something, say so."""

INTENTION_EVALUATOR = """You check which details of a vague request an assistant's question asks about.

The request: {task}
Details still unknown, numbered:
{details}

A detail is covered when the question clearly asks about it, so that the answer would settle it. Also say whether the question is about the request at all.
Reply with JSON only: {{"covered": [numbers of the covered details], "task_related": true or false}}."""


def clarification_reward(importances: list[int]) -> float:
    """One question's reward: 1.0 / 0.7 / 0.4 by the highest importance (3 / 2 / 1) it newly covers, minus
    0.2 per extra detail covered at once (the original discourages many-part questions), clipped to [0, 1]."""
    if not importances:
        return 0.0
    base = {3: 1.0, 2: 0.7, 1: 0.4}[max(importances)]
    return min(1.0, max(0.0, base - 0.2 * (len(importances) - 1)))


class IntentionGym(Env):
    name = "intention"
    choices = ("action",)
    required = ("task", "missing_details")
    system_prompt = INTENTION_PROMPT
    original_files = ("all_intentions_train.json", "all_intentions_test.json")

    def opening(self):
        self.remaining = list(self.task["missing_details"])
        self.exchanges = []
        return self.task["task"]

    def act(self, choice, question):
        t = self.task
        system = INTENTION_USER.format(task=t["task"])
        reply = users.strip_think(self.user.act("intention.user", role_messages(system, self.exchanges[-3:], question),
                                                task=t, question=question))
        if not reply:
            self.info["user_fallback"] = True
            reply = "Sorry, I am not sure what you mean."
        self.exchanges.append((question, reply))
        details = "\n".join(f"{i}. {d['description']}" for i, d in enumerate(self.remaining, 1))
        system = INTENTION_EVALUATOR.format(task=t["task"], details=details)
        verdict = users.extract_json(self.user.act("intention.evaluator", role_messages(system, [], f"The question: {question}"),
                                                   task=t, remaining=self.remaining, question=question))
        covered = _covered(verdict, len(self.remaining))
        if covered is None:
            self.info["user_fallback"] = True
            covered = []
        reward = clarification_reward([int(self.remaining[i]["importance"]) for i in covered])
        self.remaining = [d for i, d in enumerate(self.remaining) if i not in covered]
        self.info["covered"] = len(covered)
        return reply, reward, not self.remaining

    @classmethod
    def load_original(cls, data_dir, split):
        # The original ships its own train and test files for this gym: use them as they are.
        path = data_dir / cls.original_files[0 if split == "train" else 1]
        if not path.is_file():
            raise FileNotFoundError(f"intention: {path} not found")
        return cls.read_original(path)

    @staticmethod
    def from_original(record):
        details = [{**{k: d[k] for k in ("description", "inquiry", "options")}, "importance": int(d["importance"]),
                    "keywords": []} for d in record["missing_details"]]
        return {"id": record["id"], "category": record["category"], "task": record["task"], "missing_details": details}


def _covered(verdict, n: int):
    """0-based indices of the covered details (none when the question is off the task), or None if unreadable."""
    if not isinstance(verdict, dict) or not isinstance(verdict.get("covered"), list):
        return None
    if _as_bool(verdict.get("task_related", True)) is False:
        return []
    indices = set()
    for v in verdict["covered"]:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= n:
            indices.add(v - 1)
    return sorted(indices)


# ----------------------------------------------------------------------------------------------------------
# PersuadeGym: the user holds a claim at "Strongly Agree"; the agent argues. Reward: levels moved toward
# disagreement / 6 when positive (re-earned if the stance slips back), done at "Strongly Disagree".

STANCES = ("Strongly Agree", "Agree", "Partly Agree", "Neutral", "Partly Disagree", "Disagree", "Strongly Disagree")

PERSUADE_PROMPT = """You are talking with a person who holds a firm opinion. Change their mind with honest, well-reasoned arguments.

Call interact_with_env with this choice:
- answer: your next message to them (an argument, a question, or a reply to what they said).
After each message they answer and say where they stand on a 7-point scale from Strongly Agree to Strongly Disagree. The conversation ends when they strongly disagree with their original claim.""" + FOOTER

PERSUADEE = """You are a person with a firm opinion, in a conversation. Your claim: {claim}
Why you believe it: {argument}

Your stance on the claim right now: {stance}. The scale: {scale}.

Someone is trying to change your mind. Reply to their latest message in your own voice, speaking to them as "you", in at most about 150 words. Move your stance only as far as their reasons really convince you: a strong new point can move you; repetition or pressure should not.
Reply with JSON only: {{"response": "your reply", "stance": "one label from the scale"}}."""


def stance_reward(old: int, new: int) -> float:
    return max(0, new - old) / (len(STANCES) - 1)


def parse_stance(value):
    if not isinstance(value, str):
        return None
    wanted = " ".join(re.sub(r"[^a-z ]", " ", value.lower()).split())
    return next((i for i, s in enumerate(STANCES) if s.lower() == wanted), None)


class PersuadeGym(Env):
    name = "persuade"
    choices = ("answer",)
    required = ("claim", "argument")
    system_prompt = PERSUADE_PROMPT
    original_files = ("all_statements_refined.json",)

    def opening(self):
        self.stance, self.history = 0, []
        return (f"{self.task['claim']}\n\n{self.task['argument']}\n\n"
                f"I {STANCES[0].lower()} with this. Change my mind if you can.")

    def act(self, choice, argument):
        t = self.task
        system = PERSUADEE.format(claim=t["claim"], argument=t["argument"], stance=STANCES[self.stance],
                                  scale=", ".join(STANCES))
        out = users.extract_json(self.user.act("persuade.persuadee", role_messages(system, self.history, argument),
                                               task=t, stance=STANCES[self.stance], scale=STANCES,
                                               history=[a for a, _ in self.history], argument=argument))
        new = parse_stance(out.get("stance")) if out else None
        response = out.get("response") if out else None
        if new is None or not isinstance(response, str):
            return self.fallback(f"Let me think about that. (My stance is still: {STANCES[self.stance]}.)")
        reward = stance_reward(self.stance, new)
        self.history.append((argument, response))
        self.stance = new
        self.info["stance"] = STANCES[new]
        return f"{response}\n(My stance: {STANCES[new]}.)", reward, new == len(STANCES) - 1

    @staticmethod
    def from_original(record):
        return {"id": record["id"], "claim": record["claim"], "argument": record["argument"], "counterpoints": []}


# ----------------------------------------------------------------------------------------------------------
# The tool-backed gyms. Their worlds (data generators, judging, rewards, role prompts and scripted rules) live
# in travel.py, retail.py and search.py, one Session class each; the classes here map the agent's choices
# onto a session and add what every gym shares (the prompt, the turn limit, the original-data loader).

# TravelGym: book a trip for a user whose preferences are hidden; search, ask, then choose one option per aspect.

TRAVEL_PROMPT = """You are a travel assistant booking a trip for a user. Their first message says what they need (for example a flight and a hotel) but not what matters to them: each part of the trip comes with preferences they have not told you. For every part, find the cheapest option that meets all of their preferences.

Call interact_with_env with one of these choices:
- search: query the booking database for ONE part of the trip and state all of its details, e.g. "flight from Boston to Denver on April 10" or "hotel in Denver from April 10 to April 14". You get every option for that part, one JSON object per line. Searching the same part again gives nothing new; when the database reports a problem, simply search again.
- action: say something to the user. Ask one concrete question at a time about a specific feature (departure time, stops, breakfast, parking...); vague questions such as "any preferences?" get you nowhere. The user tends to hint at a preference rather than state it, so read the replies carefully.
- answer: recommend option ids, e.g. "F12" or "F12, H3". Only your first choice for each part of the trip counts, and it closes that part. The task ends when every part has a choice.
Search first, then ask about the features that set the options apart, then choose.""" + FOOTER

# (search reward, preference reward) by eval_mode: the paper trains with 0.0 / 0.8 and evaluates with 0.2 / 0.6.
TRAVEL_REWARDS = {False: (0.0, 0.8), True: (0.2, 0.6)}
# The original ships one file per structure (digits = preferences per aspect) and names the car "rental_car".
TRAVEL_STRUCTURES = ("22", "33", "44", "233", "333", "334", "444", "2222")
ORIGINAL_ASPECTS = {"flight": "flight", "hotel": "hotel", "apartment": "apartment", "rental_car": "car",
                    "restaurant": "restaurant"}
BUDGET_NOTE = "Money is tight, so for each of these I'd like the cheapest option that still suits me."


class TravelGym(Env):
    name = "travel"
    choices = ("search", "action", "answer")
    required = ("request", "aspects")
    system_prompt = TRAVEL_PROMPT
    original_files = tuple(f"travelgym_data_{s}.json" for s in TRAVEL_STRUCTURES)

    def __init__(self, task, user=None, search_reward: float | None = None, preference_reward: float | None = None,
                 **kwargs):
        super().__init__(task, user, **kwargs)
        train_or_eval = TRAVEL_REWARDS[bool(self.eval_mode)]
        self.search_reward = train_or_eval[0] if search_reward is None else search_reward
        self.preference_reward = train_or_eval[1] if preference_reward is None else preference_reward
        self.session = self._session()  # here too, so that episode_score() is defined before reset()

    def _session(self):
        return travel.TravelSession(self.task, self.user, search_reward=self.search_reward,
                                    preference_reward=self.preference_reward)

    def opening(self):
        self.session = self._session()
        return self.task["request"]

    def act(self, choice, content):
        s = self.session
        return {"search": s.search, "action": s.talk, "answer": s.answer}[choice](content)

    def episode_score(self):
        # The paper reports, per aspect, the reward of the option chosen (best 1, correct 0.8), averaged over
        # aspects: searches and elicited preferences earn turn rewards but are not part of the score.
        return self.session.score()

    @classmethod
    def load_original(cls, data_dir, split):
        """Every `travelgym_data_<structure>.json` in `data_dir`, each split 85 / 15 as the original's
        preprocessing does (a seeded shuffle per file: the same proportions, not the same rows)."""
        paths = [data_dir / f for f in cls.original_files if (data_dir / f).is_file()]
        if not paths:
            raise FileNotFoundError(f"travel: none of {list(cls.original_files)} found in {data_dir}")
        out = []
        for path in paths:
            tasks = cls.read_original(path)
            order = list(range(len(tasks)))
            random.Random(42).shuffle(order)
            n_test = round(len(tasks) * 0.15)
            out += [tasks[i] for i in sorted(order[n_test:] if split == "train" else order[:n_test])]
        return out

    @classmethod
    def read_original(cls, path):
        """An original file is one JSON object of scenarios keyed by id (e.g. "flight:2-37|hotel:2-9")."""
        try:
            scenarios = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(scenarios, dict):
            raise ValueError(f"{path}: expected a JSON object of travel scenarios keyed by id")
        tasks = []
        for key, record in scenarios.items():
            try:
                tasks.append(cls.from_original({**record, "id": key}))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise ValueError(f"{path}: scenario {key!r} does not have the original travel layout ({e!r})") from None
        return tasks

    @staticmethod
    def from_original(record):
        """`{initial_description, dimensions, <dimension>: {preferences: [[aspect, subcategory, text, implicit
        statement, ...]], arguments, options: {correct, wrong, noise}, correct_ids, best_id}}` as a travel task.
        The preferences carry no keywords: with the scripted user they are only ever volunteered, so play these
        tasks with an LLM user."""
        aspects = []
        for dim in record["dimensions"]:
            d, name = record[dim], ORIGINAL_ASPECTS[dim]
            # the original drops its annotations and shuffles the options at load time; a seed fixes our order
            options = [{k: v for k, v in o.items() if k not in ("type", "reason")}
                       for kind in ("correct", "wrong", "noise") for o in d["options"].get(kind, [])]
            random.Random(f"{record['id']}/{dim}").shuffle(options)
            ids = [o["id"] for o in options]
            if not all(isinstance(i, str) for i in ids) or d["best_id"] not in ids or not set(d["correct_ids"]) <= set(ids):
                raise ValueError(f"{dim}: best_id and correct_ids must be ids of its options")
            prefs = [{"id": f"{name}.p{i}", "text": p[2], "hint": p[3], "keywords": []}
                     for i, p in enumerate(d["preferences"], 1)]
            if not all(isinstance(p[k], str) and p[k] for p in prefs for k in ("text", "hint")):
                raise ValueError(f"{dim}: every preference needs its text and implicit statement")
            # the scripted search judge matches argument values as text
            arguments = {k: v if isinstance(v, str) else json.dumps(v) for k, v in d["arguments"].items()}
            aspects.append({"aspect": name, "arguments": arguments, "preferences": prefs, "options": options,
                            "correct_ids": list(d["correct_ids"]), "best_id": d["best_id"]})
        if not aspects:
            raise ValueError("no dimensions")
        return {"id": record["id"], "structure": "".join(str(len(a["preferences"])) for a in aspects),
                "request": f"{record['initial_description'].strip()} {BUDGET_NOTE}", "aspects": aspects,
                "best_ids": [a["best_id"] for a in aspects]}


# TauGym: customer service over a store database with tools (after tau-bench); scored once, at the end.

TAU_PROMPT = """You are a customer-support agent of an online store, chatting with a customer. Help them with their request using the store's tools, and follow the store's policy.

Call interact_with_env with one of these choices:
- search: the content "tools" lists the tools and their arguments (once is enough).
- action: send the customer a message.
- answer: call one tool on the store's database, written as JSON: {{"name": "<tool>", "arguments": {{...}}}}. You see what it returns; a wrong call returns an error message.
The store's policy:
- Before you look at or change an account or its orders, identify the customer by their email, or by their first name, last name and zip code, and find their user id with a tool.
- Act only on that customer's own account and orders.
- Before any change (cancelling, a new address, a return or an exchange), tell the customer exactly what you are about to do and wait for their yes.
- When the customer asks for information, such as an amount, tell it to them in a message.
- Transfer the customer to a human agent only when the tools cannot handle the request.
The conversation ends when the customer is satisfied or is transferred. You succeed when the store's records end up exactly as the customer wanted and they were told what they asked for.""" + FOOTER


class TauGym(Env):
    name = "tau"
    choices = ("search", "action", "answer")
    required = ("db_seed", "db_sha", "instruction", "customer", "actions", "outputs")
    system_prompt = TAU_PROMPT

    def __init__(self, task, user=None, **kwargs):
        super().__init__(task, user, **kwargs)
        self.session = retail.RetailSession(task, self.user)  # refuses a task written for another database

    def opening(self):
        self.session = retail.RetailSession(self.task, self.user)
        return self.session.opening()  # the customer speaks first

    def act(self, choice, content):
        s = self.session
        return {"search": s.tools, "action": s.talk, "answer": s.call}[choice](content)

    def closing_reward(self):
        # tau-bench scores the final database once; as in the original, [finish] and running out of turns are
        # ends too, so they are paid the same reward (0 unless the records are already as they should be).
        return self.session.reward()

    @classmethod
    def load_original(cls, data_dir, split):
        raise ValueError(
            "tau: the original TauGym tasks (tau-bench records {id, obs, info.task{user_id, actions, instruction, "
            "outputs}}) refer to tau-bench's own retail and airline databases and tool implementations, which this "
            "project does not have; they cannot be loaded from data_dir. Use this project's tasks (data/tau), or "
            "tau-bench itself.")


# SearchGym: multi-hop questions answered with a search backend (local BM25 by default, or a web search API).

SEARCH_PROMPT = """Answer the user's question. It chains several facts (for example: who founded a company, then where that person was born), so find them one at a time.

Call interact_with_env with one of these choices:
- search: a search query; you get the top results, each a title and a text. You have at most {max_searches} searches, so make every query specific.
- answer: your answer, short: just the name, place, number or date asked for. A right answer ends the task; a wrong one costs a turn.
Work out the chain of facts first, search for one link at a time, and answer from what the results say.""" + FOOTER


class SearchGym(Env):
    name = "search"
    choices = ("search", "answer")
    required = ("question", "answer", "aliases")
    system_prompt = SEARCH_PROMPT
    original_files = ("questions.json",)

    def __init__(self, task, user=None, backend="local", backend_options: dict | None = None,
                 max_searches: int = 5, **kwargs):
        """`backend`: "local" (BM25 over the task's own corpus), "serper" (a web search API; `backend_options`
        go to search.SerperSearch, e.g. url, api_key_env), or any object with `search(query)`."""
        super().__init__(task, user, **kwargs)
        if isinstance(backend, str):
            options = dict(backend_options or {})
            if backend == "local":
                if not task.get("corpus"):
                    raise ValueError(f"search task {task.get('id', '?')!r} has no local corpus (original Bamboogle "
                                     "questions are answered from the web): use backend='serper'")
                options["corpus"] = task["corpus"]
            backend = search.make_backend(backend, **options)
        self.backend, self.max_searches = backend, max_searches
        self.session = self._session()

    def _session(self):
        return search.SearchSession(self.task, self.user, backend=self.backend, max_searches=self.max_searches)

    def system(self):
        return self.system_prompt.format(max_turns=self.max_turns, max_searches=self.max_searches)

    def opening(self):
        self.session = self._session()
        return f"{self.task['question']}\nPlease look it up step by step and tell me the answer."

    def act(self, choice, content):
        return self.session.search(content) if choice == "search" else self.session.answer(content)

    @classmethod
    def load_original(cls, data_dir, split):
        """The original's SearchGym is evaluation only: the Bamboogle records of `questions.json`
        (`{id: "Bamboogle-N", question, answer}`) are all test tasks. They are answered from the web, so they play
        with backend="serper" only."""
        if split != "test":
            raise ValueError("search: the original SearchGym data (Bamboogle) is for evaluation only; it has no train split")
        path = data_dir / cls.original_files[0]
        if not path.is_file():
            raise FileNotFoundError(f"search: {path} not found")
        tasks = [t for t in cls.read_original(path) if t["id"].lower().startswith("bamboogle")]
        if not tasks:
            raise ValueError(f"{path}: no Bamboogle records (ids such as 'Bamboogle-1')")
        return tasks

    @staticmethod
    def from_original(record):
        if not isinstance(record["question"], str):
            raise ValueError("question must be a string")
        return {"id": str(record["id"]), "question": record["question"], "answer": str(record["answer"]), "aliases": []}


# ----------------------------------------------------------------------------------------------------------
# Registry and task data. A new gym is one class above and one line here.

GYMS: dict = {"function": FunctionGym, "telepathy": TelepathyGym, "turtle": TurtleGym,
              "intention": IntentionGym, "persuade": PersuadeGym, "travel": TravelGym, "tau": TauGym,
              "search": SearchGym}


def load_tasks(name: str, split: str = "train", data_dir: str | None = None) -> list[dict]:
    """The tasks of one gym: `data/<gym>/<split>.jsonl`, or the original UserRL files under `data_dir`."""
    if name not in GYMS:
        raise KeyError(f"unknown gym {name!r}; known: {sorted(GYMS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if data_dir is not None:
        return GYMS[name].load_original(Path(data_dir), split)
    path = DATA_DIR / name / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_env(name: str, task: dict, user=None, **overrides) -> Env:
    if name not in GYMS:
        raise KeyError(f"unknown gym {name!r}; known: {sorted(GYMS)}")
    return GYMS[name](task, user=user, **overrides)
