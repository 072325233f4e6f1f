"""TurtleGym: lateral-thinking ("turtle soup") puzzles (UserRL, arXiv 2509.19736, section 3, TurtleGym). A host
answers yes/no questions about the hidden story; a judge scores each told story against weighted criteria. The
reward is the improvement over the best score so far, so an episode's rewards sum to its best score.

Two LLM roles, "turtle.host" and "turtle.judge", with their prompts and scripted rules here. The scripted rules
read the task's keyword lists (data/README.md); the original's stories carry none, so play those with an LLM
user. Tasks are hand-written (data/turtle); there is no generator.

Departure (a fix): the puzzle ends at a score of 1 within 1e-9. The original tests `score >= 1.0` exactly, and
about 29% of its stories have weights that sum to 0.9999999999999999, so a perfect story never ends them.
"""
import json
import math

from envs import FOOTER, Env, expert_turn, pick, role_messages
from users import extract_json, extract_yes_no, keyword_answer, mentions

PROMPT = """You are solving a lateral-thinking puzzle ("turtle soup"). You are shown a short, strange story; a host knows the full hidden story behind it. Work out what really happened.

Call interact_with_env with one of these choices:
- action: ask the host one yes/no question; the host answers Yes, No or Maybe.
- answer: tell the whole story as you now believe it happened. It is scored against the key points of the hidden story; you may answer again to improve your score, and the puzzle ends when every key point is right.""" + FOOTER

HOST = """You host a lateral-thinking puzzle. The player was shown this story:
{surface}

What really happened (secret: never reveal it):
{bottom}

The player asks yes/no questions. Answer each with Yes, No or Maybe, according to what really happened. Use Maybe rarely: only when the hidden story does not settle the question or it does not matter. Never reveal anything else.
Think first, then answer. Reply with JSON only: {{"thought": "your reasoning", "answer": "Yes" or "No" or "Maybe"}}."""

JUDGE = """You score a player's solution to a lateral-thinking puzzle.

What really happened:
{bottom}

Key points, numbered:
{points}

For each key point, give 1 if the player's story states it clearly, 0.5 if it states it partly or vaguely, and 0 if it is missing or contradicted. Reason about each point before you score it.
Reply with JSON only: {{"thought": "your reasoning, point by point", "scores": [one number per key point, in order]}}."""


def host_rule(task, question):
    facts = task.get("host_facts", {})
    return keyword_answer(question, facts.get("yes", []), facts.get("no", []))


def criterion_score(story: str, groups) -> float:
    """1 when every keyword group is matched, 0.5 when at least half are, else 0 (no groups: 0, unjudgeable)."""
    if not groups:
        return 0.0
    matched = sum(mentions(story, group) for group in groups)
    return 1.0 if matched == len(groups) else 0.5 if 2 * matched >= len(groups) else 0.0


def judge_rule(task, story):
    return json.dumps({"scores": [criterion_score(story, c.get("keywords", [])) for c in task["criteria"]]})


def criterion_scores(verdict, n: int):
    """The judge's n scores, each clipped to [0, 1] and used as it is (the original weights its judge's raw scores:
    three 0.8s are 0.8, not a solved puzzle), or None when they are not n numbers."""
    scores = verdict.get("scores") if isinstance(verdict, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        return None
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        return None
    return [min(1.0, max(0.0, float(s))) for s in scores]


class TurtleGym(Env):
    name = "turtle"
    choices = ("action", "answer")
    other_choices_as = "action"  # the original treats every turn that is not an answer as a question
    fields = {"id": str, "title": str, "surface": str, "bottom": str, "criteria": list}
    optional_fields = {"host_facts": dict}
    system_prompt = PROMPT
    original_files = ("all_stories_refined.json",)

    def __init__(self, task, user=None, success_threshold: float = 1.0, **kwargs):
        super().__init__(task, user, **kwargs)
        self.success_threshold = success_threshold  # the original trains and evaluates at 1.0
        self.best, self.questions, self.answers = 0.0, 0, 0  # per episode (opening() resets them)

    @classmethod
    def check_task(cls, task):
        super().check_task(task)
        for i, c in enumerate(task["criteria"]):
            if not isinstance(c, dict) or not isinstance(c.get("statement"), str) or isinstance(c.get("weight"), bool) \
                    or not isinstance(c.get("weight"), (int, float)):
                raise ValueError(f"field 'criteria': item {i} must be an object with a text 'statement' and a "
                                 "number 'weight'")

    def max_score(self) -> float:
        """A perfect story's score: the criteria's weights, which sum to 1 up to rounding."""
        return float(sum(c["weight"] for c in self.task["criteria"]))

    def opening(self):
        self.best, self.questions, self.answers = 0.0, 0, 0
        return f"{self.task['title']}\n\n{self.task['surface']}\n\nWhat really happened?"

    def act(self, choice, content):
        t = self.task
        if choice == "action":
            self.questions += 1
            system = HOST.format(surface=t["surface"], bottom=t["bottom"])
            answer = extract_yes_no(self.user.act("turtle.host", role_messages(system, [], content), rule=host_rule,
                                                  task=t, question=content))
            return (answer, 0.0, False) if answer else self.fallback("The host cannot answer that; ask another yes/no question.")
        self.answers += 1
        points = "\n".join(f"{i}. {c['statement']}" for i, c in enumerate(t["criteria"], 1))
        system = JUDGE.format(bottom=t["bottom"], points=points)
        verdict = extract_json(self.user.act("turtle.judge", role_messages(system, [], f"The player's story:\n{content}"),
                                             rule=judge_rule, task=t, story=content))
        scores = criterion_scores(verdict, len(t["criteria"]))
        if scores is None:
            return self.fallback("Your story could not be scored this time; tell it again.")
        score = sum(float(c["weight"]) * s for c, s in zip(t["criteria"], scores))
        reward = max(0.0, score - self.best)
        self.best = max(self.best, score)
        self.info["score"] = score  # for logs and reward ideas; the agent sees only the points it has right
        done = score >= self.success_threshold - 1e-9  # weights such as 0.5 + 0.3 + 0.2 sum to 0.99999...
        right = [c["statement"] for c, s in zip(t["criteria"], scores) if s == 1.0]
        obs = "Points you have right: " + " ".join(right) if right else "None of the key points is right yet."
        return obs + (" You solved it!" if done else " Something is still missing: keep asking."), reward, done

    def expert_action(self, rng):
        """Ask 1-3 yes/no questions about facts of the hidden story, sometimes tell a first partial story, then
        tell the hidden story itself. Full reward: the sum of the criteria's weights (1)."""
        t = self.task
        if self.plan is None:
            facts = t.get("host_facts", {})
            pool = [(k, "Yes") for k in facts.get("yes", [])] + [(k, "No") for k in facts.get("no", [])]
            self.plan = {"questions": rng.sample(pool, min(len(pool), rng.randint(1, 3))),
                         "partial": rng.random() < 0.3}
        if self.questions < len(self.plan["questions"]) and self.turns_left() > 1:
            keyword, truth = self.plan["questions"][self.questions]
            forms = [f"Does the story involve {keyword}?", f"Is '{keyword}' part of what happened?",
                     f"Does '{keyword}' matter here?", f"Was there anything to do with {keyword}?"]
            question = pick(rng, forms, lambda q: host_rule(t, q) == truth, default=forms[0])
            think = rng.choice([f"The surface hides something; ask whether '{keyword}' plays a part.",
                                f"Test one idea at a time: '{keyword}'.",
                                f"What would explain it? Check '{keyword}'."])
            return expert_turn(think, "action", question)
        sentences = t["bottom"].split(". ")
        if self.plan["partial"] and self.answers == 0 and len(sentences) > 1 and self.turns_left() > 1:
            think = "I have the start of it; tell what I have so far and see which points hold."
            return expert_turn(think, "answer", sentences[0].rstrip(".") + ".")
        think = rng.choice(["The answers fit together now; tell the whole story.",
                            "I can explain everything on the surface; here is what happened.",
                            "Put the pieces together and tell it in full."])
        lead = rng.choice(["", "Here is what happened: ", "I think it went like this. "])
        return expert_turn(think, "answer", lead + t["bottom"])

    @staticmethod
    def from_original(record):
        # The original's file is an object keyed by story id; it plays only the stories its judge accepted.
        if record.get("judgment", "Yes") != "Yes":
            return None
        return {"id": str(record.get("id", record["new_title"])), "title": record["new_title"],
                "surface": record["new_surface"],
                "bottom": record["new_bottom"],
                "criteria": [{"statement": e["statement"], "weight": float(e["score"]), "keywords": []}
                             for e in record["evaluation"]],
                "host_facts": {"yes": [], "no": []}}
