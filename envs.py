"""The gyms: environments in which the agent helps a simulated user (UserRL, arXiv 2509.19736, section 3).

Every gym shares one interface and one tool. The agent acts by calling

    interact_with_env(choice, content)      choice in {action, search, answer}

`action` talks to the user, `search` queries the gym's search/tool backend, `answer` commits an answer.
Plain text that starts with `[action]`, `[search]`, `[answer]` or `[finish]` is accepted too.

    env = make_env("function", task, user=None)   # user=None: the offline scripted user
    first_message = env.reset()
    observation, reward, done, info = env.step(agent_turn_text)

Whatever the agent writes, `step` never raises and never executes it: a malformed turn gets an
observation that says what was wrong, reward 0, and costs a turn.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

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
    except (json.JSONDecodeError, RecursionError):
        raise ActionError("The tool call is not valid JSON. Write "
                          '{"name": "interact_with_env", "arguments": {"choice": ..., "content": ...}}.')
    if not isinstance(call, dict) or call.get("name") != "interact_with_env":
        raise ActionError("Unknown tool. The only tool is interact_with_env.")
    args = call.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
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


class Env:
    """One episode of one task. Subclasses set `name`, `choices` and `system_prompt` (with a `{max_turns}`
    slot) and implement `opening()` and `act(choice, content) -> (observation, reward, done)`."""

    name = "base"
    choices = ("action", "search", "answer")
    system_prompt = ""

    def __init__(self, task: dict, user=None, max_turns: int = 16, show_reward: bool = True):
        import users  # imported here so `import envs` stays light for tools that only parse actions

        self.task = task
        self.user = user if user is not None else users.make_user("scripted")
        self.max_turns = max_turns
        # The paper's training setting appends "Reward: r" to every observation; its evaluation does not.
        self.show_reward = show_reward
        self.turn = 0

    def system(self) -> str:
        return self.system_prompt.format(max_turns=self.max_turns)

    def reset(self) -> str:
        self.turn = 0
        return self.opening()

    def step(self, text: str):
        self.turn += 1
        info = {"turn": self.turn}
        try:
            action = parse_action(text)
            if action.choice == "finish":
                obs, reward, done = "The episode is finished.", 0.0, True
            elif action.choice not in self.choices:
                allowed = ", ".join(self.choices)
                raise ActionError(f"The choice {action.choice!r} is not allowed in this task. Allowed: {allowed}.")
            else:
                obs, reward, done = self.act(action.choice, action.content)
            info["choice"] = action.choice
        except ActionError as e:
            obs, reward, done = f"Error: {e}", 0.0, False
            info["error"] = str(e)
            info["missing_tool_call"] = e.missing
        if not done and self.turn >= self.max_turns:
            done, info["truncated"] = True, True
        if self.show_reward:
            obs = f"{obs}\nReward: {round(float(reward), 4)}"
        return obs, float(reward), done, info

    def opening(self) -> str:
        raise NotImplementedError

    def act(self, choice: str, content: str):
        raise NotImplementedError

    @classmethod
    def load_original(cls, data_dir: Path, split: str) -> list[dict]:
        """Tasks read from the original UserRL data files under `data_dir`, converted to this gym's fields."""
        raise NotImplementedError(f"{cls.name}: no loader for the original UserRL data")


# ----------------------------------------------------------------------------------------------------------
# Registry and task data

GYMS: dict = {}


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
