"""TelepathyGym: twenty questions (UserRL, arXiv 2509.19736, section 3, TelepathyGym). The user thinks of an entity
and answers yes/no questions; a judge rules on guesses. Reward 1 for the (first, and final) correct guess.

Two LLM roles, "telepathy.answerer" and "telepathy.judge", with their prompts and scripted rules here. The
scripted answerer reads the task's keyword lists (data/README.md); the original's entities carry none, so play
those with an LLM user. Tasks are hand-written (data/telepathy); there is no generator.
"""
import json

from envs import FOOTER, Env, as_bool, expert_turn, pick, role_messages
from users import keyword_re, extract_json, extract_yes_no, keyword_answer, mentions

PROMPT = """I am thinking of something, and you must find out what it is, as in twenty questions.

Call interact_with_env with one of these choices:
- action: ask me one yes/no question; I answer Yes, No or Maybe.
- answer: name what you think it is. A right guess ends the game; a wrong one costs a turn.
Ask questions that split the remaining possibilities in half, and guess when you are fairly sure.""" + FOOTER

ANSWERER = """You are playing twenty questions. The thing you have in mind is: {entity} (category: {category}). {description}

The player asks yes/no questions about it. Answer each with Yes, No or Maybe. Say Maybe only when the honest answer depends on circumstances or nobody knows. Never name the thing and never add hints.
Think first, then answer. Reply with JSON only: {{"thought": "your reasoning", "answer": "Yes" or "No" or "Maybe"}}."""

JUDGE = """You judge a guessing game. The hidden answer is: {entity} (category: {category}; other names: {synonyms}). {description}

Decide whether the player's guess names exactly this thing or an unmistakable synonym of it. A broader class, a related thing, or several guesses at once is wrong.
Reason about it first. Reply with JSON only: {{"thought": "your reasoning", "correct": true or false}}."""


def names(task) -> list:
    return [task["entity"], *task.get("synonyms", [])]


def answerer_rule(task, question):
    attributes = task.get("attributes", {})
    return keyword_answer(question, [*names(task), *attributes.get("yes", [])], attributes.get("no", []))


def judge_rule(task, guess):
    # A guess names the thing and is short; "lion or giraffe" hedges, and a long list is not a guess.
    hit = [n for n in names(task) if mentions(guess, [n])]
    rest = guess
    for n in hit:
        rest = keyword_re(n).sub(" ", rest)
    correct = bool(hit) and len(rest.split()) <= 6 and not mentions(rest, ["or"])
    return json.dumps({"correct": correct})


class TelepathyGym(Env):
    name = "telepathy"
    choices = ("action", "answer")
    other_choices_as = "action"  # the original treats every turn that is not an answer as a question
    fields = {"id": str, "category": str, "entity": str, "description": str}
    optional_fields = {"synonyms": list, "attributes": dict}
    system_prompt = PROMPT
    original_files = ("all_entities_refined.json",)

    def __init__(self, task, user=None, **kwargs):
        super().__init__(task, user, **kwargs)
        self.questions = 0  # per episode (opening() resets it)

    def opening(self):
        self.questions = 0
        return f'I am thinking of something in the category "{self.task["category"]}". What is it?'

    def act(self, choice, content):
        t = self.task
        if choice == "action":
            self.questions += 1
            system = ANSWERER.format(entity=t["entity"], category=t["category"], description=t["description"])
            reply = self.user.act("telepathy.answerer", role_messages(system, [], content), rule=answerer_rule,
                                  task=t, question=content)
            answer = extract_yes_no(reply)
            return (answer, 0.0, False) if answer else self.fallback("I cannot answer that; ask another yes/no question.")
        system = JUDGE.format(entity=t["entity"], category=t["category"], description=t["description"],
                              synonyms=", ".join(t.get("synonyms", [])) or "none")
        verdict = extract_json(self.user.act("telepathy.judge", role_messages(system, [], f"The guess: {content}"),
                                             rule=judge_rule, task=t, guess=content))
        correct = None if verdict is None else as_bool(verdict.get("correct"))
        if correct is None:
            return self.fallback("I could not decide on that guess; try again.")
        if correct:
            return f"Correct! I was thinking of {t['entity']}.", 1.0, True
        return "No, that is not what I am thinking of.", 0.0, False

    def expert_action(self, rng):
        """Ask 1-3 yes/no questions built from the entity's true and false attributes (their answers are real
        information), then name it. Full reward: 1."""
        t = self.task
        if self.plan is None:
            attributes = t.get("attributes", {})
            facts = [(k, "Yes") for k in attributes.get("yes", [])] + [(k, "No") for k in attributes.get("no", [])]
            self.plan = {"questions": rng.sample(facts, min(len(facts), rng.randint(1, 3)))}
        if self.questions < len(self.plan["questions"]) and self.turns_left() > 1:
            keyword, truth = self.plan["questions"][self.questions]
            forms = [f"Is it {keyword}?", f"Would you describe it with the word '{keyword}'?",
                     f"Does '{keyword}' apply to it?", f"Is '{keyword}' true of it?"]
            # a phrasing whose answer is the fact it asks about (the scripted answerer hears every word)
            question = pick(rng, forms, lambda q: answerer_rule(t, q) == truth, default=forms[0])
            think = rng.choice([f"Narrow it down: is '{keyword}' true of it?",
                                f"A {t['category']} can be many things; asking about '{keyword}' splits them.",
                                f"Next question: '{keyword}'."])
            return expert_turn(think, "action", question)
        name = rng.choice(names(t))
        forms = [name, f"It is {name}.", f"My guess: {name}", f"I think it is {name}."]
        guess = pick(rng, forms, lambda g: json.loads(judge_rule(t, g))["correct"], default=name)
        think = rng.choice([f"Everything I have heard fits {name}.", f"The answers point to {name}; time to guess.",
                            f"I am fairly sure now: {name}."])
        return expert_turn(think, "answer", guess)

    @staticmethod
    def from_original(record):
        # The original entities carry no keyword lists: the scripted answerer then says Maybe to every
        # question, so train on them with an LLM user.
        return {"id": record.get("id", record["target_entity"]), "category": record["category"],
                "entity": record["target_entity"], "synonyms": [], "description": record["description"],
                "attributes": {"yes": [], "no": []}}
