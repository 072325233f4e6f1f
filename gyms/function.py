"""FunctionGym: find a hidden arithmetic rule f(a, b, c, d) by querying it (UserRL, arXiv 2509.19736, section 3,
FunctionGym). Rule-based: the rule is the user, so this gym needs no model.

A rule is an arithmetic expression in a, b, c, d such as `(b * c) - a + d` or `d ** a - c * b`. It is parsed
by a small recursive-descent parser into a tree of tuples and evaluated in floating point: nothing is ever
passed to `eval`, so neither a rule from a data file nor numbers from the agent can run code, and a power
that would not fit (`10 ** 10 ** 10`) is an OverflowError caught here instead of a hung process. Rules are
compiled when their task is loaded, so a bad rule in a data file fails then, naming the file and the record.

    python -m gyms.function      # regenerates data/function/{train,test}.jsonl (seed 0: 460 train, 78 test)
"""
import json
import math
import random
import re
from pathlib import Path

from envs import FOOTER, ActionError, Env, expert_turn

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "function"
RULE_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|[-+*/()])|([abcd]))")


def compile_rule(rule: str):
    """`rule` as a tree of tuples, with Python's precedence: ** binds tightest and right to left, and a
    unary minus on its left applies to the power (-a ** 2 == -(a ** 2)). Raises ValueError naming the problem."""
    if not isinstance(rule, str) or not 0 < len(rule) <= 300:
        raise ValueError(f"rule {rule!r}: expected a string of 1 to 300 characters")
    tokens, pos, text = [], 0, rule.rstrip()
    while pos < len(text):
        m = RULE_TOKEN_RE.match(text, pos)
        if not m:
            raise ValueError(f"rule {rule!r}: unexpected character at position {pos}")
        num, op, var = m.groups()
        tokens.append(("num", float(num)) if num else (op, None) if op else ("var", "abcd".index(var)))
        pos = m.end()
    tokens.append(("end", None))
    at = [0]

    def take(kind=None):
        token = tokens[at[0]]
        if kind is not None and token[0] != kind:
            raise ValueError(f"rule {rule!r}: expected {kind!r}, found {token[0]!r}")
        at[0] += 1
        return token

    def expr():
        node = term()
        while tokens[at[0]][0] in ("+", "-"):
            node = (take()[0], node, term())
        return node

    def term():
        node = unary()
        while tokens[at[0]][0] in ("*", "/"):
            node = (take()[0], node, unary())
        return node

    def unary():
        if tokens[at[0]][0] in ("-", "+"):
            sign = take()[0]
            return ("neg", unary()) if sign == "-" else unary()
        node = atom()
        return ("**", node, (take(), unary())[1]) if tokens[at[0]][0] == "**" else node

    def atom():
        kind, value = take()
        if kind in ("num", "var"):
            return (kind, value)
        if kind == "(":
            node = expr()
            take(")")
            return node
        raise ValueError(f"rule {rule!r}: expected a number, a variable or '(', found {kind!r}")

    tree = expr()
    take("end")
    return tree


def _evaluate(node, xs):
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return xs[node[1]]
    if kind == "neg":
        return -_evaluate(node[1], xs)
    left, right = _evaluate(node[1], xs), _evaluate(node[2], xs)
    if kind == "+":
        return left + right
    if kind == "-":
        return left - right
    if kind == "*":
        return left * right
    if kind == "/":
        return left / right
    return math.pow(left, right)  # raises instead of returning a complex number or an unbounded integer


def apply_rule(tree, xs) -> float | None:
    """The rule's value at the four numbers `xs`, or None where it is undefined (division by zero, a power
    out of range or of a negative number to a fraction)."""
    try:
        y = _evaluate(tree, [float(x) for x in xs])
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    return y if math.isfinite(y) else None


def fmt_number(x: float) -> str:
    text = f"{x:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def random_rule(rng: random.Random) -> str:
    """A rule in the original data's style: each of a, b, c, d once, joined by + - * / (weights close to the
    original's operator counts), some squared, rarely one raised to another, with the parentheses that
    precedence needs and, like the original, sometimes ones it does not."""
    leaves = list(rng.sample("abcd", 4))
    if rng.random() < 0.1:
        leaves[-2:] = [f"{leaves[-2]} ** {leaves[-1]}"]
    leaves = [(v + " ** 2" if "**" not in v and rng.random() < 0.15 else v, 3) for v in leaves]
    while len(leaves) > 1:
        k = rng.randrange(len(leaves) - 1)
        op = rng.choices("*+-/", weights=(33, 30, 26, 11))[0]
        prec = 1 if op in "+-" else 2
        (left, lp), (right, rp) = leaves[k], leaves[k + 1]
        if lp < prec or (lp < 3 and rng.random() < 0.25):
            left = f"({left})"
        if rp < prec or (rp == prec and op in "-/") or (rp < 3 and rng.random() < 0.25):
            right = f"({right})"
        leaves[k:k + 2] = [(f"{left} {op} {right}", prec)]
    return leaves[0][0]


PROBES = [(1.3, 2.9, 0.7, 3.1), (2.2, 0.6, 1.7, 1.1), (0.9, 3.3, 2.4, 0.8), (1.6, 1.4, 2.8, 2.6)]
"""the points where two rules are compared: non-integers, at which different functions (in practice) never agree"""


def signature(tree) -> tuple:
    """A rule as a function: its values at PROBES to 9 significant digits, so that d + b + a + c and a + d + b + c
    (one function written two ways, summed in other orders) are the same."""
    return tuple(None if y is None else float(f"{y:.9g}") for y in (apply_rule(tree, p) for p in PROBES))


def function_tasks(seed: int = 0, n_train: int = 460, n_test: int = 78) -> tuple[list, list]:
    """Distinct functions (not just distinct rule texts: a test rule that is a train rule rewritten would leak it),
    each with a test case of integers 1..10 whose value is a whole number of at most 5000 in size (as in the
    original data). The split sizes are the original's."""
    rng, seen, tasks = random.Random(seed), set(), []
    while len(tasks) < n_train + n_test:
        rule = random_rule(rng)
        tree = compile_rule(rule)
        sig = signature(tree)
        if sig in seen:
            continue
        seen.add(sig)
        for _ in range(50):
            xs = [rng.randint(1, 10) for _ in range(4)]
            y = apply_rule(tree, xs)
            if y is not None and abs(y) <= 5000 and abs(y - round(y)) < 1e-9:
                tasks.append({"id": f"func-{len(tasks) + 1:04d}", "rule": rule, "test_case": xs,
                              "expected_result": float(round(y))})
                break
    return tasks[:n_train], tasks[n_train:]


# ----------------------------------------------------------------------------------------------------------
# The gym

NUMBER_RE = re.compile(r"-?\d+\.?\d*")  # the original's: "1e1" reads as 1 and 1, ".5" as 5

FUNCTION_PROMPT = """You are working out a hidden function f(a, b, c, d) of four numbers. It combines them with +, -, *, / and powers. Your goal is the value of f on a secret test case.

Call interact_with_env with one of these choices:
- search: the content "test" shows the four numbers of the test case.
- action: the content is four numbers a b c d, e.g. "1 2 3 4"; you are told f at those numbers (rounded to 4 decimals). Querying the test case itself is not allowed.
- answer: the content is one number, your value of f on the test case; it must be right to within 1e-6. A right answer ends the task; a wrong one costs a turn.
Choose queries that tell you how each input enters f.""" + FOOTER


class FunctionGym(Env):
    name = "function"
    choices = ("action", "search", "answer")
    fields = {"id": str, "rule": str, "test_case": list, "expected_result": float}
    system_prompt = FUNCTION_PROMPT
    original_files = ("functions.json", "functiongym-functions.json")

    def __init__(self, task, user=None, **kwargs):
        super().__init__(task, user, **kwargs)
        self.tree = compile_rule(task["rule"])
        self.shown, self.queries = False, 0  # per episode (opening() resets them)

    @classmethod
    def check_task(cls, task):
        super().check_task(task)
        case = task["test_case"]
        if len(case) != 4 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in case):
            raise ValueError(f"field 'test_case' must be four numbers, not {case!r:.80}")
        try:
            compile_rule(task["rule"])
        except ValueError as e:
            raise ValueError(f"field 'rule': {e}") from None

    def opening(self):
        self.shown, self.queries = False, 0
        return ('I have a hidden function f(a, b, c, d). What is its value on my test case? Search for "test" '
                "to see the test case, query f at numbers of your choice, then answer.")

    def act(self, choice, content):
        if choice == "search":
            if content.lower() != "test":  # exactly, as the original ("test." is refused)
                raise ActionError('Search accepts only "test", which shows the test case.')
            self.shown = True
            return f"The test case is {self.task['test_case']}.", 0.0, False
        if choice == "answer":  # the whole content must be one number (the original's float(content))
            try:
                answer = float(content)
            except ValueError:
                raise ActionError('Answer with one number and nothing else, e.g. "12.5".') from None
            if abs(answer - float(self.task["expected_result"])) <= 1e-6:
                return "Correct!", 1.0, True
            return "That is not the value of f on the test case.", 0.0, False
        xs = [float(n) for n in NUMBER_RE.findall(content)]
        if not all(math.isfinite(x) for x in xs):
            raise ActionError("The numbers must be finite.")
        if len(xs) != 4:
            raise ActionError(f'Give exactly four numbers a b c d, e.g. "1 2 3 4" (found {len(xs)}).')
        if xs == [float(x) for x in self.task["test_case"]]:
            raise ActionError("You may not query the test case itself.")
        self.queries += 1
        shown = "[" + ", ".join(fmt_number(x) for x in xs) + "]"
        y = apply_rule(self.tree, xs)
        if y is None:
            return f"For numbers {shown}, f is undefined (a division by zero or a power out of range).", 0.0, False
        return f"For numbers {shown}, the result is {fmt_number(y)}.", 0.0, False

    def expert_action(self, rng):
        """Look at the test case, probe f at 1-3 points of its own, then answer f(test case). The value (and the
        rule its reasoning names) is the task's; the probes are what a solver sends to see how each input enters f."""
        if self.plan is None:
            self.plan = {"probes": rng.choice([1, 2, 2, 3]), "search_first": rng.random() < 0.7}
        case = self.task["test_case"]
        last_turn = self.turns_left() <= 1
        if not self.shown and not last_turn and (self.plan["search_first"] or self.queries >= self.plan["probes"]):
            think = rng.choice(["First I need the test case: the numbers f must be evaluated at.",
                                "Let me see the test case before anything else.",
                                "I'll look up the test case; the probes then tell me how f treats each input."])
            return expert_turn(think, "search", "test")
        if self.queries < self.plan["probes"] and not last_turn:
            while True:
                xs = [rng.randint(0, 10) for _ in range(4)]
                if [float(x) for x in xs] != [float(x) for x in case]:
                    break
            think = rng.choice([f"Probe f at {xs} to see how the inputs combine.",
                                f"Another data point: f at {xs}.",
                                f"Query f at {xs}; comparing the results shows which inputs multiply and which add."])
            return expert_turn(think, "action", " ".join(map(str, xs)))
        value = fmt_number(float(self.task["expected_result"]))
        think = rng.choice([f"The results fit f = {self.task['rule']}, so f({', '.join(map(str, case))}) = {value}.",
                            f"The queries point to the rule {self.task['rule']}; at the test case {case} it gives "
                            f"{value}.",
                            f"f = {self.task['rule']} matches what I saw; at the test case that is {value}."])
        return expert_turn(think, "answer", value)

    @staticmethod
    def from_original(record):
        return {k: record[k] for k in ("id", "rule", "test_case", "expected_result")}


if __name__ == "__main__":
    for split, tasks in zip(("train", "test"), function_tasks()):
        out = DATA_DIR / f"{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
        print(f"wrote {len(tasks)} tasks to {out}")
