"""--num-learners through the driver: N data-parallel learner ranks behind the same loop.

The maths of one data-parallel step (N ranks vs one, every loss aggregation, the sharded optimizer
state and its checkpoint round trip) is tested in-process in test_dp_learner.py; here the ranks are
Ray actors in a real run: a 20-step run with 2 ranks against the same run with 1, a checkpoint
written by 2 ranks resumed by 1, and a rank killed mid-run.
"""
import csv
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

import launch
from nanogrpo.runconfig import RunConfig

COMPARED = ("reward_mean", "success_rate", "format_rate", "response_len", "loss", "pg_loss", "entropy",
            "grad_norm", "ratio_max", "ratio_min", "zero_var_frac", "adv_std")


def cfg_for(tmp_path, name, **kw) -> RunConfig:
    base = dict(steps=20, prompts_per_step=8, group_size=4, sft_steps=30, eval_every=0, save_every=0,
                num_rollout_workers=1, num_test=8, max_staleness=0, dtype="fp32", quiet=True,
                out=str(tmp_path / name), sync_timeout=30.0, report_to="none")
    base.update(kw)
    return RunConfig(**base)


def rows(run_dir) -> list[dict]:
    try:
        return [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["reward_mean"]]
    except FileNotFoundError:
        return []


def final_weights(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(os.path.join(summary["checkpoint"], "model.safetensors"))


def test_two_learner_ranks_train_like_one_over_20_steps(tmp_path):
    """Guards against ranks that train on the wrong share (a group twice or not at all), gradients
    averaged instead of summed or not reduced at all, a rank whose weights drift from rank 0's (the
    warm start ran on rank 0 only; each rank steps only its shard), metrics of one rank's share
    only, and a checkpoint whose optimizer state does not resume: 2 ranks must give the 1-rank run's
    metrics row by row and its final weights, and a 2-rank checkpoint resumed by 1 rank goes on."""
    one = launch.run(cfg_for(tmp_path, "n1"), set())
    two = launch.run(cfg_for(tmp_path, "n2", num_learners=2, save_every=10), set())
    placed = json.loads((two / "placement.json").read_text())
    assert len(placed["learner"]) == 2 and len({r["pid"] for r in placed["learner"]}) == 2
    r1, r2 = rows(one), rows(two)
    assert [int(r["step"]) for r in r2] == list(range(1, 21))
    assert sum(float(r["grad_norm"]) > 0 for r in r1) >= 10, "nothing was trained"
    for key in COMPARED:
        a, b = np.array([float(r[key]) for r in r1]), np.array([float(r[key]) for r in r2])
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6), (key, a, b)
    # Weights: Adam turns rounding-level gradient differences on near-zero gradients into update
    # differences of up to ~lr, so the two runs' distance is measured against how far the last 10
    # GRPO steps moved the weights (measured: 5.6e-5 against 0.26).
    w1, w2 = final_weights(one), final_weights(two)
    w10 = load_file(two / "checkpoints" / "step-000010" / "model.safetensors")
    moved = torch.cat([(w2[k] - w10[k]).flatten() for k in w2]).norm()
    apart = torch.cat([(w1[k] - w2[k]).flatten() for k in w1]).norm()
    assert moved > 0 and apart < 1e-3 * moved, (float(apart), float(moved))
    # A checkpoint of the 2 ranks (sharded optimizer, gathered) resumed by one rank: same steps on.
    resumed = launch.run(cfg_for(tmp_path, "n2", steps=24, num_learners=1, resume=str(two)),
                         {"steps", "num_learners", "resume"})
    after = rows(resumed)
    assert [int(r["step"]) for r in after] == list(range(1, 25))
    assert all(np.isfinite(float(r["loss"])) for r in after[20:])


def test_a_killed_learner_rank_is_rebuilt_from_the_checkpoint(tmp_path):
    """Guards against a data-parallel rank's death hanging rank 0 in its collective, ending the
    run, or being restarted alone outside the group: every rank is rebuilt from the last
    checkpoint, the steps after it are redone, and the run finishes with its rows in order."""
    cfg = cfg_for(tmp_path, "kill", steps=10, save_every=3, num_learners=2, sft_steps=0, sync_timeout=20.0)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # in the main thread
    result = {}
    t = threading.Thread(target=lambda: result.update(run_dir=launch.run(cfg, set())), daemon=True)
    t.start()
    t0 = time.time()
    while len(rows(tmp_path / "kill")) < 4:
        assert time.time() - t0 < 240 and t.is_alive(), "the run did not get to step 4"
        time.sleep(0.1)
    placed = json.loads((tmp_path / "kill" / "placement.json").read_text())
    os.kill(placed["learner"][1]["pid"], signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive(), "the run hung after a learner rank was killed"
    summary = json.loads((result["run_dir"] / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["learner_restarts"] == 1
    assert [int(r["step"]) for r in rows(result["run_dir"])] == list(range(1, 11))
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"] + summary["lost"]


def test_more_learner_ranks_than_cpus_rejected_at_once(tmp_path):
    """Guards against a run that asks for more bundles than the cluster has waiting --sync-timeout
    for a placement that can never succeed, and then naming neither flag."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match="--num-rollout-workers: 3 learner rank"):
            launch.run(cfg_for(tmp_path, "big", num_learners=3, sync_timeout=600.0), set())
    finally:
        ray.shutdown()
