"""GSM8K: grade-school word problems with a numeric final answer (Cobbe et al., 2021).

Data: JSON lines `{"question": str, "answer": str}` (or parquet with those columns), the
reference final answer after the last `####` (e.g. "#### 1,450,000"). Examples become
{"question", "answer" (full rationale), "target" (the final number as a canonical string, e.g.
"1450000")}; a string keeps examples JSON-able while `Fraction(target)` stays exact.

Prompt: the question plus the Qwen2.5-Math instruction to put the answer in \\boxed{}.
Answer extraction (`extract_answer`), first rule that applies:
  1. the last `\\boxed{...}` (braces matched, so `\\boxed{\\frac{3}{4}}` works) — its last number,
     or a `\\frac{a}{b}`; a box with no number is an answer of None (the model committed to it);
  2. the last `#### N` marker (the dataset's own style);
  3. the last number anywhere in the text.
Numbers: thousands commas (`1,234` — only in groups of 3, so "1,2,3" is three numbers), a `$`,
a trailing period, a leading minus (only when not a binary minus such as "10-2"), decimals;
`1,234.50` → Fraction(2469, 2). ASCII digits only. A final number longer than MAX_NUMBER_CHARS
gives None (int parsing of huge digit runs is slow; no GSM8K answer is near that size).
Reward: answer = exact Fraction equality (18 == 18.0); format = 1 iff rule 1 or 2 produced the
number (the answer was explicitly marked); total = 0.1 * format + 1.0 * answer.
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from nanogrpo.tasks.records import load_records

FORMAT_WEIGHT = 0.1
ANSWER_WEIGHT = 1.0
MAX_NEW_TOKENS = 512    # GSM8K rationales from 0.5-7B instruct models fit comfortably
NUM_TEST = 256          # held-out slice when one file is split into train and test
MAX_NUMBER_CHARS = 40   # longer digit runs are not answers (and int() on them is slow)
MAX_BOX_CHARS = 500     # scan limit for the braces of \boxed{...}
RESPONSE_PREFIX = ""
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Optional sign and $, then digits with strict thousands groups or a plain run, then decimals.
# ASCII digits only: \d would also match Arabic-Indic or full-width digits.
_NUMBER = re.compile(r"(-)?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)", re.ASCII)
_FRAC = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}", re.ASCII)
_DIGIT = re.compile(r"[0-9]")
_HASHES = re.compile(r"####\s*([^\n]*)")


def messages(example: dict) -> list[dict]:
    return [{"role": "user", "content": f"{example['question']}\n{INSTRUCTION}"}]


def _to_fraction(text: str) -> Fraction | None:
    text = text.replace(",", "")
    if len(text) > MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number in `text` (rules in the module docstring), or None."""
    # Only the tail around the last digit can hold the answer; scanning just that window keeps
    # "2*2*2*…" (100k match objects) linear and cheap. The window is wider than any number that
    # could parse (MAX_NUMBER_CHARS digits + commas + sign + the char before the sign), so a
    # number cut by it was too long to count anyway.
    found = _DIGIT.search(text[::-1])  # reversed copy: C-speed, unlike a lookahead per digit
    if found is None:
        return None
    end = len(text) - found.start()
    text = text[max(0, end - 3 * MAX_NUMBER_CHARS):end]
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    if last is None:
        return None
    value = _to_fraction(last.group(2))
    if value is None:
        return None
    start = last.start()
    # "10-2": the minus is binary when something number-like sits right before it.
    binary = start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]}")
    if last.group(1) and not binary:
        value = -value
    return value


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    # A real boxed answer is short; bounding the scan keeps a hostile unclosed box O(1).
    for j in range(i, min(len(text), i + MAX_BOX_CHARS)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    # Unterminated (ran out of tokens) or overlong: still the model's committed answer.
    return text[i:i + MAX_BOX_CHARS]


def _extract(response: str) -> tuple[Fraction | None, bool]:
    """(answer, marked) where marked means it came from a \\boxed{} or a #### line."""
    boxed = _last_boxed(response)
    if boxed is not None:
        frac = None
        for frac in _FRAC.finditer(boxed):
            pass
        if frac is not None:
            den = _to_fraction(frac.group(2))
            num = _to_fraction(frac.group(1))
            if num is not None and den:
                return num / den, True
        return last_number(boxed), True
    hashes = None
    for hashes in _HASHES.finditer(response):
        pass
    if hashes is not None:
        value = last_number(hashes.group(1))
        if value is not None:
            return value, True
    return last_number(response), False


def extract_answer(response: str) -> Fraction | None:
    """The model's final number as an exact Fraction, or None; never raises on a string."""
    if not isinstance(response, str):
        return None
    return _extract(response)[0]


def score(response: str, target) -> dict:
    if not isinstance(response, str):
        return {"format": 0.0, "answer": 0.0, "total": 0.0}
    value, marked = _extract(response)
    want = _to_fraction(str(target))
    answer = 1.0 if value is not None and want is not None and value == want else 0.0
    fmt = 1.0 if marked and value is not None else 0.0
    return {"format": fmt, "answer": answer, "total": FORMAT_WEIGHT * fmt + ANSWER_WEIGHT * answer}


def score_example(response: str, example: dict) -> dict:
    return score(response, example["target"])


def example_key(example: dict) -> str:
    return example["question"]


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value)) if (value * 10**6).denominator == 1 else str(value)


def load_gsm8k(path: str | Path, on_bad_row: str = "error") -> list[dict]:
    """Read GSM8K problems, `question: str, answer: str` per row, from JSON lines or the HF
    parquet; a bad row is an error naming it, or skipped."""
    return load_records(path, _clean_record, fields=("question", "answer"), what="gsm8k", on_bad_row=on_bad_row,
                        expected='JSON lines {"question": ..., "answer": "... #### N"} or parquet with those columns')


def _clean_record(obj: dict) -> tuple[dict | None, str]:
    q, a = obj.get("question"), obj.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        return None, 'expected string fields "question" and "answer"'
    if "####" not in a:
        return None, 'the "answer" field has no "#### <final answer>"'
    final = a.rsplit("####", 1)[1].strip()
    value = _to_fraction(final.replace("$", "").strip())
    if value is None:
        return None, f"final answer after #### is not a number: {final[:40]!r}"
    return {"question": q, "answer": a, "target": _canonical(value)}, ""
