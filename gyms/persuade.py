"""PersuadeGym: the user holds a claim at "Strongly Agree"; the agent argues (UserRL, arXiv 2509.19736, section 3,
PersuadeGym). Reward: levels moved toward disagreement / 6 when positive (re-earned if the stance slips back),
done at "Strongly Disagree". The agent sees the persuadee's reply only, as in the original; the stance is in
`info["stance"]`.

One LLM role, "persuade.persuadee", with its prompt and scripted rule here. The scripted persuadee reads the
task's counterpoints (data/README.md); the original's claims carry none, so play those with an LLM user. Tasks
are hand-written (data/persuade); there is no generator.
"""
import json
import math
import re

from envs import FOOTER, Env, expert_turn, pick, role_messages
from users import extract_json, mentions

STANCES = ("Strongly Agree", "Agree", "Partly Agree", "Neutral", "Partly Disagree", "Disagree", "Strongly Disagree")

PROMPT = """You are talking with a person who holds a firm opinion. Change their mind with honest, well-reasoned arguments.

Call interact_with_env with this choice:
- answer: your next message to them (an argument, a question, or a reply to what they said).
Look for the weak points of their position and answer them.""" + FOOTER

PERSUADEE = """You are a person with a firm opinion, in a conversation. Your claim: {claim}
Why you believe it: {argument}

Your stance on the claim right now: {stance}. The scale: {scale}.

Someone is trying to change your mind. Reply to their latest message in your own voice, speaking to them as "you", in at most about 150 words. Move your stance only as far as their reasons really convince you: a strong new point can move you; repetition or pressure should not.
Weigh their message first. Reply with JSON only: {{"thought": "how their message bears on your view", "response": "your reply", "stance": "one label from the scale"}}."""


def persuadee_rule(task, stance, scale, history, argument):
    # Moves toward disagreement by ceil(levels / counterpoints) per counterpoint raised for the first time,
    # so raising every counterpoint reaches the far end of the scale; repetition and pressure move nothing.
    points = task.get("counterpoints", [])
    heard = {i for i, cp in enumerate(points) for h in history if mentions(h, cp["keywords"])}
    new = [i for i, cp in enumerate(points) if i not in heard and mentions(argument, cp["keywords"])]
    level = scale.index(stance)
    if new:
        level = min(len(scale) - 1, level + math.ceil((len(scale) - 1) / len(points)) * len(new))
        response = "That is a point I had not weighed properly, and it does make me less sure."
    else:
        response = "I don't hear anything new in that, so I stay where I was."
    return json.dumps({"response": response, "stance": scale[level]})


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
    other_choices_as = "answer"  # the original reads every turn as an argument, whatever its prefix
    fields = {"id": str, "claim": str, "argument": str}
    optional_fields = {"counterpoints": list}
    system_prompt = PROMPT
    original_files = ("all_statements_refined.json",)

    def opening(self):
        self.stance, self.history = 0, []
        # The claim only, as the original shows it: the persuadee's reasons and stance come out in the conversation
        return f"A claim I hold and you oppose: {self.task['claim']}\nTry to change my mind."

    def act(self, choice, argument):
        t = self.task
        system = PERSUADEE.format(claim=t["claim"], argument=t["argument"], stance=STANCES[self.stance],
                                  scale=", ".join(STANCES))
        out = extract_json(self.user.act("persuade.persuadee", role_messages(system, self.history, argument),
                                         rule=persuadee_rule, task=t, stance=STANCES[self.stance], scale=STANCES,
                                         history=[a for a, _ in self.history], argument=argument))
        new = parse_stance(out.get("stance")) if out else None
        response = out.get("response") if out else None
        if new is None or not isinstance(response, str):
            return self.fallback("Let me think about that.")
        reward = stance_reward(self.stance, new)
        self.history.append((argument, response))
        self.stance = new
        self.info["stance"] = STANCES[new]
        return response, reward, new == len(STANCES) - 1

    def expert_action(self, rng):
        """Raise one counterpoint the persuadee has not heard yet per turn, in random order, each message raising
        that one alone. Full reward: 1 (Strongly Agree to Strongly Disagree)."""
        points = self.task.get("counterpoints", [])
        said = [a for a, _ in self.history]
        fresh = [p for p in points if not any(mentions(a, p["keywords"]) for a in said)]
        if not fresh:  # nothing left to raise (or an original claim without counterpoints): argue from the claim
            return expert_turn("Sum up why the claim does not hold.", "answer",
                               f"Think again about this: {self.task['claim']} It ignores too much.")
        point = rng.choice(fresh)
        text = point["point"]
        forms = [text, f"Consider this: {text}", f"{text} Doesn't that change the picture?",
                 f"Here is something to weigh. {text}"]
        others = [p for p in fresh if p is not point]

        def alone(m):  # raises this counterpoint and no other, so each one moves the persuadee on its own turn
            return mentions(m, point["keywords"]) and not any(mentions(m, p["keywords"]) for p in others)

        think = rng.choice(["They have not heard this side yet; make one point at a time.",
                            "Address their reasoning with a point they have not weighed.",
                            "One new, concrete counter-argument."])
        return expert_turn(think, "answer", pick(rng, forms, alone, default=text))

    @staticmethod
    def from_original(record):
        return {"id": record["id"], "claim": record["claim"], "argument": record["argument"], "counterpoints": []}
