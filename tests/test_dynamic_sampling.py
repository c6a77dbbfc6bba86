"""--dynamic-sampling (DAPO): groups without reward spread are filtered at the buffer and replaced by
extra prompts, bounded by --max-resample-factor; a step whose budget runs out trains on what it has.

The buffer and the driver's bookkeeping are tested in-process (the actor's class driven by asyncio,
as in test_buffer_versions); one end-to-end run, cut and resumed, checks every step against a
simulation of the rule on a task whose groups have spread or not by construction."""
import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import launch
from actors.backfill import EXTRA_BASE, Backfill
from actors.buffer import EpisodeBuffer
from learner.learner import LearnerCore
from nanogrpo.episode import SCHEMA, group_batch
from nanogrpo.grpo import no_signal
from nanogrpo.runconfig import RunConfig, build_parser

Buffer = EpisodeBuffer.__ray_actor_class__
ROOT = Path(__file__).resolve().parents[1]


def group(gid: int, rewards, version: int = 0, lengths=None, finish=None, step: int | None = None):
    lengths = lengths or [1] * len(rewards)
    finish = finish or ["stop"] * len(rewards)
    return group_batch([{"group_id": gid, "step": gid if step is None else step, "example_index": 100 + gid,
                         "sample_index": i, "prompt_ids": [1, 2], "completion_ids": [3] * n,
                         "logprobs": [-0.1] * n, "response": "x", "reward": float(r), "reward_format": 1.0,
                         "reward_answer": 0.0, "finish_reason": f, "policy_version": version, "worker_id": 0,
                         "gen_seconds": 0.0, "created_at": time.time()}
                        for i, (r, n, f) in enumerate(zip(rewards, lengths, finish))])


def ids(table) -> list[int]:
    return sorted(set(table.column("group_id").to_pylist()))


def balanced(s: dict) -> bool:
    return s["produced"] == s["consumed"] + s["dropped"] + s["filtered"] + s["lost"] + s["in_buffer"]


def test_put_filters_groups_without_spread_and_the_counts_balance(tmp_path):
    """Guards against filtered groups that vanish from the accounting (produced must equal consumed
    + dropped + filtered + lost + in buffer), from the episode log, from the driver's list of work
    to replace, or from a resumed buffer's counters (checkpoint_state)."""
    async def scenario():
        buf = Buffer(16, str(tmp_path / "log"), spread_filter=RunConfig(group_size=2))
        await buf.put([group(0, [0, 1]), group(1, [1, 1]), group(2, [0, 0]), group(3, [1, 0])])
        assert buf.stats()["in_buffer"] == 2 and buf.stats()["filtered"] == 2
        assert sorted(buf.pop_filtered()) == [(1, 1, 101), (2, 2, 102)] and buf.pop_filtered() == []
        assert ids(await buf.take(2, timeout=2.0)) == [0, 3]
        await buf.put([group(4, [0, 1]), group(5, [0.5, 0.5], version=0)])
        s = buf.stats()
        assert (s["produced"], s["consumed"], s["filtered"], s["in_buffer"]) == (6, 2, 3, 1) and balanced(s)
        state = buf.checkpoint_state()  # group 4 still buffered: counted as dropped for the resume
        assert (state["filtered"], state["dropped"]) == (3, 1)
        again = Buffer(16, str(tmp_path / "log"), counters=state, spread_filter=RunConfig(group_size=2))
        await again.put([group(6, [2, 2])])
        s2 = again.stats()
        assert (s2["produced"], s2["filtered"]) == (7, 4) and balanced(s2)
        again.flush()
        log = pq.read_table(tmp_path / "log")
        assert sorted(set(log.column("group_id").to_pylist())) == list(range(7))  # filtered ones logged too
        plain = Buffer(16)  # the flag off: equal rewards are kept (the learner's --drop-zero-var sees them)
        await plain.put([group(7, [1, 1])])
        assert plain.stats()["in_buffer"] == 1 and plain.stats()["filtered"] == 0 and plain.pop_filtered() == []
    asyncio.run(scenario())


@pytest.mark.parametrize("shaping", [{}, {"overlong_buffer": 4, "max_new_tokens": 8},
                                     {"mask_truncated": True, "max_new_tokens": 8}])
def test_filter_agrees_with_the_learner(shaping):
    """Guards against a buffer filter that drifts from what the learner trains on: a group the
    filter keeps must have a non-zero advantage in the learner's own step batch, and a group it drops
    none: overlong shaping can give equal rewards a spread (group 2) or cancel one (group 3), and
    --mask-truncated can leave a spread without signal (group 4)."""
    cfg = RunConfig(group_size=4, **shaping)
    groups = [group(0, [1, 1, 1, 1]), group(1, [0, 1, 0, 1]),
              group(2, [1, 1, 1, 1], lengths=[2, 6, 8, 8], finish=["stop", "stop", "length", "length"]),
              group(3, [1, 1, 0, 0], lengths=[8, 8, 3, 3], finish=["length", "length", "stop", "stop"]),
              group(4, [0, 2, 1, 1], lengths=[8, 8, 3, 3], finish=["length", "length", "stop", "stop"])]
    buf = Buffer(16, spread_filter=cfg)
    kept = [buf._has_spread(g) for g in groups]
    fake = SimpleNamespace(cfg=cfg, _max_new=lambda: cfg.max_new_tokens)  # what _step_batch reads
    b = LearnerCore._step_batch(fake, pa.Table.from_batches(groups, schema=SCHEMA))
    assert kept == (~no_signal(b["adv"], 4)).tolist()
    expect = {"": [False, True, False, True, True], "overlong_buffer": [False, True, True, False, True],
              "mask_truncated": [False, True, False, True, False]}
    assert kept == expect[next(iter(shaping), "")]


def test_excused_groups_let_a_take_come_up_short_in_ticket_order():
    """Guards against a step that waits forever once the resample budget is spent (the take must
    return what it has when the driver excuses the missing groups), an excuse used twice or by the
    wrong step (queued takes with tickets, k >= 1), an empty step that never returns, and an excuse
    that survives a rewind (reset) into the regenerated steps."""
    async def scenario():
        buf = Buffer(16, spread_filter=RunConfig(group_size=2), counters={"next_ticket": 0})
        await buf.put([group(0, [0, 1]), group(1, [0, 1])])
        second = asyncio.create_task(buf.take(2, timeout=5.0, ticket=1))  # queued ahead of its turn
        first = asyncio.create_task(buf.take(3, timeout=5.0, ticket=0))
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()  # 2 of 3: waits
        await buf.excuse(1)
        t0 = await asyncio.wait_for(first, 2.0)
        assert ids(t0) == [0, 1] and buf.excused == 0 and buf.shortfall == 1
        await asyncio.sleep(0.05)
        assert not second.done()  # the excuse was used up by ticket 0
        await buf.put([group(2, [0, 1]), group(3, [1, 0])])
        assert ids(await asyncio.wait_for(second, 2.0)) == [2, 3] and buf.shortfall == 1
        await buf.excuse(2)
        empty = await buf.take(2, timeout=2.0, ticket=2)  # nothing with spread came: an empty step
        assert empty.num_rows == 0 and empty.schema.equals(SCHEMA) and buf.shortfall == 3
        await buf.excuse(1)
        await buf.put([group(4, [1, 1])])  # filtered: its work waits for the driver
        await buf.reset(5)
        assert buf.excused == 0 and buf.pop_filtered() == []
        with pytest.raises(TimeoutError):
            await buf.take(1, timeout=0.2, ticket=5)
        assert balanced(buf.stats())
    asyncio.run(scenario())


def test_backfill_extras_are_bounded_deterministic_and_unique():
    """Guards against more than F x B prompts for a step, extras that depend on the order rollouts
    landed in (a resumed or rewound run would then train on other data), and extra group ids that
    collide with main ids (step x B + j) or their re-issues (+ REISSUE_OFFSET)."""
    order = list(range(50))
    bf = Backfill(4, 1.5, lambda pos: order[pos % 50])
    assert bf.budget == 2
    filtered = [(9, 2, 0), (8, 2, 0), (3, 0, 0), (10, 2, 0)]
    items, excused = bf.replace(filtered)
    assert items == [bf.extra_item(0, 0), bf.extra_item(2, 0), bf.extra_item(2, 1)] and excused == 1
    again = Backfill(4, 1.5, lambda pos: order[pos % 50])
    assert again.replace(list(reversed(filtered))) == (items, excused)  # landing order does not matter
    assert bf.issued(2) == 6 == int(1.5 * 4) and bf.issued(0) == 5 and bf.issued(7) == 4
    assert bf.replace([(EXTRA_BASE + 4, 2, 0)]) == ([], 1)  # step 2's budget is spent
    main = {s * 4 + j + k * launch.REISSUE_OFFSET for s in range(10**4) for j in range(4) for k in range(3)}
    extra = {bf.extra_item(s, r)[0] for s in range(10**4) for r in range(2)}
    assert len(extra) == 2 * 10**4 and not main & extra
    bf.rewind(1)  # step 0 stays done; step 2 is generated anew and gets the same extras again
    assert bf.replace([(9, 2, 0)]) == ([bf.extra_item(2, 0)], 0) and bf.issued(0) == 5
    assert Backfill(4, 1.0, lambda pos: pos).replace([(1, 0, 0)]) == ([], 1)  # F = 1: no extras


def test_learner_step_without_groups_moves_the_version_and_nothing_else(tmp_path):
    """Guards against a step whose every prompt was filtered (the take returns no rows) crashing
    the learner, changing weights or optimizer state, or not advancing the version (the driver's
    staleness bound would never let the next step's prompts out); the step after it trains as usual."""
    from nanogrpo.model import Qwen2
    from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir
    d = write_tiny_model_dir(tmp_path / "tiny")
    Qwen2.from_config(TINY_MODEL_CONFIG, seed=3).save_pretrained(d)
    core = LearnerCore(vars(RunConfig(lr=1e-3, group_size=2, max_new_tokens=8)), str(d), threads=1)
    before = {n: p.detach().clone() for n, p in core.model.named_parameters()}
    metrics, _ = core.train_step(SCHEMA.empty_table())
    assert (metrics["groups"], metrics["train_tokens"], metrics["version"], core.version) == (0, 0, 1, 1)
    assert all(torch.equal(p, before[n]) for n, p in core.model.named_parameters()) and not core.opt.state
    metrics, _ = core.train_step(pa.Table.from_batches([group(0, [0, 1]), group(1, [1, 0])], schema=SCHEMA))
    assert (metrics["groups"], metrics["version"]) == (2, 2) and metrics["train_tokens"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in core.model.named_parameters())


def test_flags_help_and_validation():
    """Guards against a --help that does not say how --dynamic-sampling meets --drop-zero-var and
    the budget, and a factor below 1 accepted (it would allow fewer prompts than the step needs)."""
    helps = {a.dest: " ".join(a.help.split()) for a in build_parser("x")._actions}
    assert "--drop-zero-var" in helps["dynamic_sampling"] and "--max-resample-factor" in helps["dynamic_sampling"]
    assert "shortfall" in helps["dynamic_sampling"] and "F x --prompts-per-step" in helps["max_resample_factor"]
    assert not build_parser("x").parse_args([]).dynamic_sampling
    with pytest.raises(ValueError, match="--max-resample-factor"):
        RunConfig(max_resample_factor=0.5).validate()


# ----------------------------------------------------------------------------- end to end
# Half the examples score a constant (their groups never have spread); the others alternate 0/1 over
# a group's completions (a per-process call counter: G is even and a worker scores one group's rows
# in a row), so whether a group is filtered is known from its example alone.
DS_TASK = '''
import itertools
from nanogrpo.tasks import Task, load_task
_calls = itertools.count()
def flat(ex):
    return ex.get("i", 1) % 2 == 0
def make(data=None, seed=0):
    base = load_task("arithmetic", seed=seed)
    train = [dict(ex, i=i) for i, ex in enumerate(base.train[:12])]
    def score(text, ex):
        r = 0.0 if flat(ex) else float(next(_calls) % 2)
        return {"total": r, "format": 0.0, "answer": r}
    return Task("ds", train, base.test[:4], base.messages, score, "", 4)
'''
B, F, SEED, N_TRAIN = 2, 2.0, 12, 12


def simulate(step: int) -> tuple[int, int]:
    """-> (groups step `step` (0-based) trains on, prompts issued for it), by the rule alone."""
    budget = int((F - 1) * B)
    flat = [launch.example_index(step * B + j, N_TRAIN, SEED) % 2 == 0 for j in range(B)]
    used = 0
    while used < min(sum(flat), budget):
        flat.append(launch.example_index(step * budget + used, N_TRAIN, SEED + launch.EXTRA_STREAM_SEED) % 2 == 0)
        used += 1
    return len(flat) - sum(flat), B + used


def run_launch(args, tmp_path):
    (tmp_path / "ds_task.py").write_text(DS_TASK)
    # RAY_ADDRESS=local: a cluster someone started with `ray start` on this machine is not joined.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_run_with_dynamic_sampling_trains_full_or_logged_short_steps_and_resumes(tmp_path):
    """The real entry point with --dynamic-sampling, cut after 3 steps and resumed to 6 (k = 0).
    Guards against a step that trains on a group without spread, a shortfall that is not logged or
    not bounded by F x B prompts, an empty step (every prompt filtered) that stalls or crashes the
    run, accounting that no longer balances, filtered counts lost at the resume, and a resume that
    issues other extra prompts than the uninterrupted rule does."""
    expect = [simulate(s) for s in range(6)]
    assert {g for g, _ in expect} == {0, 1, 2}  # this seed's data gives full, short and empty steps
    run = tmp_path / "run"
    common = ["--task", "ds_task:make", "--prompts-per-step", str(B), "--group-size", "4", "--sft-steps", "0",
              "--dynamic-sampling", "true", "--max-resample-factor", str(F), "--max-staleness", "0",
              "--eval-every", "0", "--save-every", "0", "--seed", str(SEED), "--quiet", "true", "--dtype", "fp32",
              "--sync-timeout", "60"]
    run_launch(["--out", str(run), "--steps", "3", *common], tmp_path)
    run_launch(["--resume", str(run), "--steps", "6"], tmp_path)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["groups"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for r, (groups, issued) in zip(rows, expect):
        assert (int(r["groups"]), int(r["shortfall"]), int(r["prompts_issued"])) == (groups, B - groups, issued), r
        assert issued <= F * B and (groups == B or issued == F * B)  # short only once the budget is spent
        if groups:
            assert float(r["zero_var_frac"]) == 0.0  # every trained group has spread
    summary = json.loads((run / "summary.json").read_text())
    issued_all = sum(i for _, i in expect)
    assert summary["filtered"] == issued_all - sum(g for g, _ in expect) == int(rows[-1]["buffer_filtered"])
    assert summary["consumed"] == sum(g for g, _ in expect) and summary["shortfall"] == sum(B - g for g, _ in expect)
    assert balanced(summary) and summary["produced"] == issued_all
    log = pq.read_table(run / "episodes", columns=["group_id", "step"])
    assert log.num_rows == summary["produced"] * 4
    per_step = {}
    for gid, s in set(zip(log.column("group_id").to_pylist(), log.column("step").to_pylist())):
        per_step[s] = per_step.get(s, 0) + 1
    assert [per_step[s] for s in range(6)] == [i for _, i in expect]
