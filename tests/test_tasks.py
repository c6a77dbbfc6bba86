"""Tasks and rewards: safe expression scoring, data loading, splits, user task specs."""
import json
import random
import sys
import time
from collections import Counter
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogrpo.tasks import Task, load_task, split_heldout
from nanogrpo.tasks import arithmetic, countdown, gsm8k
from nanogrpo.tasks.safe_expr import check_expression

P = countdown.RESPONSE_PREFIX  # what the launcher prepends before scoring


def cd(answer: str, think: str = " reasoning ") -> str:
    """A well-formed Countdown response around `answer`."""
    return f"{P}{think}</think>\n<answer>{answer}</answer>"


# --------------------------------------------------------------------------- countdown scoring

COUNTDOWN_CASES = [
    # (id, response, nums, target, format, answer)
    ("correct", cd(" 44 + 19 + 35 "), [44, 19, 35], 98, 1, 1),
    ("correct-any-order", cd("(35 - 19) * 44 / 44"), [44, 19, 35, 44], 16, 1, 1),
    ("each-number-twice", cd("2+2+3+3+5+5"), [2, 3, 5], 20, 1, 0),
    ("number-missing", cd("2+3"), [2, 3, 5], 5, 1, 0),
    ("extra-number", cd("2+3+5+1"), [2, 3, 5], 11, 1, 0),
    ("wrong-target", cd("2+3+5"), [2, 3, 5], 11, 1, 0),
    ("non-integer-intermediate", cd("5 * (5 - 1 / 5)"), [1, 5, 5, 5], 24, 1, 1),
    ("non-integer-intermediate-reused", cd("5 * (5 - 1 / 5)"), [1, 5, 5], 24, 1, 0),
    ("third-times-three", cd("(1 / 3) * 3 * 7"), [1, 3, 3, 7], 7, 1, 1),
    ("whitespace", cd("\n  ( 2+3 )\t*  5 \n"), [2, 3, 5], 25, 1, 1),
    ("unicode-operators", cd("(5 × 3 − 2) ÷ 13"), [5, 3, 2, 13], 1, 1, 1),
    ("latex-times", cd("(2+3) \\times 5"), [2, 3, 5], 25, 1, 1),
    ("full-width-digits-rejected", cd("２+3+5"), [2, 3, 5], 10, 1, 0),
    ("equation-suffix-rejected", cd("2+3+5 = 10"), [2, 3, 5], 10, 1, 0),
    ("unary-minus-rejected", cd("-2+3*5"), [2, 3, 5], 13, 1, 0),
    ("answer-outside-tags", f"{P} 2+3+5 </think>\n2+3+5", [2, 3, 5], 10, 0, 0),
    ("unterminated-answer", f"{P} x </think>\n<answer>2+3+5", [2, 3, 5], 10, 0, 0),
    ("several-blocks-last-right", f"{P} x </think><answer>2+3</answer><answer>2+3+5</answer>",
     [2, 3, 5], 10, 0, 1),
    ("several-blocks-last-wrong", f"{P} x </think><answer>2+3+5</answer><answer>2+3</answer>",
     [2, 3, 5], 10, 0, 0),
    ("missing-think", "<answer>2+3+5</answer>", [2, 3, 5], 10, 0, 1),
    ("answer-before-think", "<answer>2+3+5</answer><think>x</think>", [2, 3, 5], 10, 0, 1),
    ("text-after-answer", cd("2+3+5") + " hope that helps", [2, 3, 5], 10, 0, 1),
    ("trailing-eos-token", cd("2+3+5") + "<|im_end|>\n", [2, 3, 5], 10, 1, 1),
    ("empty-answer", cd(""), [2, 3, 5], 10, 1, 0),
    ("division-by-zero", cd("2/(3-3)+5"), [2, 3, 3, 5], 5, 1, 0),
]


@pytest.mark.parametrize("response,nums,target,fmt,ans",
                         [c[1:] for c in COUNTDOWN_CASES], ids=[c[0] for c in COUNTDOWN_CASES])
def test_countdown_score_table(response, nums, target, fmt, ans):
    """Hand-checked rulings. Guards against: multiset bugs (set equality accepts reused or
    missing numbers), float arithmetic (rejects 5*(5-1/5)=24), crediting answers outside the
    tags or hedged across blocks, and format credit for a missing think block."""
    r = countdown.score(response, nums, target)
    assert (r["format"], r["answer"]) == (fmt, ans)
    assert r["total"] == pytest.approx(countdown.FORMAT_WEIGHT * fmt + countdown.ANSWER_WEIGHT * ans)


HOSTILE = {
    "import": "__import__('os').system('x')",
    "power-tower": "9**9**9",
    "div-zero": "1/0",
    "deep-parens-10k": "(" * 10_000 + "1" + ")" * 10_000,
    "deep-parens-unbalanced": "(" * 10_000,
    "deep-parens-short": "(" * 90 + "1" + ")" * 90,
    "megabyte-of-digits": "7" * 1_000_000,
    "long-literal": "1234567890123 + 1",
    "two-star-repeated": "2*" * 50_000 + "2",
    "huge-product": "*".join(["999999"] * 28),
    "lambda": "lambda: 1",
    "attribute": "(1).__class__",
    "fstring": "f'{1+1}'",
    "unicode-digits": "١+٢+٣",
    "full-width": "１２",
    "superscript": "2²",
    "nul-byte": "1\x00+2",
    "lone-surrogate": "1+\ud800",
    "floor-div": "7//1",
    "modulo": "7%4",
    "comparison": "1<2",
    "list": "[1,2]",
    "unary-chain": "-" * 150 + "1",
    "latex-garbage": "\\times" * 200,
    "unclosed-box": "\\boxed{" + "{" * 100_000,
    "tags-flood": "<answer></answer>" * 20_000,
    "eos-flood": "<answer>1</answer>" + "<|im_end|>" * 100_000,
}


@pytest.mark.timeout(5)  # a bound on the whole test (5 scorings take ms), not a CPU-dependent speed check
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_strings_score_zero(name):
    """Guards against code execution, hangs (int() of a megabyte of digits, 9**9**9) and parser
    crashes (RecursionError/MemoryError on deep nesting): each scores 0 and never raises, both as
    an answer block and as a whole response, for every task."""
    s = HOSTILE[name]
    nums, target = [1, 2, 3], 1
    t0 = time.perf_counter()
    for text in (cd(s), s):
        r = countdown.score(text, nums, target)
        assert r["answer"] == 0.0
    assert arithmetic.score(s, nums, target)["answer"] == 0.0
    assert not (check_expression(s).ok and check_expression(s).value is not None)
    gsm8k.score(s, "1")  # only "must not raise": a digit run is a legitimate number there
    print(f"{name}: {(time.perf_counter() - t0) * 1e3:.3f} ms for 5 scorings")


def test_scores_never_raise_on_random_strings():
    """Fuzz: guards against any exception path (IndexError in tag slicing, ValueError in Fraction
    parsing, unbalanced \\boxed{) on arbitrary mixtures of tags, digits, operators and unicode."""
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "####", "(", ")",
             "+", "-", "*", "/", "**", ".", ",", "$", " ", "\n", "0", "7", "12", "999999", "×",
             "１", "-", "\\frac{", "e", "x", "<|im_end|>"]
    for _ in range(2000):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        for r in (countdown.score(s, [1, 2, 7], 10), arithmetic.score(s, [1, 2, 7], 10),
                  gsm8k.score(s, "7")):
            assert set(r) == {"format", "answer", "total"}
            assert all(isinstance(v, float) for v in r.values())


# --------------------------------------------------------------------------- solver/generator

def test_generated_countdown_solutions_score_one():
    """Guards against a generator/scorer mismatch (stored witness rejected, targets outside the
    range, duplicate problems): all 300 generated tasks are solvable as stored."""
    tasks = countdown.generate_tasks(300, seed=1)
    assert len({countdown.example_key(t) for t in tasks}) == 300
    for t in tasks:
        assert len(t["nums"]) in (3, 4) and all(1 <= n <= 99 for n in t["nums"])
        assert 10 <= t["target"] <= 100
        r = countdown.score(cd(t["solution"]), t["nums"], t["target"])
        assert r == {"format": 1.0, "answer": 1.0, "total": 1.1}, t
    assert countdown.generate_tasks(20, seed=1) == tasks[:20]  # deterministic from seed


def test_solver_solutions_score_one_and_unsolvable_is_none():
    """Guards against the exhaustive solver missing answers (pruning too hard) or emitting
    strings the scorer cannot parse; and against it inventing a solution for a hopeless case."""
    for t in countdown.generate_tasks(60, seed=2):
        sol = countdown.solve(t["nums"], t["target"])
        assert sol is not None and countdown.score(cd(sol), t["nums"], t["target"])["answer"] == 1
    sol = countdown.solve([1, 5, 5, 5], 24)  # needs the 5 * (5 - 1/5) fraction
    assert sol is not None and countdown.score(cd(sol), [1, 5, 5, 5], 24)["answer"] == 1
    assert countdown.solve([1, 1, 1], 100) is None
    assert countdown.solve([2, 3], 7) is None
    assert countdown.solve([99, 98, 97, 96], 1000) is None


def test_real_parquet_rows_are_solvable_sample(shared_dir):
    """Guards against a scorer stricter than the dataset's own construction: the solver's answer
    for real rows (a seeded sample) earns full reward."""
    rows = countdown.load_countdown(shared_dir / "data/countdown/train.parquet")
    for row in random.Random(0).sample(rows, 40):
        sol = countdown.solve(row["nums"], row["target"])
        assert sol is not None, row  # every sampled row is solvable (40/40 measured)
        assert countdown.score(cd(sol), row["nums"], row["target"])["answer"] == 1


# --------------------------------------------------------------------------- arithmetic

def test_arithmetic_solutions_and_vocabulary():
    """Guards against the built-in task drifting from the tiny tokenizer's 20 characters (an
    unknown char would crash encoding), solutions the scorer rejects, or budgets too short."""
    allowed = set("0123456789+-*/()=:, ")
    problems = arithmetic.all_problems()
    assert len(problems) > 10000
    assert len({arithmetic.example_key(p) for p in problems}) == len(problems)
    for p in problems:
        prompt = "".join(m["content"] for m in arithmetic.messages(p)) + "="
        assert set(prompt) <= allowed and set(p["solution"]) | set(p["warm_start"]) <= allowed
        assert len(arithmetic.solution(p)) < arithmetic.MAX_NEW_TOKENS
        a, b = p["nums"]
        assert 1 <= b <= a <= 99 and p["target"] >= 1
        assert arithmetic.score(p["solution"], p["nums"], p["target"])["answer"] == 1.0
        assert arithmetic.score(p["warm_start"], p["nums"], p["target"])["format"] == 1.0
    # Every operation is needed: a policy that only ever adds (or multiplies) cannot pass.
    ops = Counter(next(c for c in p["solution"][1:] if c in "+-*/") for p in problems)
    assert min(ops["+"], ops["-"], ops["*"]) > 4000 and ops["/"] > 300
    assert arithmetic.messages({"nums": [83, 47], "target": 36}) == [
        {"role": "user", "content": "83,47:36"}]


def test_arithmetic_warm_start_is_blind_to_the_target():
    """Guards the claim that GRPO, not the warm start, teaches which operation hits the target:
    the warm-start text is the same for every target of a pair of numbers, so it is right only
    about as often as a random operator (~1/4)."""
    rows = arithmetic.all_problems()
    by_pair = {}
    for p in rows:
        by_pair.setdefault(tuple(p["nums"]), set()).add(p["warm_start"])
    assert all(len(texts) == 1 for texts in by_pair.values())
    chance = sum(arithmetic.score_example(p["warm_start"], p)["answer"] for p in rows) / len(rows)
    assert 0.15 < chance < 0.35, chance


@pytest.mark.parametrize("response,fmt,ans,total", [
    ("83-47", 1, 1, 1.1),
    (" 83 - 47 ", 1, 1, 1.1),
    ("(83-47)", 1, 1, 1.1),
    ("83+47", 1, 0, 0.1),        # right numbers, wrong operation: no credit for being close
    ("47-83", 1, 0, 0.1),        # negative
    ("83-47-0", 1, 0, 0.1),      # an extra number
    ("36", 1, 0, 0.1),           # the target alone
    ("83-47=", 0, 0, 0.0),
    ("83,47", 0, 0, 0.0),
    ("", 0, 0, 0.0),
])
def test_arithmetic_reward(response, fmt, ans, total):
    """Guards against a reward that pays for anything but the exact answer with both numbers,
    or that stops paying for the format."""
    r = arithmetic.score(response, [83, 47], 36)
    assert (r["format"], r["answer"]) == (fmt, ans)
    assert r["total"] == pytest.approx(total)


def test_arithmetic_division_is_exact():
    """Guards against rounding a division onto the target."""
    assert arithmetic.score("84/12", [84, 12], 7)["answer"] == 1.0
    assert arithmetic.score("85/12", [85, 12], 7)["answer"] == 0.0  # 7.08..: exact values only


def test_arithmetic_split_is_disjoint_and_seeded():
    """Guards against held-out leakage (same digits+target in train and test) and splits that
    change between runs with the same seed."""
    a, b, c = load_task("arithmetic", seed=0), load_task("arithmetic", seed=0), load_task(
        "arithmetic", seed=1)
    assert len(a.test) == arithmetic.NUM_TEST and a.test == b.test and a.test != c.test
    assert not {arithmetic.example_key(e) for e in a.test} & {
        arithmetic.example_key(e) for e in a.train}
    assert a.response_prefix == "" and a.max_new_tokens == arithmetic.MAX_NEW_TOKENS
    assert a.score(a.test[0]["solution"], a.test[0])["answer"] == 1.0


def test_split_drops_train_duplicates_of_test():
    """Guards against duplicate rows leaking a held-out problem into training."""
    rows = [{"q": i % 5} for i in range(50)]
    train, test = split_heldout(rows, 2, seed=0, key=lambda r: r["q"])
    assert len({r["q"] for r in test}) == 2
    assert not {r["q"] for r in test} & {r["q"] for r in train}
    with pytest.raises(ValueError, match="num_test"):
        split_heldout(rows, 50, seed=0, key=lambda r: r["q"])


# --------------------------------------------------------------------------- countdown data

def test_load_real_parquet(shared_dir):
    """Guards against schema drift in reading the HF parquet and against test/train leakage."""
    path = shared_dir / "data/countdown/train.parquet"
    rows = countdown.load_countdown(path)
    assert len(rows) == 8001
    assert all(isinstance(r["target"], int) and r["nums"] for r in rows)
    task = load_task("countdown", str(path), seed=0)
    assert task.response_prefix.endswith("<think>")
    keys = {countdown.example_key(e) for e in task.test}
    assert len(task.test) == countdown.NUM_TEST and not keys & {
        countdown.example_key(e) for e in task.train}
    msgs = task.messages(task.test[0])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert str(task.test[0]["target"]) in msgs[1]["content"]


def test_procedural_countdown_task():
    """Guards against data=None failing or producing unsolvable/overlapping pools."""
    task = load_task("countdown", seed=3, num_test=50)
    assert len(task.test) == 50 and len(task.train) >= countdown.NUM_GENERATED
    ex = task.test[0]
    assert task.score(P + " x </think><answer>" + ex["solution"] + "</answer>", ex)["answer"] == 1


def test_parquet_missing_column(tmp_path):
    """Guards against a KeyError deep in loading instead of one message naming file+columns."""
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"target": [5], "numbers": [[1, 4]]}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet.*missing column.*nums"):
        countdown.load_countdown(path)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        countdown.load_countdown(tmp_path / "nope.parquet")


@pytest.mark.parametrize("target,nums,why", [
    (pa.array([5, None], pa.int64()), pa.array([[1, 4], [2, 3]], pa.list_(pa.int64())), "target"),
    (pa.array([5, 5], pa.int64()), pa.array([[1, 4], None], pa.list_(pa.int64())), "empty"),
    (pa.array([5, 5], pa.int64()), pa.array([[1, 4], []], pa.list_(pa.int64())), "empty"),
    (pa.array([5, 5], pa.int64()), pa.array([[1, 4], [2, -3]], pa.list_(pa.int64())), "outside"),
    (pa.array([5, -5], pa.int64()), pa.array([[1, 4], [2, 3]], pa.list_(pa.int64())), "outside"),
    (pa.array([5, 5], pa.int64()), pa.array([[1, 4], [2.5, 3]], pa.list_(pa.float64())),
     "non-int"),  # integral floats in row 0 are fine: pandas writes nullable ints as float64
    (pa.array([5.0, float("nan")]), pa.array([[1, 4], [2, 3]], pa.list_(pa.int64())), "target"),
])
def test_parquet_malformed_row(tmp_path, target, nums, why):
    """Guards against silently training on nulls/negatives/floats: error names row 1; 'skip'
    drops it with one warning and keeps the good row."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"target": target, "nums": nums}), path)
    with pytest.raises(ValueError, match=rf"rows\.parquet: row 1: .*{why}"):
        countdown.load_countdown(path)
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        rows = countdown.load_countdown(path, on_bad_row="skip")
    assert rows == [{"nums": [1, 4], "target": 5}]


def test_data_files_read_as_parquet_or_json_lines(shared_dir, tmp_path):
    """Guards against a task that reads only the form its data happened to ship in: the same rows
    come back from parquet and from JSON lines, whatever the file is called, for both tasks."""
    cd = pq.read_table(shared_dir / "data/countdown/train.parquet").slice(0, 300)
    pq.write_table(cd, tmp_path / "cd.parquet")
    (tmp_path / "cd.data").write_text("".join(json.dumps(r) + "\n" for r in cd.to_pylist()))
    assert countdown.load_countdown(tmp_path / "cd.data") == countdown.load_countdown(tmp_path / "cd.parquet")
    g = gsm8k.load_gsm8k(shared_dir / "data/gsm8k/test.jsonl")
    lines = (shared_dir / "data/gsm8k/test.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    pq.write_table(pa.Table.from_pylist([{**r, "extra": 1} for r in records]), tmp_path / "g.jsonl")  # misnamed
    assert gsm8k.load_gsm8k(tmp_path / "g.jsonl") == g
    (tmp_path / "bad.jsonl").write_text(json.dumps({"target": 5, "nums": [1, 4]}) + "\n" + json.dumps({"nums": [2]}))
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: target is null"):
        countdown.load_countdown(tmp_path / "bad.jsonl")
    (tmp_path / "bin").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match="neither a parquet file nor UTF-8 JSON lines"):
        gsm8k.load_gsm8k(tmp_path / "bin")


# --------------------------------------------------------------------------- gsm8k

def test_load_gsm8k(shared_dir):
    """Guards against misparsing the '#### 1,450,000' finals: every reference rationale scores
    answer 1 against its own target, and the split has the requested size."""
    path = shared_dir / "data/gsm8k/test.jsonl"
    rows = gsm8k.load_gsm8k(path)
    assert len(rows) == 1319 and rows[0]["target"] == "18"
    assert all(gsm8k.score(r["answer"], r["target"])["answer"] == 1.0 for r in rows)
    task = load_task("gsm8k", str(path), num_test=100)
    assert len(task.test) == 100 and len(task.train) == 1219
    assert "\\boxed{}" in task.messages(task.test[0])[-1]["content"]


@pytest.mark.parametrize("text,expected", [
    ("so she makes $18 every day.", 18),
    ("The total is 1,234.50 dollars", Fraction("1234.5")),
    ("It costs $1,450,000.", 1450000),
    ("The answer is \\boxed{72}. Double-check: 70 + 2", 72),
    ("\\boxed{\\$1,200} and then 5", 1200),
    ("\\boxed{\\frac{3}{4}}", Fraction(3, 4)),
    ("temperature drops to -5 degrees", -5),
    ("10-2 = 8, and 8-3", 3),          # binary minus is not a sign
    ("#### 42\nextra 7", 42),
    ("the answer is 18.0", 18),
    ("no number here", None),
    ("\\boxed{none}", None),           # a committed non-numeric box does not fall back
    ("1,2,3", 3),                      # commas only group thousands
    ("9" * 100, None),
])
def test_extract_answer(text, expected):
    """Guards against the usual GSM8K extraction bugs: commas, $, trailing period, boxed
    precedence, negatives vs binary minus, decimals, and giant digit runs."""
    assert gsm8k.extract_answer(text) == expected


def test_gsm8k_score_and_bad_lines(tmp_path):
    """Guards against format credit for unmarked answers and a bare JSONDecodeError with no
    line number for a corrupted data file."""
    assert gsm8k.score("so \\boxed{18}", "18") == {"format": 1.0, "answer": 1.0, "total": 1.1}
    assert gsm8k.score("it is 18.0", "18") == {"format": 0.0, "answer": 1.0, "total": 1.0}
    assert gsm8k.score("\\boxed{17}", "18")["answer"] == 0.0
    path = tmp_path / "g.jsonl"
    good = json.dumps({"question": "q", "answer": "x #### 3"})
    path.write_text(good + "\n{not json\n\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl: line 2: invalid JSON"):
        gsm8k.load_gsm8k(path)
    with pytest.warns(UserWarning, match="skipped 2 malformed line"):
        assert len(gsm8k.load_gsm8k(path, on_bad_row="skip")) == 1
    with pytest.raises(ValueError, match="needs a data file"):
        load_task("gsm8k")


# --------------------------------------------------------------------------- load_task specs

USER_MODULE = '''
from nanogrpo.tasks import Task

def make(data=None, seed=0):
    ex = [{"x": i} for i in range(4)]
    return Task("mine", ex[:3], ex[3:], lambda e: [{"role": "user", "content": str(e["x"])}],
                lambda r, e: {"format": 0.0, "answer": 0.0, "total": 0.0},
                max_new_tokens=seed + 10 + len(data or ""))

def not_a_task(data=None, seed=0):
    return {"name": "dict"}

CONSTANT = 3
'''


def test_load_user_task(tmp_path, monkeypatch):
    """Guards against the 'module:function' path passing the wrong arguments or accepting a
    non-Task, and against confusing errors for a typo'd module or function."""
    (tmp_path / "my_tasks_mod.py").write_text(USER_MODULE)
    (tmp_path / "my_broken_mod.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_tasks_mod", "my_broken_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    task = load_task("my_tasks_mod:make", data="abc", seed=2)
    assert isinstance(task, Task) and task.name == "mine" and task.max_new_tokens == 15
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        load_task("no_such_mod_xyz:make")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_task("my_tasks_mod:missing")
    with pytest.raises(ValueError, match="not callable"):
        load_task("my_tasks_mod:CONSTANT")
    with pytest.raises(TypeError, match="returned dict, expected nanogrpo.tasks.Task"):
        load_task("my_tasks_mod:not_a_task")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
        load_task("my_broken_mod:make")  # the real culprit is named, not the user's module
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_task("my_tasks_mod:")
    with pytest.raises(ValueError, match="unknown task 'countdwn'"):
        load_task("countdwn")
