"""RolloutPool: the one place that calls rollout workers.

Every call to a worker (start-up, rollouts, evaluation shares, the collective receive) is a `Job`
that goes through here, so a worker that dies at any moment is handled the same way: Ray restarts
the process (the actors have max_restarts=-1), the pool counts the death once, and the job goes
out again: a rollout or an eval share to whichever worker is free and answering, a job pinned to
one worker (start-up, receive) to that worker once it is back. A call that runs longer than the
timeout is a stall: the worker is killed so Ray restarts it. A worker that died and does not come
back within the timeout (its node is gone and its placement bundle found no other home) is retired,
and the run goes on with the workers it still has.

Up to `depth` calls are queued on each worker, so a worker goes straight from one call to the
next instead of waiting for a round trip through the driver.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

PROGRESS_EVERY_S = 30.0  # a fan-out (an eval of a large model) longer than this says where it is
RETRY_DELAY_S = 1.0  # a worker that just failed a call is restarting: do not spin on it
# A call is a stall after this many timeouts: an eval share is larger than a rollout call, and a
# collective call has the group's own timeout, which should fire first.
STALL_AFTER = {"evaluate": 4.0, "receive": 2.0, "join_group": 2.0}


@dataclass
class Job:
    method: str                # RolloutWorker method
    args: tuple = ()           # its first arguments (work items, eval indices, group address)
    pin: int | None = None     # run on this worker only (start-up, receive)
    with_weights: bool = True  # pass (weights, version) after the payload
    result: Any = None
    error: BaseException | None = None  # the call raised (not a worker death)
    done: bool = False
    attempts: int = 0


@dataclass
class Slot:
    handle: Any
    pid: int | None = None       # the process that last answered; a new pid means Ray restarted it
    down_since: float | None = None  # a call failed and the new process has not answered yet
    retry_at: float = 0.0
    retired: bool = False
    calls: int = 0
    node: str | None = None


@dataclass
class Window:
    """Rollout totals since the driver last read them (one learner step)."""
    gen: float = 0.0
    sync: float = 0.0
    tokens: int = 0
    groups: int = 0
    t0: float = field(default_factory=time.perf_counter)


class RolloutPool:
    def __init__(self, handles: list, timeout_s: float, log: Callable[[str], None], depth: int = 2,
                 max_attempts: int = 5):
        self.slots = [Slot(h) for h in handles]
        self.timeout, self.log, self.depth, self.max_attempts = timeout_s, log, depth, max_attempts
        self.queue: collections.deque[Job] = collections.deque()
        self.calls: dict[Any, tuple[int, Job, float]] = {}  # ref -> (worker, job, sent at)
        self.sent_to: dict[Any, int | None] = {}  # ref -> the worker's pid as last known when it was sent
        self.stalled: set = set()  # refs whose worker was killed for stalling
        self.restarts = 0
        self.weights: list = [None]
        self.version = -1
        self.window = Window()

    # ------------------------------------------------------------------ the driver's calls
    def start(self) -> list[dict]:
        """Wait until every worker has started (a death during start-up is restarted and counted)."""
        jobs = [Job("ready", pin=i, with_weights=False) for i in range(len(self.slots))]
        self.run_jobs(jobs, "the rollout workers to start")
        for slot, job in zip(self.slots, jobs):
            slot.node = job.result["node"]
        return [j.result for j in jobs]

    def set_weights(self, weights: list, version: int):
        self.weights, self.version = weights, version

    def submit(self, work: list, front: bool = False):
        """Queue one rollout call's work items: (group_id, step, example_index) per prompt."""
        job = Job("rollout", (work,))
        self.queue.appendleft(job) if front else self.queue.append(job)

    def evaluate(self, n: int) -> list[float]:
        """Greedy pass@1 on held-out examples 0..n-1, in one share per live worker."""
        live = max(1, len(self.live()))
        jobs = [Job("evaluate", (list(range(i, n, live)),)) for i in range(min(live, n))]
        self.run_jobs(jobs, "held-out evaluation on the rollout workers", front=True)
        return [x for j in jobs for x in j.result["scores"]]

    def on_every_worker(self, method: str, what: str, args: Callable[[int, int], tuple] = lambda rank, w: (),
                        start_only: bool = False) -> list[Job]:
        """One call pinned to each live worker, args(rank among the live, worker); failures come back
        in job.error, not raised. start_only: send and return without waiting."""
        jobs = [Job(method, args(r, w), pin=w, with_weights=False) for r, w in enumerate(self.live())]
        if start_only:
            self.queue.extendleft(reversed(jobs))
            self.dispatch()
            return jobs
        self.run_jobs(jobs, what, front=True, raise_errors=False)
        return jobs

    def wait(self, others: list, timeout: float) -> list:
        """Dispatch, then wait for one call to finish: a rollout is handled here; -> the refs among
        `others` (learner calls) that are ready, possibly none."""
        self.dispatch()
        refs = list(self.calls) + list(others)
        if not refs:  # nothing in flight (work waits for a restarting worker): do not spin
            time.sleep(min(timeout, 0.1))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            self.check_stalls()
            return []
        ref = ready[0]
        if ref in self.calls:
            self._finish(ref)
            return []
        return [ref]

    def drain(self, what: str = "in-flight rollouts to land"):
        """Wait for every rollout call in flight (the queue is kept)."""
        deadline = time.perf_counter() + 2 * self.timeout
        while any(j.method == "rollout" for _, j, _ in self.calls.values()):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"timed out after {2 * self.timeout:.0f}s waiting for {what} "
                                   "(raise --sync-timeout if the work is legitimately slow)")
            self.wait([], timeout=min(1.0, self.timeout))

    def clear_rollouts(self) -> int:
        """Drop the queued rollout work (it will be submitted again). -> jobs dropped."""
        kept = collections.deque(j for j in self.queue if j.method != "rollout")
        n = len(self.queue) - len(kept)
        self.queue = kept
        return n

    def take_window(self) -> Window:
        w, self.window = self.window, Window()
        return w

    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if not s.retired]

    def pids(self) -> list[int | None]:
        return [s.pid for s in self.slots]

    def busy(self) -> int:
        return len(self.calls)

    def rollouts_pending(self) -> int:
        """Rollout calls queued or in flight."""
        return sum(j.method == "rollout" for j in [*self.queue, *(j for _, j, _ in self.calls.values())])

    # ------------------------------------------------------------------ fan-out
    def run_jobs(self, jobs: list[Job], what: str, front: bool = False, raise_errors: bool = True):
        """Send `jobs`, keep the pool going until all are done (deaths re-issue them)."""
        (self.queue.extendleft(reversed(jobs)) if front else self.queue.extend(jobs))
        self.wait_jobs(jobs, what, raise_errors)

    def wait_jobs(self, jobs: list[Job], what: str, raise_errors: bool = True):
        deadline, last = time.perf_counter() + 4 * self.timeout, len([j for j in jobs if j.done])
        t0 = shown = time.perf_counter()
        while not all(j.done for j in jobs):
            self.wait([], timeout=min(1.0, self.timeout))
            n_done = len([j for j in jobs if j.done])
            if what and time.perf_counter() - shown > PROGRESS_EVERY_S:  # a long eval is not silent
                shown = time.perf_counter()
                self.log(f"... waiting for {what}: {n_done}/{len(jobs)} calls done, {shown - t0:.0f}s")
            if n_done > last:
                deadline, last = time.perf_counter() + 4 * self.timeout, n_done
            if time.perf_counter() > deadline:
                raise TimeoutError(f"timed out after {4 * self.timeout:.0f}s waiting for {what} "
                                   "(raise --sync-timeout if the work is legitimately slow)")
        bad = [j for j in jobs if j.error is not None]
        if raise_errors and bad:
            raise RuntimeError(f"{what}: a worker's {bad[0].method} call failed: {bad[0].error}")

    # ------------------------------------------------------------------ internals
    def dispatch(self):
        """Send queued jobs to workers that are answering and have room, oldest first."""
        now = time.perf_counter()
        if not self.live():
            raise RuntimeError("every rollout worker is lost (their nodes are gone?); the run cannot go on")
        for job in list(self.queue):
            w = self._pick(job, now)
            if w is None:
                continue
            self.queue.remove(job)
            slot = self.slots[w]
            args = list(job.args)
            if job.with_weights:
                args += [self.weights, self.version]
            ref = getattr(slot.handle, job.method).remote(*args)
            slot.calls += 1
            job.attempts += 1
            self.calls[ref] = (w, job, time.perf_counter())
            self.sent_to[ref] = slot.pid

    def _pick(self, job: Job, now: float) -> int | None:
        if job.pin is not None:
            s = self.slots[job.pin]
            if s.retired:
                job.error, job.done = RuntimeError(f"rollout worker {job.pin} is lost"), True
                self.queue.remove(job)
                return None
            return job.pin if s.retry_at <= now and s.calls < self.depth else None
        free = [i for i in self.live() if self.slots[i].retry_at <= now and self.slots[i].calls < self.depth]
        # A worker that answers beats one that is restarting (an eval share of a dead worker goes elsewhere).
        free.sort(key=lambda i: (self.slots[i].down_since is not None, self.slots[i].calls, i))
        return free[0] if free else None

    def _finish(self, ref):
        w, job, _ = self.calls.pop(ref)
        sent_to = self.sent_to.pop(ref, None)
        slot = self.slots[w]
        slot.calls -= 1
        self.stalled.discard(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as e:  # the method raised (checked first: it may wrap a RayActorError)
            self._failed_call(w, job, e)
            return
        except RayActorError as e:
            self._died(w, job, e, sent_to)
            return
        self._answered(w, result)
        job.result, job.done = result, True
        if job.method == "rollout":
            win = self.window
            win.gen, win.sync = win.gen + result["gen_seconds"], win.sync + result["sync_seconds"]
            win.tokens, win.groups = win.tokens + result["tokens"], win.groups + result["groups"]

    def _answered(self, w: int, result: dict):
        slot = self.slots[w]
        if not isinstance(result, dict) or "pid" not in result:
            return  # says nothing about which process answered
        pid = result["pid"]
        restarted = (slot.pid is not None and pid != slot.pid) or (slot.pid is None and result.get("restarted"))
        if restarted and slot.down_since is None:  # it died between calls: no failed call told us
            self._count(w, "was restarted")
        slot.pid, slot.down_since = pid, None

    def _died(self, w: int, job: Job, e: BaseException, sent_to: int | None = None):
        slot = self.slots[w]
        # A call to a process that a newer one has already replaced reports a death that was
        # counted then (its failure can arrive after the new process's first answer).
        stale = sent_to is not None and slot.pid is not None and sent_to != slot.pid
        if slot.down_since is None and not stale:
            slot.down_since = time.perf_counter()
            self._count(w, f"died ({type(e).__name__}) in {job.method}")
        slot.retry_at = time.perf_counter() + RETRY_DELAY_S
        self._again(job, e)

    def _failed_call(self, w: int, job: Job, e: BaseException):
        if job.method in ("rollout", "evaluate"):
            self.log(f"rollout worker {w}: {job.method} failed ({type(e).__name__}); re-issuing it")
            self.slots[w].retry_at = time.perf_counter() + RETRY_DELAY_S
            self._again(job, e)
        else:
            job.error, job.done = e, True

    def _again(self, job: Job, e: BaseException):
        if job.method == "receive":  # a broken collective is rebuilt by the sync, not retried here
            job.error, job.done = e, True
        elif job.attempts >= self.max_attempts:
            raise RuntimeError(f"a rollout worker {job.method} call failed {job.attempts} times; last: {e}")
        else:
            self.queue.appendleft(job)

    def _count(self, w: int, how: str):
        self.restarts += 1
        self.log(f"rollout worker {w} {how}; restarts so far: {self.restarts}")

    def check_stalls(self):
        """Kill a worker whose call outlived the timeout (Ray restarts it and the call is re-issued);
        retire one that died and never came back, and go on without it."""
        now = time.perf_counter()
        for ref, (w, job, sent) in list(self.calls.items()):
            slot = self.slots[w]
            if now - sent <= self.timeout * STALL_AFTER.get(job.method, 1.0) or ref in self.stalled:
                continue
            if slot.down_since is not None and now - slot.down_since > self.timeout:
                self._retire(w, now - slot.down_since)
            else:
                self.log(f"rollout worker {w} stalled for {now - sent:.0f}s in {job.method}; restarting it")
                self.stalled.add(ref)
                ray.kill(slot.handle, no_restart=False)

    def _retire(self, w: int, silent_s: float):
        slot = self.slots[w]
        slot.retired = True
        lost = RuntimeError(f"rollout worker {w} is lost")
        for ref, (ww, job, _) in list(self.calls.items()):
            if ww != w:
                continue
            del self.calls[ref]
            self.sent_to.pop(ref, None)
            if job.pin is None:
                job.attempts -= 1  # not the job's fault: it goes to another worker
                self._again(job, lost)
            else:
                job.error, job.done = lost, True
        slot.calls = 0
        self.log(f"rollout worker {w} has not come back for {silent_s:.0f}s since it died (node lost?); "
                 f"continuing with {len(self.live())} rollout workers")
