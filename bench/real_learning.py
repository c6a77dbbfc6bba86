"""A task on which a real 135M chat model visibly learns on 2 CPU cores: small sums, boxed answers.

SmolLM2-135M-Instruct cannot do GSM8K (measured here on 8 questions x 8 samples: 6 % of samples
right at temperature 1, 0 % greedy, 86 % of samples still talking at 128 tokens), and it gets even
two-digit sums wrong ("76 + 15 = 22"), so neither gives GRPO a signal within minutes. What it can
learn from a reward in that time is to answer a question it can often compute, in the format asked
for: "What is 7 + 12? Put your final answer within \\boxed{}." It never boxes a greedy answer at
first, so held-out success starts at 0. In README's run the format was learned in ~15 steps and
success kept rising for 50 more, as the model got the sums right more often in the one short form
it settled on. How much of that it could already compute unboxed at the start was not measured.

Used as a user task (`--task bench.real_learning:make_task`, see nanogrpo/tasks/__init__.py) by
README's real-model learning run and `tests/test_real_learning.py`. Reward: 0.1 for a boxed number
+ 1.0 when that boxed number is the sum (GSM8K's answer extraction; an unboxed right sum earns 0).
"""
from __future__ import annotations

import random
from pathlib import Path

from nanogrpo.tasks import Task, gsm8k

MAX_TERM = 30        # a, b in 1..MAX_TERM: 900 distinct sums
NUM_TEST = 64        # held-out problems (greedy pass@1)
MAX_NEW_TOKENS = 32  # "7 + 12 = 19. The answer is \\boxed{19}." fits in ~20 tokens
INSTRUCTION = "Put your final answer within \\boxed{}."


def problems(seed: int) -> list[dict]:
    rows = [{"a": a, "b": b, "target": str(a + b)} for a in range(1, MAX_TERM + 1) for b in range(1, MAX_TERM + 1)]
    random.Random(seed).shuffle(rows)
    return rows


def messages(example: dict) -> list[dict]:
    return [{"role": "user", "content": f"What is {example['a']} + {example['b']}? {INSTRUCTION}"}]


def score(response: str, example: dict) -> dict:
    """GSM8K's scoring, except that only an explicitly marked (boxed) answer counts as solved."""
    s = gsm8k.score(response, example["target"])
    answer = s["answer"] * s["format"]
    return {"format": s["format"], "answer": answer,
            "total": gsm8k.FORMAT_WEIGHT * s["format"] + gsm8k.ANSWER_WEIGHT * answer}


def make_task(data=None, seed=0) -> Task:
    if data is not None:
        raise ValueError(f"--data {data}: the boxed-sums task is procedural and takes no data file")
    rows = problems(seed)
    return Task("boxed-sums", rows[NUM_TEST:], rows[:NUM_TEST], messages, score, "", MAX_NEW_TOKENS)


def make_small_task(data=None, seed=0) -> Task:
    """The same task with 16 held-out problems, for the short learning test (a cheaper eval)."""
    task = make_task(data, seed)
    task.test = task.test[:16]
    return task


def plot_small(run_dir, out_png) -> Path:
    """A two-panel PNG (reward; sampled success and format rate, held-out greedy success) of a run,
    small enough for the README: `python -m bench.real_learning RUN_DIR OUT.png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nanogrpo.plot import read_metrics

    m = read_metrics(Path(run_dir) / "metrics.csv")

    def points(col):
        return [(s, v) for s, v in zip(m["step"], m[col]) if s is not None and v is not None]

    fig = Figure(figsize=(8, 2.8), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for ax, cols in ((left, (("reward_mean", "reward (mean of 64 samples)", "-"),)),
                     (right, (("format_rate", "sampled: boxed answer", "-"), ("success_rate", "sampled: solved", "-"),
                              ("eval_success", "held-out greedy: solved", "o-")))):
        for col, label, style in cols:
            xs, ys = zip(*points(col))
            ax.plot(xs, ys, style, label=label, linewidth=1.3, markersize=4)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    right.set_ylim(0, 1)
    fig.suptitle("SmolLM2-135M-Instruct, boxed sums, 2 CPU cores", fontsize=11)
    fig.savefig(out_png, format="png")
    return Path(out_png)


if __name__ == "__main__":
    import sys

    print(plot_small(sys.argv[1], sys.argv[2]))
