"""IntentionGym: a vague request with hidden missing details; the agent may only ask (UserRL, arXiv 2509.19736,
section 3, IntentionGym). A user answers each question; an evaluator who sees the remaining details decides which
of them the question covers, and the question earns a reward by the importance of what it newly covers.

Two LLM roles, "intention.user" and "intention.evaluator", with their prompts and scripted rules here. As in the
original, the user's prompt holds the whole task, missing details included (so an LLM user can answer questions
about them) and asks the user never to list them; the scripted user answers by keywords. Tasks are hand-written
(data/intention); there is no generator.
"""
import json

from envs import FOOTER, Env, as_bool, expert_turn, pick, role_messages
from users import extract_json, mentions, strip_think

PROMPT = """A user asks you for help, but the request is vague: details that matter are missing. Find them out before any work starts.

Call interact_with_env with this choice:
- action: ask the user one clarifying question.
Ask one focused question per turn, most important details first. Do not do the task itself. The conversation ends when every important detail is clear.""" + FOOTER

USER = """You asked an assistant for help with this: {task} (category: {category})

What you have in mind but did not say, with the answers you would accept:
{details}

The assistant asks you questions to understand what you want. Answer as a real person would: briefly, naturally, and only what was asked, picking one of your answers for a detail when a question asks about it. Never list these details or hint at ones the assistant has not asked about, and never do the task yourself. If you have no preference on something, say so."""

EVALUATOR = """You check which details of a vague request an assistant's question asks about.

The request: {task}
Details still unknown, numbered:
{details}

A detail is covered when the question would help reveal the information it needs. Also say whether the question is about the request at all. Reason about each detail first.
Reply with JSON only: {{"thought": "your reasoning", "covered": [numbers of the covered details], "task_related": true or false}}."""


def user_rule(task, question):
    # The person answers what was asked, picking their first option for every detail the question touches.
    picks = [d["options"][0] for d in task["missing_details"] if d.get("options") and mentions(question, d.get("keywords", []))]
    if not picks:
        return "I don't have a particular preference about that."
    return " ".join(p[0].upper() + p[1:] + "." for p in picks)


def evaluator_rule(task, remaining, question):
    covered = [i + 1 for i, d in enumerate(remaining) if mentions(question, d.get("keywords", []))]
    return json.dumps({"covered": covered, "task_related": bool(covered)})


def clarification_reward(importances: list[int]) -> float:
    """One question's reward: 1.0 / 0.7 / 0.4 by the highest importance (3 / 2 / 1) it newly covers, minus
    0.2 per extra detail covered at once (the original discourages many-part questions), clipped to [0, 1]."""
    if not importances:
        return 0.0
    base = {3: 1.0, 2: 0.7, 1: 0.4}[max(importances)]
    return min(1.0, max(0.0, base - 0.2 * (len(importances) - 1)))


def covered_indices(verdict, n: int):
    """0-based indices of the covered details (none when the question is off the task), or None if unreadable."""
    if not isinstance(verdict, dict) or not isinstance(verdict.get("covered"), list):
        return None
    if as_bool(verdict.get("task_related", True)) is False:
        return []
    indices = set()
    for v in verdict["covered"]:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= n:
            indices.add(v - 1)
    return sorted(indices)


class IntentionGym(Env):
    name = "intention"
    choices = ("action",)
    other_choices_as = "action"  # the original reads every turn as a question, whatever its prefix
    fields = {"id": str, "category": str, "task": str, "missing_details": list}
    system_prompt = PROMPT
    original_files = ("all_intentions_train.json", "all_intentions_test.json")

    @classmethod
    def check_task(cls, task):
        super().check_task(task)
        for i, d in enumerate(task["missing_details"]):
            if not isinstance(d, dict) or not isinstance(d.get("description"), str) \
                    or d.get("importance") not in (1, 2, 3) or isinstance(d.get("importance"), bool):
                raise ValueError(f"field 'missing_details': item {i} must be an object with a text 'description' "
                                 "and an integer 'importance' from 1 to 3")

    def max_score(self) -> float:
        """Every detail asked about on its own: the sum of their single-detail rewards (it can exceed 1)."""
        return sum(clarification_reward([d["importance"]]) for d in self.task["missing_details"])

    def opening(self):
        self.remaining = list(self.task["missing_details"])
        self.exchanges = []
        return f"The category of my task: {self.task['category']}\n\n{self.task['task']}"  # the original's two lines

    def act(self, choice, question):
        t = self.task
        details = "\n".join(f"- {d['description']}" + (f" (e.g. {' / '.join(map(str, d['options']))})"
                                                        if d.get("options") else "") for d in t["missing_details"])
        system = USER.format(task=t["task"], category=t["category"], details=details)
        reply = strip_think(self.user.act("intention.user", role_messages(system, self.exchanges[-3:], question),
                                          rule=user_rule, task=t, question=question))
        if not reply:
            self.info["user_fallback"] = True
            reply = "Sorry, I am not sure what you mean."
        self.exchanges.append((question, reply))
        listed = "\n".join(f"{i}. {d['description']}" for i, d in enumerate(self.remaining, 1))
        system = EVALUATOR.format(task=t["task"], details=listed)
        verdict = extract_json(self.user.act("intention.evaluator", role_messages(system, [], f"The question: {question}"),
                                             rule=evaluator_rule, task=t, remaining=self.remaining, question=question))
        covered = covered_indices(verdict, len(self.remaining))
        if covered is None:
            self.info["user_fallback"] = True
            covered = []
        reward = clarification_reward([int(self.remaining[i]["importance"]) for i in covered])
        self.remaining = [d for i, d in enumerate(self.remaining) if i not in covered]
        self.info["covered"] = len(covered)
        return reply, reward, not self.remaining

    def expert_action(self, rng):
        """Ask about one remaining detail per turn, the most important first (ties in random order), each question
        covering that detail alone. Full reward: `max_score()`, every detail covered."""
        top = max(d["importance"] for d in self.remaining)
        detail = rng.choice([d for d in self.remaining if d["importance"] == top])
        inquiry = detail["inquiry"] if detail.get("inquiry") else f"Could you tell me about {detail['description']}?"
        lower = inquiry[0].lower() + inquiry[1:]
        forms = [inquiry, f"Quick question: {inquiry}", f"Before I start, {lower}", f"To get this right: {inquiry}"]

        def alone(q):  # the evaluator finds this detail in it and no other, so the question earns its whole reward
            covered = json.loads(evaluator_rule(self.task, self.remaining, q))["covered"]
            return covered == [self.remaining.index(detail) + 1]

        think = rng.choice([f"The most important open point is {detail['description']}; ask about that alone.",
                            f"I still don't know {detail['description']}. One focused question.",
                            f"Next: {detail['description']}."])
        return expert_turn(think, "action", pick(rng, forms, alone, default=inquiry))

    @classmethod
    def load_original(cls, data_dir, split):
        # The original ships its own train and test files for this gym: use them as they are.
        name = cls.original_files[0 if split == "train" else 1]
        return cls.read_original(cls.original_path(data_dir, [name]))

    @staticmethod
    def from_original(record):
        details = [{**{k: d[k] for k in ("description", "inquiry", "options")}, "importance": int(d["importance"]),
                    "keywords": []} for d in record["missing_details"]]
        return {"id": record["id"], "category": record["category"], "task": record["task"], "missing_details": details}
