"""Rollout scoring and rewards: what a RolloutWorker generates from, what it scores, which stop ids
it samples with, which policy version it writes on its episodes; and rewards that must be 0 for
wrong answers, bounded in time on hostile strings, and reachable on real Countdown rows.

The worker runs in-process (its class under the Ray decorator, `__ray_actor_class__`), with
`ray.get` standing in for the object store and a recording buffer, so each check reads the exact
rows the worker would put.
"""
import random
import shutil

import pytest
import torch

import actors.rollout as rollout_mod
from actors.rollout import RolloutWorker, prompt_ids, stop_ids
from nanogrpo.episode import SCHEMA
from nanogrpo.generate import Completion, generate
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from nanogrpo.tasks import arithmetic, countdown, gsm8k, load_task
from nanogrpo.tiny import ENDOFTEXT_ID, TINY_MODEL_CONFIG, write_tiny_model_dir
from nanogrpo.tokenizer import Tokenizer
from nanogrpo.weights import pack

Worker = RolloutWorker.__ray_actor_class__  # the plain class Ray wraps


def make_worker(model_dir, task: str, sampling: dict, buffer):
    # (worker_id, cfg, model_dir, buffer_name), positionally: mutmut's trampolines under Ray's method
    # wrapper mishandle keyword arguments to __init__. The recording buffer replaces the named actor.
    cfg = RunConfig(task=task, seed=0, threads_per_worker=1, dtype="fp32", **sampling)
    worker = Worker(0, cfg, str(model_dir), "unused-buffer-name")
    worker.buffer = buffer
    return worker


class RecordingBuffer:
    """EpisodeBuffer stand-in: `put.remote(batches, timeout)` records the batches."""

    def __init__(self):
        self.batches = []
        buf = self

        class _Put:
            @staticmethod
            def remote(batches, timeout=None):
                buf.batches.extend(batches)
                return len(buf.batches)
        self.put = _Put()

    def rows(self) -> list[dict]:
        return [r for b in self.batches for r in b.to_pylist()]


@pytest.fixture
def no_object_store(monkeypatch):
    """ray.get on a value returns it: weights are passed as [PackedWeights] instead of [ObjectRef]."""
    monkeypatch.setattr(rollout_mod.ray, "get", lambda x, **k: x)


SAMPLING = {"group_size": 3, "max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def qwen_model_dir(qwen_tokenizer_dir, tmp_path_factory):
    """A 1-layer random Qwen2 with Qwen2.5's real vocabulary and tokenizer files."""
    d = tmp_path_factory.mktemp("qwen-vocab")
    for f in qwen_tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, d / f.name)
    cfg = {**TINY_MODEL_CONFIG, "vocab_size": 151936, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "bos_token_id": 151643, "eos_token_id": 151645}
    Qwen2.from_config(cfg, seed=0).save_pretrained(d)
    return d


def test_qwen_stop_ids_are_the_end_of_turn_and_end_of_text_tokens(qwen_tokenizer_dir):
    """Guards against wrong `stop_ids` for a Qwen tokenizer: a chat model ends its turn with
    <|im_end|> (151645) and may emit <|endoftext|> (151643); missing either, a completion runs to
    max_new_tokens and is scored with the junk after it; an extra id stops a completion early."""
    tok = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    assert stop_ids(tok) == [151643, 151645]
    assert [tok.decode([i]) for i in stop_ids(tok)] == ["<|endoftext|>", "<|im_end|>"]


def test_prompt_ids_end_with_the_response_prefix(qwen_tokenizer_dir):
    """Guards against `prompt_ids` dropping the task's response_prefix: the assistant turn must be
    prefilled with it, right after the chat template's generation prompt."""
    tok = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    task = load_task("countdown", None, seed=0, num_test=4)
    ids = prompt_ids(tok, task, task.train[0])
    msgs = tok.apply_chat_template(task.messages(task.train[0]), add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == msgs + countdown.RESPONSE_PREFIX
    assert msgs.endswith("<|im_start|>assistant\n")


def test_stop_ids_include_the_end_of_turn_token_when_eos_is_end_of_text(tiny_dir):
    """Guards against `stop_ids` missing <|im_end|> when the tokenizer's EOS is <|endoftext|> (as in
    the tiny tokenizer and Qwen base models): a chat-tuned policy ends its turn with <|im_end|>, and
    without it as a stop the completion runs on to max_new_tokens."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    assert tok.eos_token_id == ENDOFTEXT_ID
    assert stop_ids(tok) == sorted({ENDOFTEXT_ID, tok.convert_tokens_to_ids("<|im_end|>")})
    assert len(stop_ids(tok)) == 2


def test_countdown_prefix_is_in_the_prompt_and_in_the_scored_text(qwen_model_dir, monkeypatch, no_object_store):
    """Guards against dropping Countdown's `response_prefix` from the prompt (the model is asked to
    start its turn from nothing) or from the scored text (every format reward becomes 0, since the
    prefix holds the opening <think>), against scoring the wrong example of a batch, and against
    sampling without the tokenizer's stop ids."""
    tok = Tokenizer.from_pretrained(qwen_model_dir)
    seen = {}
    worker = make_worker(qwen_model_dir, "countdown", SAMPLING, RecordingBuffer())
    examples = [worker.task.train[i] for i in (3, 8)]
    # The first two samples answer right (this example's own solution), the third wrongly.
    bodies = [[f" work </think>\n<answer>{countdown.solve(ex['nums'], ex['target'])}</answer>",
               f" x </think> so <answer>{countdown.solve(ex['nums'], ex['target'])}</answer>",  # no format
               " x </think>\n<answer>1+1</answer>"] for ex in examples]

    def fake_generate(model, prompts, n, stop_token_ids, **kw):
        seen["prompts"], seen["stops"] = prompts, list(stop_token_ids)
        return [Completion(p, s, tok.encode(bodies[p][s]) + [151645], [-1.0] * (len(tok.encode(bodies[p][s])) + 1),
                           "stop") for p in range(len(prompts)) for s in range(n)]
    monkeypatch.setattr(rollout_mod, "generate", fake_generate)
    worker.rollout([(10, 0, 3), (11, 0, 8)], [None], -1)

    assert seen["stops"] == [151643, 151645]
    for p, ex in zip(seen["prompts"], examples):
        text = tok.decode(p)
        assert text.endswith("<|im_start|>assistant\n" + countdown.RESPONSE_PREFIX), text[-200:]
        assert f"{list(ex['nums'])}" in text and f"equals {ex['target']}" in text
    rows = worker.buffer.rows()
    assert [(r["group_id"], r["sample_index"]) for r in rows] == [(g, s) for g in (10, 11) for s in range(3)]
    for r in rows:
        body = bodies[0 if r["group_id"] == 10 else 1][r["sample_index"]]
        assert r["response"] == countdown.RESPONSE_PREFIX + body  # special tokens dropped
        assert r["prompt_ids"] == seen["prompts"][0 if r["group_id"] == 10 else 1]
    assert [(r["reward_format"], r["reward_answer"]) for r in rows] == [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)] * 2
    assert [r["reward"] for r in rows] == pytest.approx([1.1, 1.0, 0.1] * 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    Qwen2.from_config(TINY_MODEL_CONFIG, seed=0).save_pretrained(d)
    return d


def perturbed(model_dir, seed):
    m = Qwen2.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return m


def test_episodes_carry_the_version_the_worker_generated_with(tiny_dir, no_object_store):
    """Guards against a worker labelling episodes with the version it was asked for instead of the
    one it holds: asked for an older version than it has loaded, it keeps (and generates with) the
    newer weights, so the episodes must say so; the learner's staleness bound and decoupled-PPO
    switch read this label. Also guards against a worker that never loads a newer version."""
    buf = RecordingBuffer()
    sampling = {**SAMPLING, "temperature": 0.0}
    worker = make_worker(tiny_dir, "arithmetic", sampling, buf)
    v3 = perturbed(tiny_dir, 3)
    stats = worker.rollout([(0, 0, 0)], [pack(v3, 3)], 3)
    assert stats["version"] == 3 and {r["policy_version"] for r in buf.rows()} == {3}
    v2 = perturbed(tiny_dir, 2)
    buf.batches.clear()
    stats = worker.rollout([(1, 1, 5)], [pack(v2, 2)], 2)  # a late call naming an older version
    rows = buf.rows()
    assert stats["version"] == 3 and {r["policy_version"] for r in rows} == {3}
    # ... and the completions really are v3's (greedy): the label matches the weights used.
    p = prompt_ids(worker.tok, worker.task, worker.task.train[5])
    want = generate(v3, [p], n=1, max_new_tokens=6, temperature=0.0, stop_token_ids=worker.stops)[0]
    assert rows[0]["completion_ids"] == want.token_ids
    assert rows[0]["logprobs"] == pytest.approx(want.logprobs, abs=1e-5)


def test_worker_decodes_at_most_max_batch_rows_and_refills(tiny_dir, no_object_store, monkeypatch):
    """Guards against --max-batch-rows not reaching the engine (continuous refill never engaging
    in a run): a call of 3 prompts x 3 samples with a 3-row limit decodes one group at a time,
    refilling, and yields the same greedy completions as all 9 rows at once."""
    seen = []
    real = rollout_mod.generate

    def spy(*a, **k):
        seen.append(k.get("max_batch_rows"))
        return real(*a, **k)
    monkeypatch.setattr(rollout_mod, "generate", spy)
    outs = {}
    for rows in (3, 512):
        buf = RecordingBuffer()
        worker = make_worker(tiny_dir, "arithmetic", {**SAMPLING, "temperature": 0.0, "max_batch_rows": rows}, buf)
        worker.rollout([(0, 0, 0), (1, 0, 1), (2, 0, 2)], [pack(perturbed(tiny_dir, 1), 1)], 1)
        outs[rows] = [r["completion_ids"] for r in sorted(buf.rows(), key=lambda r: (r["group_id"], r["sample_index"]))]
    assert seen == [3, 512] and outs[3] == outs[512] and len(outs[3]) == 9


def test_worker_refuses_weights_whose_version_disagrees(tiny_dir, no_object_store):
    """Guards against loading an object whose packed version is not the one named, which would
    label episodes with a version their weights are not."""
    worker = make_worker(tiny_dir, "arithmetic", SAMPLING, RecordingBuffer())
    with pytest.raises(RuntimeError, match="asked for weights v4, object holds v2"):
        worker.rollout([(0, 0, 0)], [pack(perturbed(tiny_dir, 2), 2)], 4)


def test_rollout_rows_match_the_declared_schema_and_stop_at_eos(tiny_dir, no_object_store):
    """Guards against rows the buffer would refuse (schema drift) and against the built-in tiny
    tokenizer's EOS missing from the stop ids (completions would run on past the answer)."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    stops = stop_ids(tok)
    assert stops == sorted({ENDOFTEXT_ID, tok.convert_tokens_to_ids("<|im_end|>")}) and ENDOFTEXT_ID in stops
    worker = make_worker(tiny_dir, "arithmetic", SAMPLING, RecordingBuffer())
    worker.rollout([(0, 0, 0), (1, 0, 1)], [None], -1)
    assert all(b.schema.equals(SCHEMA) for b in worker.buffer.batches)
    for r in worker.buffer.rows():
        ids = r["completion_ids"]
        assert not set(stops) & set(ids[:-1])
        assert (r["finish_reason"] == "stop") == (ids[-1] in stops)


# --------------------------------------------------------------------------- rewards

WRONG = [  # (task, response, example) hand-checked: each answer is wrong, so its answer reward is 0
    ("countdown", countdown.RESPONSE_PREFIX + " x </think>\n<answer>2+3</answer>", {"nums": [2, 3, 5], "target": 10}),
    ("countdown", countdown.RESPONSE_PREFIX + " x </think>\n<answer>2*3+5</answer>", {"nums": [2, 3, 5], "target": 10}),
    ("arithmetic", "83+47", {"nums": [83, 47], "target": 36}),
    ("arithmetic", "83-47-1", {"nums": [83, 47], "target": 36}),
    ("gsm8k", "so the answer is #### 17", {"target": "18"}),
    ("gsm8k", "The answer is 18.5", {"target": "18"}),
]
RIGHT = [
    ("countdown", countdown.RESPONSE_PREFIX + " x </think>\n<answer>2*5+3-3</answer>",
     {"nums": [2, 5, 3, 3], "target": 10}),
    ("arithmetic", "83-47", {"nums": [83, 47], "target": 36}),
    ("gsm8k", "so the answer is #### 18", {"target": "18"}),
]
SCORERS = {"countdown": countdown.score_example, "arithmetic": arithmetic.score_example,
           "gsm8k": gsm8k.score_example}


@pytest.mark.parametrize("task,response,example", WRONG + RIGHT)
def test_each_scorer_tells_right_from_wrong(task, response, example):
    """Guards against a scorer whose answer reward is 1.0 (or 0.0) whatever the response: each
    task has hand-checked wrong answers that must score 0 and right ones that must score 1."""
    r = SCORERS[task](response, example)
    assert r["answer"] == (1.0 if (task, response, example) in RIGHT else 0.0)


HOSTILE = ["7" * 1_000_000, "(" * 100_000 + "1" + ")" * 100_000, "9**9**9**9", "2*" * 200_000 + "2",
           "<answer>" * 50_000 + "</answer>" * 50_000, "<|im_end|>" * 200_000, "\\boxed{" * 100_000,
           "#### " + "9" * 500_000, "1/" * 100_000 + "1"]


@pytest.mark.timeout(5)
def test_hostile_strings_score_zero_within_a_bound():
    """Guards against a scorer that takes seconds per hostile string (quadratic tag or special
    token stripping, int() of a huge digit run, deep recursion): every task scores every string
    (also inside an answer block) as a wrong answer, and the whole test is bounded by
    pytest-timeout (5 s, ~50x what it takes here), not by a speed assertion on the CPU model."""
    for s in HOSTILE:
        for text in (s, countdown.RESPONSE_PREFIX + " x </think><answer>" + s + "</answer>"):
            assert countdown.score(text, [1, 2, 3], 6)["answer"] == 0.0
            assert arithmetic.score(text, [1, 2, 3], 6)["answer"] == 0.0
            assert gsm8k.score(text, "6")["answer"] == 0.0


def test_real_countdown_rows_are_solved_and_score_one(shared_dir):
    """Guards against a solver returning None for every row (a check guarded by `if sol is not
    None` then checks nothing) and a scorer stricter than the dataset: every row of a seeded
    sample of the real TinyZero rows is solved, and the solution earns full reward."""
    rows = countdown.load_countdown(shared_dir / "data/countdown/train.parquet")
    sample = random.Random(1).sample(rows, 40)
    solved = [(row, countdown.solve(row["nums"], row["target"])) for row in sample]
    assert sum(sol is not None for _, sol in solved) >= 38  # 40/40 measured; rows are built solvable
    for row, sol in solved:
        if sol is not None:
            r = countdown.score(countdown.RESPONSE_PREFIX + " x </think>\n<answer>" + sol + "</answer>",
                                row["nums"], row["target"])
            assert r == {"format": 1.0, "answer": 1.0, "total": 1.1}


def test_task_default_prefix_is_the_countdown_one():
    """Guards against the Countdown task losing its TinyZero prefix (its format reward needs the
    opening <think> the prefix supplies)."""
    task = load_task("countdown", None, seed=0, num_test=4)
    assert task.response_prefix == countdown.RESPONSE_PREFIX and task.response_prefix.endswith("<think>")
    assert task.score(task.response_prefix + " x </think>\n<answer>1</answer>", task.train[0])["format"] == 1.0
    assert task.score(" x </think>\n<answer>1</answer>", task.train[0])["format"] == 0.0
