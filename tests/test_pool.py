"""RolloutPool against stand-in workers that die on cue: every call is re-issued, every death is
counted once, and an eval share of a dead worker still comes back (no model, so it is fast)."""
import os
import time
from pathlib import Path

import pytest
import ray

from actors.pool import RolloutPool


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(max_restarts=-1, max_task_retries=0)
class StandIn:
    """The RolloutWorker call surface; dies (os._exit, as a SIGKILL would) when `die-<i>-<method>`
    exists in `cue_dir`, removing it first so the restarted process goes on."""

    def __init__(self, i: int, cue_dir: str):
        self.i, self.cue = i, Path(cue_dir)

    def _maybe_die(self, method):
        f = self.cue / f"die-{self.i}-{method}"
        if f.exists():
            f.unlink()
            os._exit(1)

    def ready(self):
        self._maybe_die("ready")
        return {"pid": os.getpid(), "node": "n", "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    def rollout(self, work, weights, version):
        self._maybe_die("rollout")
        return {"pid": os.getpid(), "gen_seconds": 0.0, "sync_seconds": 0.0, "tokens": len(work),
                "groups": len(work), "ids": [w[0] for w in work]}

    def evaluate(self, indices, weights, version):
        self._maybe_die("evaluate")
        time.sleep(0.05)
        return {"pid": os.getpid(), "scores": [float(i) for i in indices]}



def make_pool(tmp_path, n=2):
    logs = []
    pool = RolloutPool([StandIn.remote(i, str(tmp_path)) for i in range(n)], 30.0, logs.append)
    return pool, logs


def test_eval_share_of_a_dead_worker_comes_back_once(local_ray, tmp_path):
    """Guards against evaluate()'s unsupervised ray.get: a worker dying inside its share ended the
    run. Every held-out example must be scored exactly once and the death counted once."""
    pool, logs = make_pool(tmp_path)
    pool.start()
    (tmp_path / "die-1-evaluate").touch()
    scores = pool.evaluate(20)
    assert sorted(scores) == [float(i) for i in range(20)]
    assert pool.restarts == 1 and sum("died" in m for m in logs) == 1, logs


def test_rollouts_reissued_and_counted_once(local_ray, tmp_path):
    """Guards against lost or doubled rollout work when a worker dies mid-call: every submitted
    item comes back once, and one death is one restart however many calls it failed."""
    pool, logs = make_pool(tmp_path)
    pool.start()
    (tmp_path / "die-0-rollout").touch()
    items = [[(k, 0, k)] for k in range(8)]
    for w in items:
        pool.submit(w)
    jobs = list(pool.queue)
    pool.wait_jobs(jobs, "rollouts")
    assert sorted(i for j in jobs for i in j.result["ids"]) == list(range(8))
    assert pool.take_window().groups == 8
    assert pool.restarts == 1, logs


def test_death_while_idle_and_at_start_up_counted(local_ray, tmp_path):
    """Guards against a restart nobody counts: a worker that dies at start-up (its ready call
    fails) or between calls (noticed by its new pid) is counted, once each."""
    (tmp_path / "die-0-ready").touch()
    pool, logs = make_pool(tmp_path)
    info = pool.start()
    assert pool.restarts == 1 and len(info) == 2, logs
    old = pool.slots[1].pid
    os.kill(old, 9)
    time.sleep(1.0)
    jobs = pool.on_every_worker("ready", "a call pinned to each worker")  # the dead one answers once restarted
    assert all(j.error is None for j in jobs)
    assert pool.restarts == 2, logs
    assert jobs[1].result["pid"] == pool.slots[1].pid != old
    pool.on_every_worker("ready", "again")
    assert pool.restarts == 2  # the same death is not counted again


def test_dispatch_keeps_calls_queued_per_worker(local_ray, tmp_path):
    """Guards against a worker idling between calls: up to `depth` calls are in flight per worker."""
    pool, _ = make_pool(tmp_path)
    pool.start()
    for k in range(10):
        pool.submit([(k, 0, k)])
    pool.dispatch()
    per_worker = [s.calls for s in pool.slots]
    assert per_worker == [2, 2] and len(pool.queue) == 6
    pool.wait_jobs([j for _, j, _ in pool.calls.values()] + list(pool.queue), "rollouts")
