"""Tasks: prompts, reward functions and train/held-out splits, behind one small `Task` record.

Built-ins: "arithmetic" (the tiny model's default run), "countdown", "gsm8k". A user's own task is
"module:function", called as `function(data=data, seed=seed)` and returning a `Task`.

The task modules know nothing of `Task` (they expose data loaders, `messages`, `score_example`,
constants); this file assembles them, so there is no import cycle between package and modules.
"""
from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Callable

from nanogrpo.tasks import arithmetic, countdown, gsm8k


@dataclass
class Task:
    """One RL task. `score` gets the full assistant text, i.e. response_prefix + completion, and
    returns {"format", "answer", "total"} floats (answer == 1.0 means solved); it never raises.
    The launcher appends `response_prefix` after the chat template's generation prompt."""
    name: str
    train: list[dict]                          # training examples, plain JSON-able dicts
    test: list[dict]                           # held-out, disjoint from train: greedy pass@1
    messages: Callable[[dict], list[dict]]     # example -> [{"role": ..., "content": ...}]
    score: Callable[[str, dict], dict]         # (prefix + completion, example) -> rewards
    response_prefix: str = ""                  # text the assistant turn is prefilled with
    max_new_tokens: int = 256                  # default sampling budget for this task


BUILTIN = ("arithmetic", "countdown", "gsm8k")


def split_heldout(rows: list[dict], num_test: int, seed: int, key: Callable[[dict], object]
                  ) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, test) split by `seed`; train rows sharing a key with test are dropped.

    Data files carry duplicates (the Countdown parquet has 17 repeated (nums, target) pairs), so a
    plain index split would leak held-out problems into training.
    """
    if not 0 < num_test < len(rows):
        raise ValueError(f"num_test must be in [1, {len(rows) - 1}] for {len(rows)} rows, "
                         f"got {num_test}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test, test_keys = [], set()
    for i in order:
        if len(test) == num_test:
            break
        k = key(rows[i])
        if k not in test_keys:  # duplicates inside the test set would double-count in pass@1
            test_keys.add(k)
            test.append(rows[i])
    train = [rows[i] for i in order if key(rows[i]) not in test_keys]
    return train, test


def load_task(spec: str = "arithmetic", data: str | None = None, *, seed: int = 0,
              num_test: int | None = None, on_bad_row: str = "error") -> Task:
    """Build a task by name. `data` is a file path (parquet or JSON lines, see tasks/records.py);
    `num_test=None` uses the task's own default held-out size; `seed` fixes the split (and the
    procedural Countdown pool when `data` is None)."""
    if ":" in spec:
        return _load_user_task(spec, data, seed)
    if spec == "arithmetic":
        if data is not None:
            raise ValueError("the arithmetic task is built in and takes no data file "
                             f"(got data={data!r})")
        n_test = arithmetic.NUM_TEST if num_test is None else num_test
        train, test = split_heldout(arithmetic.all_problems(), n_test, seed, arithmetic.example_key)
        return Task("arithmetic", train, test, arithmetic.messages, arithmetic.score_example,
                    arithmetic.RESPONSE_PREFIX, arithmetic.MAX_NEW_TOKENS)
    if spec == "countdown":
        n_test = countdown.NUM_TEST if num_test is None else num_test
        if data is None:
            rows = countdown.generate_tasks(countdown.NUM_GENERATED + n_test, seed)
        else:
            rows = countdown.load_countdown(data, on_bad_row=on_bad_row)
        train, test = split_heldout(rows, n_test, seed, countdown.example_key)
        return Task("countdown", train, test, countdown.messages, countdown.score_example,
                    countdown.RESPONSE_PREFIX, countdown.MAX_NEW_TOKENS)
    if spec == "gsm8k":
        if data is None:
            raise ValueError("the gsm8k task needs a data file: pass data='path/to/gsm8k.jsonl' "
                             '(JSON lines {"question": ..., "answer": "... #### N"}, e.g. '
                             "../shared/data/gsm8k/test.jsonl)")
        rows = gsm8k.load_gsm8k(data, on_bad_row=on_bad_row)
        n_test = gsm8k.NUM_TEST if num_test is None else num_test
        train, test = split_heldout(rows, n_test, seed, gsm8k.example_key)
        return Task("gsm8k", train, test, gsm8k.messages, gsm8k.score_example,
                    gsm8k.RESPONSE_PREFIX, gsm8k.MAX_NEW_TOKENS)
    raise ValueError(f"unknown task {spec!r}: expected one of {', '.join(BUILTIN)} "
                     "or 'module:function' for your own task")


def _load_user_task(spec: str, data: str | None, seed: int) -> Task:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"task spec {spec!r}: expected 'module:function', "
                         "e.g. 'mytasks:make_task'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only translate "this module is missing"; a missing dependency *inside* it keeps its
        # own message, which names the real culprit.
        if e.name is None or not (module_name + ".").startswith(e.name + "."):
            raise
        raise ValueError(f"task spec {spec!r}: cannot import module {module_name!r} ({e}); "
                         "is it on sys.path / PYTHONPATH?") from e
    func = getattr(module, func_name, None)
    if func is None:
        raise ValueError(f"task spec {spec!r}: module {module_name!r} ({module.__file__}) "
                         f"has no attribute {func_name!r}")
    if not callable(func):
        raise ValueError(f"task spec {spec!r}: {module_name}.{func_name} is not callable")
    task = func(data=data, seed=seed)
    if not isinstance(task, Task):
        raise TypeError(f"task spec {spec!r}: {module_name}.{func_name}(data=..., seed=...) "
                        f"returned {type(task).__name__}, expected nanogrpo.tasks.Task")
    if not task.train or not task.test:
        raise ValueError(f"task spec {spec!r}: returned a Task with an empty train or test list")
    return task
