"""Weight broadcast from the learner to the rollout workers, as the driver sees it.

`ObjectStoreSync` (default): the learner `ray.put`s one packed object per version (see
nanogrpo/weights.py) and every rollout call carries the reference; a worker loads it once, between
generation batches, when the version is newer than its own.

`CollectiveSync`: a torch.distributed group (NCCL on GPUs, gloo on CPU) with the learner as rank 0.
The driver starts the send and every receive together and waits with a deadline; the group's own
timeout makes a peer that never answers raise on the other ranks instead of hanging them.
"""
from __future__ import annotations

import socket

import ray


class ObjectStoreSync:
    mode = "object-store"

    def __init__(self, learner, workers):
        self.learner = learner

    def ref_for(self, weights: list) -> list:
        return weights  # the [ObjectRef] returned by Learner.train_step / publish

    def after_step(self, workers, timeout_s: float) -> float:
        return 0.0  # workers pull the new version with their next rollout call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class CollectiveSync:
    mode = "collective"

    def __init__(self, learner, workers, timeout_s: float):
        addr = ray.get(learner.node_info.remote(), timeout=timeout_s)["ip"]
        port = ray.get(learner.free_port.remote(), timeout=timeout_s)
        world = len(workers) + 1
        refs = [learner.join_group.remote(addr, port, world, timeout_s)]
        refs += [w.join_group.remote(addr, port, i + 1, world, timeout_s) for i, w in enumerate(workers)]
        ray.get(refs, timeout=timeout_s + 10)
        self.learner = learner

    def ref_for(self, weights: list) -> list:
        return [None]  # workers already hold the broadcast version

    def after_step(self, workers, timeout_s: float) -> float:
        """Send the learner's weights to every worker. The caller drains in-flight rollouts first
        (a worker busy generating cannot receive). -> seconds."""
        import time
        t0 = time.perf_counter()
        refs = [self.learner.broadcast.remote()] + [w.receive.remote() for w in workers]
        versions = ray.get(refs, timeout=timeout_s + 10)
        if len(set(versions)) != 1:
            raise RuntimeError(f"collective weight sync delivered mixed versions {versions}")
        return time.perf_counter() - t0
