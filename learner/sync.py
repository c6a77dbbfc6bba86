"""Weight sync: how a new policy version reaches the rollout workers, behind one interface.

The driver calls `sync.start(pool, learner)` once, `sync.after_step(pool, learner, weights, version)`
after every learner step (and after a warm start or a recovery), and reads `sync.queue_ahead` to
know whether the next learner step may be queued while the weights go out. It never asks which
strategy it holds.

`ObjectStoreSync` (default): the learner `ray.put`s one packed object per version (see
nanogrpo/weights.py) and every rollout call carries the reference; a worker loads it once, between
generation batches, when the version is newer than its own.

`CollectiveSync`: a torch.distributed group (NCCL on GPUs, gloo on CPU) with the learner as rank 0.
The rollouts in flight land first (a worker busy generating cannot receive), then the send and every
receive start together through the pool. A worker that dies mid-broadcast makes the others' receive
fail within the group's timeout; the group is then rebuilt with the workers there are (the
restarted one included) and the broadcast repeated. Rollout calls still carry the published
reference, so a restarted worker loads the current version before it generates.
"""
from __future__ import annotations

import socket
import time

import ray
from ray.exceptions import RayError

GROUP_TRIES = 3  # broadcasts attempted (rebuilding the group between them) before the run stops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ObjectStoreSync:
    queue_ahead = True  # the learner is not needed to deliver weights: its next step may be queued

    def start(self, pool, learner):
        pass

    def after_step(self, pool, learner, weights: list, version: int) -> float:
        pool.set_weights(weights, version)  # workers pull it with their next call
        return 0.0


class CollectiveSync:
    queue_ahead = False  # the broadcast needs the learner free, so the next step is queued after it

    def __init__(self, timeout_s: float, log):
        self.timeout, self.log = timeout_s, log
        self.pids: list | None = None  # worker processes in the current group

    def start(self, pool, learner):
        self._build(pool, learner)

    def _build(self, pool, learner):
        addr = ray.get(learner.node_info.remote(), timeout=self.timeout)["ip"]
        port = ray.get(learner.free_port.remote(), timeout=self.timeout)
        world = len(pool.live()) + 1
        lref = learner.join_group.remote(addr, port, world, self.timeout)
        jobs = pool.on_every_worker("join_group", "the rollout workers to join the weight-sync group",
                                    args=lambda rank, w: (addr, port, rank + 1, world, self.timeout))
        ray.get(lref, timeout=self.timeout + 10)
        bad = [j for j in jobs if j.error is not None]
        if bad:
            raise RuntimeError(f"--weight-sync collective: a worker could not join the group: {bad[0].error}")
        self.pids = pool.pids()

    def after_step(self, pool, learner, weights: list, version: int) -> float:
        t0 = time.perf_counter()
        pool.set_weights(weights, version)  # a worker restarted later loads this before it generates
        pool.drain("in-flight rollouts to land before the weight broadcast")
        for attempt in range(GROUP_TRIES):
            if pool.pids() != self.pids:  # a worker restarted since the group was built
                self.log("weight-sync group: rebuilding it for a restarted rollout worker")
                self._build(pool, learner)
            err = self._broadcast(pool, learner, version)
            if err is None:
                return time.perf_counter() - t0
            self.log(f"weight broadcast failed ({err}); rebuilding the group (attempt {attempt + 1}/{GROUP_TRIES})")
            self._build(pool, learner)
        raise RuntimeError(f"--weight-sync collective: the broadcast failed {GROUP_TRIES} times; stopping")

    def _broadcast(self, pool, learner, version: int) -> str | None:
        jobs = pool.on_every_worker("receive", "", start_only=True)
        lref = learner.broadcast.remote()
        pool.wait_jobs(jobs, "the rollout workers to receive the weight broadcast", raise_errors=False)
        try:
            sent = ray.get(lref, timeout=self.timeout + 10)
        except RayError as e:
            return f"learner: {type(e).__name__}"
        bad = [j for j in jobs if j.error is not None]
        if bad:
            return f"a worker's receive: {type(bad[0].error).__name__}"
        got = {j.result["version"] for j in jobs}
        if got != {sent} or sent != version:
            raise RuntimeError(f"collective weight sync delivered versions {sorted(got)}, learner sent {sent}, "
                               f"expected {version}")
        return None
