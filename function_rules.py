"""FunctionGym's hidden rules: a safe evaluator and a seeded generator (UserRL, arXiv 2509.19736, FunctionGym).

A rule is an arithmetic expression in a, b, c, d such as `(b * c) - a + d` or `d ** a - c * b`. It is parsed
by a small recursive-descent parser into a tree of tuples and evaluated in floating point: nothing is ever
passed to `eval`, so neither a rule from a data file nor numbers from the agent can run code, and a power
that would not fit (`10 ** 10 ** 10`) is an OverflowError caught here instead of a hung process.

    python function_rules.py      # regenerates data/function/{train,test}.jsonl (seed 0: 460 train, 78 test)
"""
import json
import math
import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
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


def function_tasks(seed: int = 0, n_train: int = 460, n_test: int = 78) -> tuple[list, list]:
    """Distinct rules, each with a test case of integers 1..10 whose value is a whole number of at most 5000
    in size (as in the original data). The split sizes are the original's."""
    rng, seen, tasks = random.Random(seed), set(), []
    while len(tasks) < n_train + n_test:
        rule = random_rule(rng)
        if rule in seen:
            continue
        seen.add(rule)
        tree = compile_rule(rule)
        for _ in range(50):
            xs = [rng.randint(1, 10) for _ in range(4)]
            y = apply_rule(tree, xs)
            if y is not None and abs(y) <= 5000 and abs(y - round(y)) < 1e-9:
                tasks.append({"id": f"func-{len(tasks) + 1:04d}", "rule": rule, "test_case": xs,
                              "expected_result": float(round(y))})
                break
    return tasks[:n_train], tasks[n_train:]


if __name__ == "__main__":
    for split, tasks in zip(("train", "test"), function_tasks()):
        out = DATA_DIR / "function" / f"{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
        print(f"wrote {len(tasks)} tasks to {out}")
