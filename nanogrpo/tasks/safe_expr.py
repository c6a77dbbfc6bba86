"""Safe exact evaluation of model-written arithmetic: `+ - * /`, parentheses, integer literals.

Model output is untrusted, so this never calls `eval`. Every string goes through cheap O(n)
gates *before* `ast.parse` sees it (length, character whitelist, digits per literal, paren
depth), because `ast.parse` itself can blow the C stack / memory on pathological nesting, and
`int()` on a megabyte of digits is quadratic. Only then is the AST walked under a node whitelist
and evaluated with `fractions.Fraction`, bounding every intermediate's size, so `9**9**9` or a
tower of products cannot stall a rollout worker. `check_expression` never raises.

Accepted spellings (normalised before the gates): `×` `·` `∗` `\\times` `\\cdot` → `*`;
`÷` `∕` `\\div` → `/`; `−` (U+2212) `–` (en dash) → `-`; Unicode whitespace → one space.
Rejected on purpose: non-ASCII digits (full-width `３`, Arabic-Indic `٣`, superscripts):
Python's parser accepts some of them as int literals, so allowing "some" Unicode digits
invites confusables. Also rejected: decimals (`1.5`), `**`, `//`, `%`, leading-zero literals
(`07`, a SyntaxError) and implicit multiplication (`2(3)`). Unary minus/plus is rejected unless
`allow_unary=True`: Countdown's rules offer four *binary* operations, and `-a` would let a
model negate a number for free.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPR_CHARS = 200        # after whitespace normalisation; real answers are < 40 chars
MAX_RAW_CHARS = 1000        # before normalisation: reject megabyte strings in O(1)
MAX_LITERAL_DIGITS = 6      # a longer literal is never a valid task number here
MAX_PAREN_DEPTH = 16        # far below where ast.parse gets into recursion trouble
MAX_INT_BITS = 256          # bound on |numerator| and denominator of every intermediate

_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_TRANSLATE = str.maketrans({"×": "*", "·": "*", "∗": "*", "÷": "/", "∕": "/",
                            "−": "-", "–": "-"})
_LATEX = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"))
_LONG_LITERAL = re.compile(r"\d{%d,}" % (MAX_LITERAL_DIGITS + 1))
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass(frozen=True, slots=True)
class ExprResult:
    ok: bool                          # passed the gates, parsed, and uses only whitelisted nodes
    numbers: tuple[int, ...] = ()     # integer literals in source order (for multiset checks)
    value: Fraction | None = None     # exact value; None if not ok, division by zero, or too big
    error: str = ""                   # why not ok / why value is None (for debugging, not users)


class _EvalError(Exception):
    """Internal: a reason evaluation stopped (never escapes this module)."""


def normalize(expr: str) -> str | None:
    """Map accepted Unicode/LaTeX spellings to ASCII, collapse whitespace; None if too long."""
    if len(expr) > MAX_RAW_CHARS:
        return None
    expr = expr.translate(_TRANSLATE)
    if "\\" in expr:
        for src, dst in _LATEX:
            expr = expr.replace(src, dst)
    # Collapse rather than delete whitespace: "1 2" must stay a syntax error, not become 12.
    return " ".join(expr.split())


def _paren_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            depth -= 1
    return best


def _check_size(v: Fraction) -> Fraction:
    if v.numerator.bit_length() > MAX_INT_BITS or v.denominator.bit_length() > MAX_INT_BITS:
        raise _EvalError(f"intermediate exceeds {MAX_INT_BITS} bits")
    return v


def _walk(node: ast.AST, numbers: list[int], allow_unary: bool) -> Fraction | None:
    """Evaluate a whitelisted node. Returns None for division by zero (valid syntax, no value).

    Recursion depth is bounded by MAX_EXPR_CHARS (a chain of <= 100 binary ops), well within
    Python's default limit.
    """
    if isinstance(node, ast.Constant):
        # bool is an int subclass; digits-only input cannot produce one, but be explicit.
        if type(node.value) is not int:
            raise _EvalError(f"literal {node.value!r} is not an integer")
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        # Walk both sides even after a None so `numbers` always lists every literal.
        left = _walk(node.left, numbers, allow_unary)
        right = _walk(node.right, numbers, allow_unary)
        if left is None or right is None:
            return None
        op = type(node.op)
        if op is ast.Add:
            return _check_size(left + right)
        if op is ast.Sub:
            return _check_size(left - right)
        if op is ast.Mult:
            return _check_size(left * right)
        if right == 0:
            return None
        return _check_size(left / right)
    if allow_unary and isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _walk(node.operand, numbers, allow_unary)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    raise _EvalError(f"disallowed syntax: {type(node).__name__}")


def check_expression(expr: str, *, allow_unary: bool = False) -> ExprResult:
    """Parse and exactly evaluate `expr`; never raises, never evals. See module docstring."""
    if not isinstance(expr, str):
        return ExprResult(False, error="not a string")
    s = normalize(expr)
    if s is None or len(s) > MAX_EXPR_CHARS:
        return ExprResult(False, error=f"longer than {MAX_EXPR_CHARS} characters")
    if not s:
        return ExprResult(False, error="empty expression")
    if not _ALLOWED_CHARS.issuperset(s):
        return ExprResult(False, error="characters outside 0-9 + - * / ( ) and space")
    if _LONG_LITERAL.search(s):
        return ExprResult(False, error=f"a literal has more than {MAX_LITERAL_DIGITS} digits")
    if _paren_depth(s) > MAX_PAREN_DEPTH:
        return ExprResult(False, error=f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return ExprResult(False, error=f"syntax: {type(e).__name__}")
    numbers: list[int] = []
    try:
        value = _walk(tree.body, numbers, allow_unary)
    except _EvalError as e:
        # Size overflow is still a syntactically valid expression, but reporting it as not-ok is
        # simpler for callers and no real answer gets near 2**256.
        return ExprResult(False, error=str(e))
    except RecursionError:
        return ExprResult(False, error="nesting too deep")
    if value is None:
        return ExprResult(True, tuple(numbers), None, error="division by zero")
    return ExprResult(True, tuple(numbers), value)


def uses_exactly(result: ExprResult, nums) -> bool:
    """Multiset equality: each given number used exactly once, nothing extra, nothing missing."""
    return result.ok and sorted(result.numbers) == sorted(int(n) for n in nums)


def solves(expr: str, nums, target, *, allow_unary: bool = False) -> bool:
    """True when `expr` uses each of `nums` exactly once and equals `target` exactly."""
    r = check_expression(expr, allow_unary=allow_unary)
    return uses_exactly(r, nums) and r.value is not None and r.value == target
