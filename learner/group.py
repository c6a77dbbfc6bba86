"""LearnerGroup: the learner as the driver sees it, one rank or N data-parallel ranks.

The driver calls the same methods whatever `--num-learners` is (`train_step`, `publish`, `save`,
`state`, `sft`); `actor` is rank 0, the one that publishes weights and writes checkpoints. With
N > 1 the ranks join one torch.distributed group (nanogrpo.dist: gloo on CPU, NCCL on GPUs, every
call with --sync-timeout) right after they start: each step every rank gets the step's whole table,
trains its token-balanced share of the groups, the gradients are summed across ranks and each rank
steps its shard of the offloaded optimizer (LearnerCore.join_dp).

Any rank dying is the learner dying: the survivors' next collective fails within the timeout,
`alive` sees a rank gone, and `recover` kills every rank and builds the group again from the last
complete checkpoint (model, unsharded optimizer state, RNG, version); the driver then rewinds to
that checkpoint's step. Ray does not restart a rank itself (max_restarts=0): a restarted actor
would rerun its constructor with the arguments of the first start, that is from the initial
weights, and outside the group the other ranks are in.
"""
from __future__ import annotations

from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError


class LearnerGroup:
    def __init__(self, cfg, model_dir: str, scheduling: list, model_files: list, colocated_threads: int):
        """scheduling: one Ray scheduling strategy per rank (its placement bundle)."""
        self.cfg, self.model_dir, self.scheduling = cfg, model_dir, scheduling
        self.model_files, self.colocated = model_files, colocated_threads
        self.restarts = 0
        self.ranks: list = []
        self.others: dict = {}  # rank 0's train_step ref -> the other ranks' refs of that step

    @property
    def actor(self):
        """Rank 0: publishes the weights, writes the checkpoints, broadcasts to the workers."""
        return self.ranks[0]

    def start(self, resume_from: str | None) -> dict:
        """Create the ranks (from `resume_from`, a checkpoint directory, or the initial model) and,
        with several, their group. -> rank 0's node info, with every rank's under "ranks"."""
        from learner.learner import Learner
        self.ranks = [Learner.options(num_cpus=1, num_gpus=self.cfg.learner_gpus, scheduling_strategy=s,
                                      max_restarts=0).remote(self.cfg, self.model_dir, self.cfg.learner_threads,
                                                             resume_from, self.model_files, self.colocated)
                      for s in self.scheduling]
        self.others = {}
        infos = get([r.node_info.remote() for r in self.ranks], 2 * self.cfg.sync_timeout,
                    f"the {len(self.ranks)} learner rank(s) to start")
        if len(self.ranks) > 1:
            port = get(self.actor.free_port.remote(), self.cfg.sync_timeout, "learner rank 0's port")
            n, t = len(self.ranks), self.cfg.sync_timeout
            get([r.join_dp.remote(infos[0]["ip"], port, i, n, t) for i, r in enumerate(self.ranks)], t + 10,
                "the learner ranks to join their data-parallel group")
        return {**infos[0], "ranks": infos}

    def recover(self, ckpt: Path | None) -> dict:
        """A new group of ranks from checkpoint `ckpt` (None: from the initial model). -> node info."""
        if self.restarts >= self.cfg.max_learner_restarts:
            where = f"the last checkpoint, {ckpt}, is intact" if ckpt else "there is no checkpoint yet"
            raise LearnerLost(f"the learner died again after {self.restarts} restarts (--max-learner-restarts "
                              f"{self.cfg.max_learner_restarts}); stopping: {where}")
        self.restarts += 1
        for r in self.ranks:  # the survivors too: their group is broken, and one may be stuck in it
            try:
                ray.kill(r, no_restart=True)
            except (RayActorError, ValueError):
                pass
        return self.start(str(ckpt) if ckpt else None)

    def alive(self) -> bool:
        """Every rank answers (a rank that answers with an error is alive)."""
        for r in self.ranks:
            try:
                ray.get(r.state.remote(), timeout=self.cfg.sync_timeout)
            except RayTaskError:
                pass
            except (RayActorError, GetTimeoutError):
                return False
        return True

    # ------------------------------------------------------------------ the driver's calls
    def train_step(self, take_ref):
        """Every rank gets the step's table (its share is picked in the rank). -> rank 0's ref of
        (metrics, weights); the metrics already cover all ranks."""
        refs = [r.train_step.remote(take_ref) for r in self.ranks]
        self.others[refs[0]] = refs[1:]
        return refs[0]

    def watch(self, ref) -> list:
        """What to wait on for step `ref` (rank 0's): it and the other ranks' refs still running, so
        a rank that dies mid-step is noticed when it dies, not when rank 0's collective times out."""
        return [ref] + self.others.get(ref, [])

    def settled(self, ready, ref) -> bool:
        """`ready`, one of watch(ref), finished. -> True when it is rank 0's (the step is done);
        another rank's is checked (its failure raises here) and no longer watched."""
        if ready == ref:
            return True
        ray.get(ready)
        self.others[ref] = [r for r in self.others.get(ref, []) if r != ready]
        return False

    def result(self, ref, timeout: float, what: str):
        """Rank 0's (metrics, weights) of a finished step, once the other ranks' results of that
        step came back too (a rank's failure surfaces here, not at a later step)."""
        out = get(ref, timeout, what)
        get(self.others.pop(ref, []), timeout, what + " on the other learner ranks")
        return out

    def forget_steps(self):
        """The queued steps were cancelled (a rewind): their other ranks' refs are not waited for."""
        self.others = {}

    def call(self, method: str, *args, what: str, timeout: float | None = None):
        """A call on rank 0 alone."""
        return get(getattr(self.actor, method).remote(*args), timeout or self.cfg.sync_timeout, what)

    def call_all(self, method: str, *args, what: str, timeout: float | None = None) -> list:
        """A call every rank makes together (a collective inside). -> the ranks' results."""
        return get([getattr(r, method).remote(*args) for r in self.ranks], timeout or self.cfg.sync_timeout, what)

    def sft(self, *args, what: str, timeout: float) -> dict:
        """The supervised warm start on rank 0; the other ranks then take its weights."""
        out = self.call("sft", *args, what=what, timeout=timeout)
        if len(self.ranks) > 1:
            self.call_all("copy_weights_from_rank0", what="the learner ranks to take rank 0's warm-started weights")
        return out

    def publish(self) -> list:
        return self.call("publish", what="the learner to publish its weights")

    def state(self) -> dict:
        return self.call("state", what="the learner's state")

    def save(self, path: Path, run_state: dict) -> str:
        """Every rank takes part (the sharded optimizer state is gathered on rank 0, which writes)."""
        return self.call_all("save", str(path), run_state, what=f"the learner to write checkpoint {path}",
                             timeout=4 * self.cfg.sync_timeout)[0]


class LearnerLost(RuntimeError):
    """The learner died more often than --max-learner-restarts allows."""


def get(refs, timeout: float, what: str):
    """ray.get with a deadline whose error names what was being waited for."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (raise --sync-timeout if the "
                           "work is legitimately slow)") from None
