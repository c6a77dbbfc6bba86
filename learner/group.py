"""LearnerGroup: the learner as the driver sees it.

Today one rank: a `Learner` actor on the placement group's first bundle. The driver calls the
methods it always called (`train_step`, `publish`, `save`, `state`, `sft`) through here, so that
1..N ranks can later live behind the same calls. When the learner process dies, `recover` builds a
new one from the last complete checkpoint (model, optimizer, RNG, version); the driver then rewinds
to that checkpoint's step. Ray does not restart the learner itself (max_restarts=0): a restarted
actor would rerun its constructor with the arguments of the first start, that is from the initial
weights, not from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError


class LearnerGroup:
    def __init__(self, cfg, model_dir: str, scheduling, model_files: list, colocated_threads: int):
        self.cfg, self.model_dir, self.scheduling = cfg, model_dir, scheduling
        self.model_files, self.colocated = model_files, colocated_threads
        self.restarts = 0
        self.actor = None

    def start(self, resume_from: str | None) -> dict:
        """Create the learner (from `resume_from`, a checkpoint directory, or the initial model)."""
        from learner.learner import Learner
        self.actor = Learner.options(num_cpus=1, num_gpus=self.cfg.learner_gpus, scheduling_strategy=self.scheduling,
                                     max_restarts=0).remote(self.cfg, self.model_dir, self.cfg.learner_threads,
                                                            resume_from, self.model_files, self.colocated)
        return self.call("node_info", what="the learner to start", timeout=2 * self.cfg.sync_timeout)

    def recover(self, ckpt: Path | None) -> dict:
        """A new learner from checkpoint `ckpt` (None: from the initial model). -> its node info."""
        if self.restarts >= self.cfg.max_learner_restarts:
            where = f"the last checkpoint, {ckpt}, is intact" if ckpt else "there is no checkpoint yet"
            raise LearnerLost(f"the learner died again after {self.restarts} restarts (--max-learner-restarts "
                              f"{self.cfg.max_learner_restarts}); stopping: {where}")
        self.restarts += 1
        try:
            ray.kill(self.actor, no_restart=True)  # a learner that stopped answering but still runs
        except (RayActorError, ValueError):
            pass
        return self.start(str(ckpt) if ckpt else None)

    def alive(self) -> bool:
        try:
            ray.get(self.actor.state.remote(), timeout=self.cfg.sync_timeout)
            return True
        except RayTaskError:
            return True  # it answered (with an error)
        except (RayActorError, GetTimeoutError):
            return False

    # ------------------------------------------------------------------ today's single-learner calls
    def remote(self, method: str, *args):
        return getattr(self.actor, method).remote(*args)

    def train_step(self, take_ref):
        return self.actor.train_step.remote(take_ref)

    def call(self, method: str, *args, what: str, timeout: float | None = None):
        return get(self.remote(method, *args), timeout or self.cfg.sync_timeout, what)

    def publish(self) -> list:
        return self.call("publish", what="the learner to publish its weights")

    def state(self) -> dict:
        return self.call("state", what="the learner's state")

    def save(self, path: Path, run_state: dict) -> str:
        return self.call("save", str(path), run_state, what=f"the learner to write checkpoint {path}",
                         timeout=4 * self.cfg.sync_timeout)


class LearnerLost(RuntimeError):
    """The learner died more often than --max-learner-restarts allows."""


def get(refs, timeout: float, what: str):
    """ray.get with a deadline whose error names what was being waited for."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (raise --sync-timeout if the "
                           "work is legitimately slow)") from None
