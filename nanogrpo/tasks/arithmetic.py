"""Built-in arithmetic task for the tiny character-level model (the embedded default run).

Countdown with two numbers: a and b in 1-99 and a target that one of `a+b`, `a-b`, `a*b`, `a/b`
(exact) reaches, so the model has to work out from the numbers and the target which operation
was used. The tiny tokenizer knows only `0123456789+-*/()=:, ` plus specials, and its chat
template concatenates message contents and appends `=`, so the only message is the user's
"a,b:T" (larger number first) and the model's whole turn is a bare expression then EOS:

    prompt  "83,47:36="        completion "83-47" EOS

Problem space: every pair 1 <= b <= a <= 99 and every target >= 1 that an operation on (a, b)
gives: about 15,000 problems, so the 256 held-out ones are problems the model never trained on.
Problems are identified by (numbers, target).

Supervised warm start (`warm_start`): the two numbers in prompt order around an operator picked
by a generator seeded with the two numbers alone. It never looks at the target, so it teaches
the answer's format and nothing about which operation hits the target; greedy success after it
is about chance (~25 %). Everything above chance is GRPO's work. `solution` is a correct answer
(for tests and inspection), never trained on.

Reward: total = 0.1 * format + 1.0 * answer
format = the response parses as an expression over digits, + - * / ( ) (no unary minus);
answer = it uses exactly the two given numbers and its exact value equals the target.
No partial credit for a value near the target: with it, `a+b` (near the target for most `+`,
`-` and `/` problems) paid on every problem and the policy collapsed onto always adding before it
learned to tell the operations apart (measured: held-out stuck at the `+` share, 0.34).
"""
from __future__ import annotations

import random
from nanogrpo.tasks.safe_expr import check_expression, uses_exactly

FORMAT_WEIGHT = 0.1
ANSWER_WEIGHT = 1.0
MAX_NUMBER = 99
OPS = "+-*/"
MAX_NEW_TOKENS = 8      # longest answer "99*99" is 5 characters + EOS
NUM_TEST = 256          # held-out problems (the pool has ~15,000)
RESPONSE_PREFIX = ""    # nothing prefilled: the template's "=" already asks for the expression


def _apply(a: int, op: str, b: int) -> int | None:
    """Integer result of a op b, or None when a division is not exact."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if a % b == 0 else None


def all_problems() -> list[dict]:
    """Every distinct problem in a fixed order: {"nums": [a, b] with a >= b, "target", "solution",
    "warm_start"}. A target two operations reach (2+2 = 2*2) is one problem; its `solution` is
    the first operation in "+-*/" order."""
    rows = []
    for a, b in ((a, b) for a in range(1, MAX_NUMBER + 1) for b in range(1, a + 1)):
        warm_op = random.Random(f"{a},{b}").choice(OPS)  # from the numbers only: target-blind
        seen = set()
        for op in OPS:
            t = _apply(a, op, b)
            if t is None or t < 1 or t in seen:
                continue
            seen.add(t)
            rows.append({"nums": [a, b], "target": t, "solution": f"{a}{op}{b}", "warm_start": f"{a}{warm_op}{b}"})
    return rows


def messages(example: dict) -> list[dict]:
    a, b = example["nums"]
    return [{"role": "user", "content": f"{a},{b}:{example['target']}"}]


def score(response: str, nums, target) -> dict:
    """Format credit plus an exact answer; never raises on any string."""
    if not isinstance(response, str):
        return {"format": 0.0, "answer": 0.0, "total": 0.0}
    r = check_expression(response.strip())
    fmt = 1.0 if r.ok else 0.0
    answer = 1.0 if uses_exactly(r, nums) and r.value is not None and r.value == target else 0.0
    return {"format": fmt, "answer": answer, "total": FORMAT_WEIGHT * fmt + ANSWER_WEIGHT * answer}


def score_example(response: str, example: dict) -> dict:
    return score(response, example["nums"], example["target"])


def solution(example: dict) -> str:
    """A correct answer for an example (not the warm-start text, which is target-blind)."""
    return example["solution"]


def example_key(example: dict) -> tuple:
    return (tuple(example["nums"]), example["target"])
