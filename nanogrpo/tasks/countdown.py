"""Countdown: combine the given numbers with + - * / to hit a target (the TinyZero task).

Prompt and prefix follow TinyZero (Pan et al., 2025) so results are comparable: the assistant
turn is prefilled with RESPONSE_PREFIX, which ends in "<think>", and the model is asked for
"<think> ... </think> <answer> expr </answer>".

Scoring rules (`score`), chosen so a reward cannot be farmed by hedging or by formatting alone:
- answer: the LAST complete `<answer>…</answer>` block in the response is graded, wherever it is;
  a bare expression outside answer tags is not an answer, and an unterminated `<answer>` is not
  one either. Several blocks are not rewarded as hedges: only the last one counts. The block
  must be an expression only (no "= 98" suffix) that uses each given number exactly once
  (multiset equality) with + - * / and parentheses, no unary minus, and equals the target
  exactly under Fraction arithmetic — so `(1/3)*3*...`-style non-integer intermediates count.
  Accepted spellings (× ÷ −, whitespace) are listed in safe_expr.py.
- format: 1 iff the response, after dropping trailing whitespace and up to 4 trailing
  <|im_end|>/<|endoftext|> tokens, is: anything (the prefilled prefix) + exactly one
  `<think>…</think>` + only whitespace + exactly one `<answer>…</answer>` + nothing after it.
  Format is graded independently of answer.
- total = FORMAT_WEIGHT * format + ANSWER_WEIGHT * answer.
"""
from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

from nanogrpo.tasks.records import load_records
from nanogrpo.tasks.safe_expr import MAX_LITERAL_DIGITS, solves

FORMAT_WEIGHT = 0.1     # small: enough to teach the tags early, never worth more than a solve
ANSWER_WEIGHT = 1.0
MAX_NEW_TOKENS = 1024   # TinyZero's response budget for 3-4 number Countdown
NUM_TEST = 256          # default held-out size
NUM_GENERATED = 8_000   # procedural train pool when no parquet is given: the parquet's size, ~1 s

SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in the "
          "mind and then provide the user with the answer.")
RESPONSE_PREFIX = "Let me solve this step by step.\n<think>"
_TRAILING_SPECIALS = ("<|im_end|>", "<|endoftext|>")


def messages(example: dict) -> list[dict]:
    nums, target = example["nums"], example["target"]
    user = (f"Using the numbers {list(nums)}, create an equation that equals {target}. "
            "You can use basic arithmetic operations (+, -, *, /) and each number can only be "
            "used once. Show your work in <think> </think> tags. And return the final answer "
            "in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- scoring

def extract_answer(response: str) -> str | None:
    """Content of the last complete <answer>…</answer> block, or None. Linear time (rfind)."""
    close = response.rfind("</answer>")
    if close < 0:
        return None
    open_ = response.rfind("<answer>", 0, close)
    if open_ < 0:
        return None
    return response[open_ + len("<answer>"):close]


def has_format(response: str) -> bool:
    text = response.rstrip()
    for _ in range(4):  # bounded: each strip copies, so a flood of specials must not go quadratic
        tok = next((t for t in _TRAILING_SPECIALS if text.endswith(t)), None)
        if tok is None:
            break
        text = text[: -len(tok)].rstrip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(text.count(t) != 1 for t in tags):
        return False
    t0, t1, a0, a1 = (text.find(t) for t in tags)
    return (t0 < t1 < a0 < a1 and text[t1 + len("</think>"):a0].strip() == ""
            and a1 + len("</answer>") == len(text))


def score(response: str, nums, target) -> dict:
    """Reward for one Countdown response; never raises on any string (see module docstring)."""
    if not isinstance(response, str):
        return {"format": 0.0, "answer": 0.0, "total": 0.0}
    fmt = 1.0 if has_format(response) else 0.0
    ans = extract_answer(response)
    answer = 1.0 if ans is not None and solves(ans, nums, target) else 0.0
    return {"format": fmt, "answer": answer, "total": FORMAT_WEIGHT * fmt + ANSWER_WEIGHT * answer}


def score_example(response: str, example: dict) -> dict:
    return score(response, example["nums"], example["target"])


def example_key(example: dict) -> tuple:
    """Identity of a problem for train/test disjointness (number order does not matter)."""
    return (tuple(sorted(example["nums"])), example["target"])


# --------------------------------------------------------------------------- data file

def load_countdown(path: str | Path, on_bad_row: str = "error") -> list[dict]:
    """Read Countdown problems, `target: int, nums: list[int]` per row, from the HF parquet
    (`target: int64, nums: list<int64>`) or JSON lines, into plain dicts."""
    def clean(record: dict) -> tuple[dict | None, str]:
        t, ns = record.get("target"), record.get("nums")
        row, why = _clean_row(t, ns)
        return row, (why and f"{why} (target={t!r}, nums={ns!r})")
    return load_records(path, clean, fields=("target", "nums"), what="countdown", on_bad_row=on_bad_row,
                        expected="parquet or JSON lines with fields target (int) and nums (list of ints)")


def _as_int(x) -> int | None:
    """int, or an integral float (pandas writes an int column holding a null as float64)."""
    if type(x) is int:
        return x
    if type(x) is float and x.is_integer():
        return int(x)
    return None


def _clean_row(target, nums) -> tuple[dict | None, str]:
    limit = 10 ** MAX_LITERAL_DIGITS  # a longer number could never be written in an answer
    t = _as_int(target)
    if t is None:
        return None, f"target is {'null' if target is None else repr(target)}, expected an int"
    if not 0 <= t < limit:
        return None, f"target {t} outside [0, {limit})"
    if not isinstance(nums, list) or not nums:
        return None, "nums is null or empty, expected a non-empty list of ints"
    ns = [_as_int(n) for n in nums]
    if None in ns:
        return None, "nums holds a non-int (null, fraction or non-number)"
    if any(not 0 <= n < limit for n in ns):
        return None, f"nums holds a value outside [0, {limit})"
    return {"nums": ns, "target": t}, ""


# --------------------------------------------------------------------------- generation

def _combine(a: tuple[Fraction, str], b: tuple[Fraction, str]):
    """All results of one binary op on two (value, expr) items, both orders for - and /."""
    (x, sx), (y, sy) = a, b
    yield x + y, f"({sx} + {sy})"
    yield x * y, f"({sx} * {sy})"
    yield x - y, f"({sx} - {sy})"
    yield y - x, f"({sy} - {sx})"
    if y != 0:
        yield x / y, f"({sx} / {sy})"
    if x != 0:
        yield y / x, f"({sy} / {sx})"


def _random_op(rng: random.Random, a: tuple[Fraction, str], b: tuple[Fraction, str]):
    """One uniformly chosen op of the four, operands in the order drawn; x/0 falls back to +."""
    (x, sx), (y, sy) = a, b
    op = rng.choice("+-*/")
    if op == "/" and y == 0:
        op = "+"
    value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
    return value, f"({sx} {op} {sy})"


def _strip_outer(expr: str) -> str:
    # Every combined expr is wrapped as "(… op …)"; the outermost pair is always redundant.
    return expr[1:-1] if expr.startswith("(") else expr


def solve(nums, target) -> str | None:
    """An expression using each number once that equals `target`, or None (exhaustive, exact).

    Search merges two items at a time; states already explored (as a value multiset) are skipped,
    which keeps 4 numbers to a few thousand Fraction ops in the worst (unsolvable) case.
    """
    if not 1 <= len(nums) <= 6:
        raise ValueError(f"solve handles 1 to 6 numbers, got {len(nums)}")
    target = Fraction(target)
    seen: set[tuple] = set()

    def search(items: tuple) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        key = tuple(sorted(v for v, _ in items))
        if key in seen:
            return None
        seen.add(key)
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1:j] + items[j + 1:]
                for merged in _combine(items[i], items[j]):
                    found = search(rest + (merged,))
                    if found is not None:
                        return found
        return None

    found = search(tuple((Fraction(n), str(n)) for n in nums))
    return None if found is None else _strip_outer(found)


def generate_tasks(n: int, seed: int, num_count: tuple[int, ...] = (3, 4), max_number: int = 99,
                   target_range: tuple[int, int] = (10, 100)) -> list[dict]:
    """`n` distinct solvable tasks: random numbers, a random expression tree over them, its value.

    Defaults mirror the Countdown-Tasks-3to4 parquet (numbers 1-99, targets 10-100). Each example
    stores "solution": the tree the generator built, a witness that `score` accepts; building it
    alongside is ~100x cheaper than calling `solve` per task. Only positive integer targets in
    `target_range` (inclusive) are kept; intermediates may be non-integer.
    """
    rng = random.Random(seed)
    lo, hi = max(target_range[0], 1), target_range[1]
    out, seen = [], set()
    while len(out) < n:
        # Draw the count first and retry within it: rejection favours 3 numbers (4-number trees
        # overshoot the range more often), and the parquet is about half 3s, half 4s.
        k = rng.choice(num_count)
        for _ in range(10_000):  # acceptance is 5-50%; the bound only stops impossible settings
            nums = [rng.randint(1, max_number) for _ in range(k)]
            items = [(Fraction(x), str(x)) for x in nums]
            while len(items) > 1:
                a = items.pop(rng.randrange(len(items)))
                b = items.pop(rng.randrange(len(items)))
                items.append(_random_op(rng, a, b))
            value, expr = items[0]
            ex = {"nums": nums, "target": int(value), "solution": _strip_outer(expr)}
            if value.denominator == 1 and lo <= value <= hi and example_key(ex) not in seen:
                seen.add(example_key(ex))
                out.append(ex)
                break
        else:
            raise ValueError(f"generate_tasks: no new task in 10,000 draws with {k} numbers, "
                             f"max_number={max_number}, target_range={target_range} "
                             f"({len(out)} of {n} found)")
    return out
