"""Built-in arithmetic task for the tiny character-level model (the embedded default run).

Three digits 1-9 and a target of the form `(a op b) op c` over some ordering of them. The tiny
tokenizer knows only `0123456789+-*/()=:, ` plus specials, and its chat template concatenates
message contents and appends `=`, so the only message is the user's "a,b,c:T" (digits sorted
ascending) and the model's whole turn is a bare expression then EOS:

    prompt  "3,5,7:56="        completion "(3+5)*7" EOS

Problem space: every ordered (a, b, c) and ops, keeping divisions that are exact at each step
(no remainder) and targets in 1..99. Problems are identified by (sorted digits, target); the
stored "solution" is the first one found in enumeration order (ascending digits, ops in "+-*/"),
written with the fewest parentheses, as supervised warm-start text.

Reward (answer dominates; partial credit gives GRPO a gradient before the first exact solve):
    total = 0.1 * format + 0.1 * numbers + 0.3 * closeness + 1.0 * answer
format    = the response parses as an expression over digits, + - * / ( ) (no unary minus);
numbers   = it uses exactly the three given digits (multiset);
closeness = numbers * max(0, 1 - |value - target| / target): how near a well-formed attempt lands;
answer    = numbers and the exact value equals the target.
numbers and closeness are folded into total only, so every task returns the same three keys.
Credit for the right digits alone is kept small on purpose: when it was 0.2 with no closeness
term, GRPO collapsed onto "a+b+c" (always well-formed, right digits, often wrong) within ~40
steps; closeness instead rewards attempts that move toward the target.
"""
from __future__ import annotations

from itertools import product

from nanogrpo.tasks.safe_expr import check_expression, uses_exactly

FORMAT_WEIGHT = 0.1
NUMBERS_WEIGHT = 0.1
CLOSENESS_WEIGHT = 0.3
ANSWER_WEIGHT = 1.0
MAX_NEW_TOKENS = 16     # longest solution "(9+9)*9" is 7 characters + EOS
NUM_TEST = 256          # held-out problems (the pool has a few thousand)
MAX_TARGET = 99
RESPONSE_PREFIX = ""    # nothing prefilled: the template's "=" already asks for the expression


def _apply(x: int, op: str, y: int) -> int | None:
    """Integer result of x op y, or None when a division is not exact."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x // y if x % y == 0 else None  # y is always a digit >= 1: a op b is only ever the left


def _render(a: int, op1: str, b: int, op2: str, c: int) -> str:
    # Left-associative, so parens are needed only for a low-precedence inner op under * or /.
    if op1 in "+-" and op2 in "*/":
        return f"({a}{op1}{b}){op2}{c}"
    return f"{a}{op1}{b}{op2}{c}"


def all_problems() -> list[dict]:
    """Every distinct problem in a fixed order: {"nums": sorted digits, "target", "solution"}."""
    found: dict[tuple, str] = {}
    for a, b, c in product(range(1, 10), repeat=3):
        for op1, op2 in product("+-*/", repeat=2):
            inner = _apply(a, op1, b)
            if inner is None:
                continue
            value = _apply(inner, op2, c)
            if value is None or not 1 <= value <= MAX_TARGET:
                continue
            found.setdefault((tuple(sorted((a, b, c))), value), _render(a, op1, b, op2, c))
    return [{"nums": list(nums), "target": t, "solution": s} for (nums, t), s in found.items()]


def messages(example: dict) -> list[dict]:
    nums = ",".join(str(n) for n in example["nums"])
    return [{"role": "user", "content": f"{nums}:{example['target']}"}]


def score(response: str, nums, target) -> dict:
    """Partial-credit reward for a bare expression; never raises on any string."""
    if not isinstance(response, str):
        return {"format": 0.0, "answer": 0.0, "total": 0.0}
    r = check_expression(response.strip())
    fmt = 1.0 if r.ok else 0.0
    numbers = 1.0 if uses_exactly(r, nums) else 0.0
    answer = 1.0 if numbers and r.value is not None and r.value == target else 0.0
    close = 0.0
    if numbers and r.value is not None:
        close = max(0.0, 1.0 - float(abs(r.value - target)) / max(abs(target), 1))
    total = FORMAT_WEIGHT * fmt + NUMBERS_WEIGHT * numbers + CLOSENESS_WEIGHT * close + ANSWER_WEIGHT * answer
    return {"format": fmt, "answer": answer, "total": total}


def score_example(response: str, example: dict) -> dict:
    return score(response, example["nums"], example["target"])


def solution(example: dict) -> str:
    """Warm-start target text for an example (its stored solver solution)."""
    return example["solution"]


def example_key(example: dict) -> tuple:
    return (tuple(sorted(example["nums"])), example["target"])
