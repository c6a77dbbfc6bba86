"""nanogrpo driver: GRPO on a Ray cluster, from a 2-core laptop to `ray up cluster.yaml`.

`run()` reads top to bottom: the plan (config, task, model, tokenizer checked before anything
starts or any file is written) -> Ray, the run directory and the actors (rollout pool, learner
group, episode buffer) -> warm start and the step-0 eval -> the loop (dispatch rollouts, wait, on a
finished learner step: row, eval, checkpoint) -> the final checkpoint and the summary. Every worker
call goes through the pool (actors/pool.py), every learner call through the learner group
(learner/group.py), and weights reach the workers through one sync interface (learner/sync.py).
`python launch.py plot RUN_DIR` redraws a run's plots; `python launch.py export RUN_DIR --merged OUT`
writes a --lora-rank run's policy as a plain HF model.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REISSUE_OFFSET = 10**12  # added to a group id that is generated again, so ids stay unique
EXTRA_STREAM_SEED = 10**6  # --dynamic-sampling's extra prompts walk their own shuffled order (seed + this)
PROGRESS_EVERY_S = 30.0  # a step (or an eval) longer than this prints where it is
TINY_BUDGET = 64  # completion tokens that fit the built-in tiny model's tasks


def log(msg: str):
    print(msg, flush=True)


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite gradients); checkpoints already written stay."""


# ----------------------------------------------------------------------------- the plan (no side effects)
@dataclass(frozen=True)
class Plan:
    cfg: object           # RunConfig, not yet resolved against the cluster
    run_dir: Path
    task: object
    model_dir: str | None  # None: the built-in tiny model, written into the run dir once it exists
    ckpt: Path | None     # resume from this checkpoint
    state: dict           # its state.json ({} for a fresh run)


def make_plan(cfg, given: set[str]) -> Plan:
    """Everything that can be wrong with the inputs fails here, before Ray starts or a file is written."""
    from actors.rollout import prompt_ids
    from nanogrpo.checkpoint import latest_run_checkpoint
    from nanogrpo.runconfig import resume_config
    from nanogrpo.tasks import load_task
    from nanogrpo.tokenizer import Tokenizer

    cfg = resume_config(cfg, given) if cfg.resume else cfg
    cfg.validate()
    run_dir = Path(cfg.out or f"runs/{cfg.task.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt, state, model_dir = None, {}, (None if cfg.model == "tiny" else cfg.model)
    if cfg.resume:
        ckpt = latest_run_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
        state = json.loads((ckpt / "state.json").read_text())
        if cfg.steps <= int(state["step"]):
            raise ValueError(f"--steps: {run_dir} has already trained {state['step']} steps; to go on, give "
                             f"--steps above {state['step']} (got {cfg.steps})")
        model_dir = json.loads((run_dir / "run.json").read_text())["model_dir"]
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"--out: {run_dir} exists and is not empty; use --resume {run_dir} to continue it "
                              "or pick another directory (nothing there is overwritten)")
    task = load_task(cfg.task, cfg.data, seed=cfg.seed, num_test=cfg.num_test, on_bad_row=cfg.on_bad_row)
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"--model: checkpoint directory {model_dir} does not exist")
        prompt_ids(Tokenizer.from_pretrained(model_dir), task, task.train[0])  # raises without a chat template
    if cfg.model == "tiny" and not cfg.max_new_tokens and task.max_new_tokens > TINY_BUDGET:
        log(f"warning: --task {cfg.task} asks for {task.max_new_tokens} completion tokens, far more than the built-in "
            f"tiny model's answers need (minutes per step); using --max-new-tokens {TINY_BUDGET}")
        cfg = cfg.with_overrides(max_new_tokens=TINY_BUDGET)
    return Plan(cfg.with_overrides(out=str(run_dir)), run_dir, task, model_dir, ckpt, state)


def create_run_dir(plan: Plan) -> str:
    """The run directory and its config, now that the plan is valid. -> the initial model directory."""
    from nanogrpo.model import Qwen2
    from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = plan.model_dir
    if model_dir is None:
        d = plan.run_dir / "init_model"
        if not (d / "model.safetensors").is_file():
            write_tiny_model_dir(d)
            Qwen2.from_config(TINY_MODEL_CONFIG, seed=plan.cfg.seed).save_pretrained(d)
        model_dir = str(d)
    (plan.run_dir / "config.json").write_text(plan.cfg.to_json())
    if not plan.ckpt:
        (plan.run_dir / "run.json").write_text(json.dumps({"model_dir": model_dir, "argv": sys.argv[1:]}))
    return model_dir


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    perm = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm


def example_index(pos: int, n: int, seed: int) -> int:
    """Data position -> train example: a fresh seeded permutation every epoch, so the order is
    a pure function of (seed, position) and a resume continues exactly where it stopped."""
    return _epoch_order(seed, pos // n, n)[pos % n]


# ----------------------------------------------------------------------------- Ray and placement
def check_reachable(address: str, timeout: float = 5.0):
    """Fail fast on a host:port nobody listens on; ray.init would otherwise retry for minutes."""
    import socket
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(f"--address: cannot connect to a Ray cluster at {address!r}: {e}") from None


def connect_ray(cfg):
    import ray
    if ray.is_initialized():  # a caller (a test, a notebook) connected already
        return
    if cfg.address:
        check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"--address: cannot connect to a Ray cluster at {cfg.address!r}: {e}") from None
    else:
        # address="local": a new cluster of our own even when this machine runs another one (a
        # `ray start`, another run's test cluster), which a bare ray.init() would try to join.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_learners + cfg.num_rollout_workers),
                 include_dashboard=False, log_to_driver=False)


@dataclass
class Actors:
    placement: object     # actors.placement.Placement
    buffer: object
    learner: object       # LearnerGroup
    pool: object          # RolloutPool
    buffer_name: str
    info: list            # learner rank 0's node info (every rank's under "ranks"), then each worker's


def start_actors(cfg, run_dir: Path, model_dir: str, counters: dict, resume_from: str | None) -> Actors:
    import ray

    from actors.placement import place
    from actors.pool import RolloutPool
    from actors.rollout import RolloutWorker
    from learner.group import LearnerGroup
    from nanogrpo.checkpoint import read_dir_files

    placement = place(cfg)
    learner_nodes, worker_nodes = placement.nodes()
    colocated = sum(cfg.threads_per_worker for n in worker_nodes if n == learner_nodes[0])
    # Small models travel with the actors, so nodes that cannot see the driver's disk still load them. Only
    # when an actor lands off the driver's node: Ray logs an error for object refs among restartable actors' args.
    driver_node = ray.get_runtime_context().get_node_id()
    off = any(n != driver_node for n in learner_nodes + worker_nodes)
    files = read_dir_files(model_dir, 1 << 30) if off else None
    model_files = [ray.put(files) if files is not None else None]
    buffer_name = f"nanogrpo-buffer-{os.getpid()}-{time.time_ns()}"  # workers find it by name (see RolloutWorker)
    buffer = new_buffer(cfg, run_dir, buffer_name, 0, counters, placement.learner(0))
    learner = LearnerGroup(cfg, model_dir, [placement.learner(i) for i in range(cfg.num_learners)], model_files,
                           colocated)
    workers = [RolloutWorker.options(num_cpus=1, num_gpus=cfg.gpus_per_worker, scheduling_strategy=placement.worker(i),
                                     max_restarts=-1, max_task_retries=0).remote(
        i, cfg, model_dir, buffer_name, model_files) for i in range(cfg.num_rollout_workers)]
    pool = RolloutPool(workers, cfg.sync_timeout, log)
    info = [learner.start(resume_from)] + pool.start()
    return Actors(placement, buffer, learner, pool, buffer_name, info)


def new_buffer(cfg, run_dir: Path, base: str, incarnation: int, counters: dict, scheduling):
    """The episode buffer, in the learner's bundle (num_cpus=0): where the learner is, so losing a
    rollout node never takes it. A re-created one gets the next incarnation's name (Ray may still
    hold the dead one's name), which is how the workers find it."""
    from actors.buffer import EpisodeBuffer
    from actors.rollout import buffer_name
    return EpisodeBuffer.options(name=buffer_name(base, incarnation), max_concurrency=1000,
                                 scheduling_strategy=scheduling).remote(
        cfg.buffer_capacity, str(run_dir / "episodes"), counters, spread_filter=cfg if cfg.dynamic_sampling else None)


# ----------------------------------------------------------------------------- the run
def run(cfg, given: set[str]) -> Path:
    import ray
    plan = make_plan(cfg, given)
    connect_ray(plan.cfg)
    with Stopper() as stopper:
        try:
            d = Driver(plan, stopper)
        except BaseException:
            ray.shutdown()
            raise
        try:
            d.warm_start()
            d.first_eval()
            d.pool.take_window()  # step 1's clock starts here, not at start-up (warm start, step-0 eval)
            while d.step < d.cfg.steps:
                with d.recovering():  # a dead learner or buffer is rebuilt and the loop goes on
                    d.dispatch()
                    ref = d.wait()
                    if ref is not None:
                        d.on_step(ref)
        except KeyboardInterrupt:
            d.interrupted = True
        except Exception as e:
            d.fail(e)
            raise
        d.finish()
    return d.summary()


class Stopper:
    """Ctrl-C and SIGTERM stop the run as one: during a critical section (a finished step's
    bookkeeping, a checkpoint) the stop waits until the section ends, so a step the learner
    finished always gets its metrics row; elsewhere it stops the wait in progress at once."""

    def __init__(self):
        self.depth, self.pending = 0, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # ray.init makes SIGTERM exit on the spot; `kill PID` and `ray job stop` send SIGTERM.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)
        return False

    def _on_signal(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def critical(self):
        stopper = self

        class _Section:
            def __enter__(self):
                stopper.depth += 1

            def __exit__(self, *exc):
                stopper.depth -= 1
                if not stopper.depth and stopper.pending and exc[0] is None:
                    stopper.pending = False
                    raise KeyboardInterrupt
        return _Section()


class Driver:
    """The loop's state and its named steps; `run()` above is the order they happen in."""

    def __init__(self, plan: Plan, stopper: Stopper):
        import dataclasses

        import ray

        from learner.sync import CollectiveSync, ObjectStoreSync
        from nanogrpo.metrics import MetricsLog
        self.plan, self.task, self.run_dir = plan, plan.task, plan.run_dir
        self.cfg = plan.cfg.resolved(self.task.max_new_tokens, ray.cluster_resources().get("GPU", 0))
        model_dir = create_run_dir(dataclasses.replace(plan, cfg=self.cfg))
        self.model_dir, state = model_dir, plan.state
        self.step = self.dispatch_step = int(state.get("step", 0))
        self.stopper, self.interrupted, self.steps_q = stopper, False, collections.deque()
        self.pending_row: dict | None = None  # a finished step's row while its eval runs
        self.saved_step = self.step  # the newest checkpoint's step
        counters = {**state.get("buffer", {}), "next_ticket": self.step}
        self.actors = start_actors(self.cfg, self.run_dir, model_dir, counters, str(plan.ckpt) if plan.ckpt else None)
        self.pool, self.learner, self.buffer = self.actors.pool, self.actors.learner, self.actors.buffer
        self.pool.restarts += int(state.get("worker_restarts", 0))  # (deaths at start-up are counted already)
        self.learner.restarts += int(state.get("learner_restarts", 0))
        info = self.actors.info
        (self.run_dir / "placement.json").write_text(json.dumps({"learner": info[0]["ranks"], "workers": info[1:]},
                                                                indent=1))  # where each actor started
        ranks = f"{len(info[0]['ranks'])} learner ranks" if len(info[0]["ranks"]) > 1 else "learner"
        log(f"{ranks} on {info[0]['device']} ({info[0]['dtype']}, node {info[0]['node'][:8]}), {len(info) - 1} rollout "
            f"workers on {', '.join(i['device'] + '@' + i['node'][:8] for i in info[1:])}")
        if plan.ckpt:
            log(f"resuming from step {self.step} ({plan.ckpt}); {self.cfg.steps - self.step} steps to go")
        self.metrics_log = MetricsLog(self.run_dir, self.step if plan.ckpt else None, report_to=self.cfg.report_to,
                                      run_config=json.loads(self.cfg.to_json()))
        self.sync = CollectiveSync(self.cfg.sync_timeout, log) if self.cfg.weight_sync == "collective" \
            else ObjectStoreSync()
        self.wall0 = float(state.get("wall_time", 0.0))  # seconds spent before a resume
        self.t_run = time.perf_counter() - self.wall0
        self.last_progress = self.last_print = time.perf_counter()
        self.bstats = {"produced": 0, "consumed": 0, "dropped": 0, "lost": 0, **counters, "in_buffer": 0}
        self.bstats_step, self.buffer_restarts = self.step, 0
        self.version, self.weights = 0, None
        self.start_backfill()

    # ------------------------------------------------------------------ start
    def warm_start(self):
        """Supervised warm start (fresh runs only), then the first published weights."""
        from actors.rollout import prompt_ids
        from nanogrpo.tokenizer import Tokenizer
        cfg, task = self.cfg, self.task
        sft_steps = cfg.sft_steps if cfg.sft_steps >= 0 else (300 if cfg.model == "tiny" else 0)
        # The text trained on is the example's "warm_start" when the task gives one (the built-in arithmetic
        # task: a target-blind format example), else its "solution".
        field = next((f for f in ("warm_start", "solution") if f in task.train[0]), None)
        if self.step == 0 and sft_steps > 0 and field:
            tok = Tokenizer.from_pretrained(self.model_dir)
            seqs = [(prompt_ids(tok, task, ex), tok.encode(ex[field]) + [tok.eos_token_id]) for ex in task.train]
            t0 = time.perf_counter()
            sft = self.learner.sft(seqs, sft_steps, 64, cfg.sft_lr, cfg.seed, what="the learner's supervised "
                                   "warm start", timeout=cfg.sync_timeout + 2.0 * sft_steps)
            log(f"supervised warm start: {sft_steps} steps in {time.perf_counter() - t0:.1f}s, "
                f"loss {sft['sft_loss_first']:.3f} -> {sft['sft_loss_last']:.3f}")
        self.sync.start(self.pool, self.learner.actor)
        self.weights, self.version = self.learner.publish(), self.learner.state()["version"]
        self.sync.after_step(self.pool, self.learner.actor, self.weights, self.version)
        self.last_progress = time.perf_counter()  # a long warm start is progress, not a stall

    def first_eval(self):
        """The step-0 eval of a fresh run (a resumed run has its row already)."""
        self.eval_hist = [(int(r["step"]), float(r["eval_success"])) for r in self.metrics_log.rows()
                          if r.get("eval_success")]
        if self.plan.ckpt or self.eval_hist:
            return
        t0, n = time.perf_counter(), len(self.task.test)
        log(f"step 0: greedy pass@1 on {n} held-out prompts (up to {self.cfg.max_new_tokens} tokens each) ...")
        e0 = self.evaluate()
        with self.stopper.critical():
            self.eval_hist.append((0, e0))
            self.metrics_log.write({"step": 0, "eval_success": e0, "wall_time": 0.0})
        log(f"step 0: held-out greedy success {e0:.3f} ({n} prompts, {time.perf_counter() - t0:.1f}s)")
        self.last_progress = time.perf_counter()

    def evaluate(self) -> float:
        flat = self.pool.evaluate(len(self.task.test))
        return sum(flat) / max(len(flat), 1)

    # ------------------------------------------------------------------ the loop
    def dispatch(self):
        """Queue the prompts of every step whose groups may already be generated (step s's groups must
        come from version >= s - k), then the learner steps that can wait for their groups."""
        cfg, B, n = self.cfg, self.cfg.prompts_per_step, len(self.task.train)
        while self.dispatch_step < cfg.steps and self.dispatch_step <= self.version + cfg.max_staleness:
            s = self.dispatch_step
            items = [(s * B + j, s, example_index(s * B + j, n, cfg.seed)) for j in range(B)]
            for i in range(0, B, cfg.rollout_batch):
                self.pool.submit(items[i:i + cfg.rollout_batch])
            self.dispatch_step += 1
        self.refill()
        self.queue_steps()

    def queue_steps(self):
        """With k >= 1 the next learner step is queued while one trains, so the learner goes straight
        on when its groups are ready instead of waiting for a round trip through this loop. A step
        after a checkpoint boundary waits for the checkpoint (it must not include that step)."""
        cfg = self.cfg
        depth = 2 if cfg.max_staleness >= 1 and self.sync.queue_ahead else 1
        while len(self.steps_q) < depth and self.step + len(self.steps_q) < cfg.steps:
            n = self.step + len(self.steps_q)  # steps done or queued before this one
            if cfg.save_every and n % cfg.save_every == 0 and self.saved_step < n < cfg.steps:
                break  # the checkpoint after step n is still to be written (the learner must be free for it)
            wait_s = cfg.sync_timeout * (cfg.max_resample_factor if cfg.dynamic_sampling else 1)  # F x the prompts
            take = self.buffer.take.remote(cfg.prompts_per_step, max(0, n - cfg.max_staleness), wait_s, ticket=n)
            self.steps_q.append((take, self.learner.train_step(take)))

    def wait(self):
        """One rollout call or learner step finishing. -> the finished learner step's ref, or None."""
        step_ref = self.steps_q[0][1] if self.steps_q else None
        ready = self.pool.wait(self.learner.watch(step_ref) if step_ref else [], timeout=min(5.0, self.cfg.sync_timeout))
        now = time.perf_counter()
        if ready:
            self.last_progress = now
            return step_ref if self.learner.settled(ready[0], step_ref) else None
        if now - self.last_progress > 2 * self.cfg.sync_timeout + 30:
            raise TimeoutError(f"no progress for {now - self.last_progress:.0f}s: learner step {self.step + 1} waits "
                               f"for {self.cfg.prompts_per_step} groups and {self.pool.busy()} rollout calls are pending")
        self.progress(now)
        return None

    def progress(self, now: float):
        """A long step says where it is: groups generated, tokens/s, and an ETA from the steps so far."""
        if self.cfg.quiet or now - self.last_print < PROGRESS_EVERY_S:
            return
        self.last_print = now
        w = self.pool.window
        done = self.step - int(self.plan.state.get("step", 0))
        per_step = (now - self.t_run - self.wall0) / done if done else None
        eta = f", ETA {per_step * (self.cfg.steps - self.step) / 60:.0f} min" if per_step else ""
        log(f"step {self.step + 1}/{self.cfg.steps}: {w.groups}/{self.cfg.prompts_per_step} groups generated, "
            f"{self.pool.busy()} rollout calls running, {w.tokens / max(now - w.t0, 1e-9):.0f} tokens/s, "
            f"learner {'training or waiting for groups' if self.steps_q else 'idle'}, "
            f"{now - w.t0:.0f}s into the step{eta}")

    def on_step(self, ref):
        """A learner step finished: its row (kept for any stop from here on), weights out, eval,
        the row written, checkpoint."""
        metrics, weights = self.learner_result(ref)
        with self.stopper.critical():
            self.steps_q.popleft()
            self.step += 1
            self.weights, self.version = weights, metrics["version"]
            self.pending_row = self.step_row(metrics)
        self.sync.after_step(self.pool, self.learner.actor, self.weights, self.version)
        self.queue_steps()  # before the bookkeeping below, so the learner does not wait on it
        if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.cfg.steps:
            t0 = time.perf_counter()
            ev = self.evaluate()
            self.eval_hist.append((self.step, ev))
            dt = time.perf_counter() - t0  # in the step's time (the user waited for it) and on its own
            self.pending_row.update(eval_success=ev, time_step=self.pending_row["time_step"] + dt, time_eval=dt)
        row = self.write_pending()
        self.after_row(row, metrics)
        self.last_progress = time.perf_counter()  # the eval and checkpoint above were progress too

    def write_pending(self) -> dict | None:
        with self.stopper.critical():
            row, self.pending_row = self.pending_row, None
            if row is not None:
                self.metrics_log.write(row)
        return row

    @contextlib.contextmanager
    def recovering(self):
        from ray.exceptions import RayError
        try:
            yield
        except RayError as e:
            self.write_pending()
            self.recover(e)

    def learner_result(self, ref):
        return self.learner.result(ref, self.cfg.sync_timeout, f"learner step {self.step + 1}")

    def step_row(self, metrics: dict) -> dict:
        b = self.buffer_stats()
        now, w = time.perf_counter(), self.pool.take_window()
        return {**metrics, "step": self.step, "time_step": now - w.t0, "time_generate": w.gen,
                "time_train": metrics["train_seconds"], "time_sync": w.sync,
                "tokens_per_s": w.tokens / max(now - w.t0, 1e-9), "buffer_produced": b["produced"],
                "buffer_consumed": b["consumed"], "buffer_dropped": b["dropped"], "buffer_in": b["in_buffer"],
                "buffer_lost": b["lost"], "worker_restarts": self.pool.restarts,
                "learner_restarts": self.learner.restarts, "wall_time": now - self.t_run,
                **self.sampling_row(metrics, b)}

    def buffer_stats(self) -> dict:
        """The buffer's counters, and the work of groups it dropped as too stale queued again (their
        step would come up short). A dead buffer: the last counters seen (it is re-created next)."""
        import ray
        from ray.exceptions import RayError
        try:
            self.bstats = ray.get(self.buffer.stats.remote(), timeout=self.cfg.sync_timeout)
            self.bstats_step = self.step
            for gid, s, i in ray.get(self.buffer.pop_dropped.remote(), timeout=self.cfg.sync_timeout):
                self.pool.submit([(gid + REISSUE_OFFSET, s, i)], front=True)
        except RayError:
            pass  # the next wait finds the buffer dead and re-creates it
        return self.bstats

    # ------------------------------------------------------------------ dynamic sampling
    def start_backfill(self):
        """--dynamic-sampling's extra prompts (actors/backfill.py): their own shuffled data stream."""
        from actors.backfill import Backfill
        cfg, n = self.cfg, len(self.task.train)
        self.backfill = Backfill(cfg.prompts_per_step, cfg.max_resample_factor,
                                 lambda pos: example_index(pos, n, cfg.seed + EXTRA_STREAM_SEED)) \
            if cfg.dynamic_sampling else None
        self.step_groups: dict[int, int] = {}  # step -> groups it trained on
        self.filter_seen = (self.bstats["produced"], self.bstats.get("filtered", 0))  # at the last row

    def refill(self):
        """--dynamic-sampling: once every rollout call has landed, an extra prompt for each group the
        buffer filtered, until its step's budget is spent; past it the group is excused, so a take
        comes up short instead of waiting. Waiting for the calls to land makes the extras, and how
        they are batched into calls (a call's seed is its first group id), the same in every run with
        k = 0: such a run stays reproducible and its resume continues it exactly."""
        import ray
        if self.backfill is None or self.pool.rollouts_pending():
            return
        items, excused = self.backfill.replace(ray.get(self.buffer.pop_filtered.remote(),
                                                       timeout=self.cfg.sync_timeout))
        for i in range(0, len(items), self.cfg.rollout_batch):
            self.pool.submit(items[i:i + self.cfg.rollout_batch])
        if items:  # a step that needs F rounds of rollouts is slow, not stuck (see wait's no-progress check)
            self.last_progress = time.perf_counter()
        if excused:
            ray.get(self.buffer.excuse.remote(excused), timeout=self.cfg.sync_timeout)

    def sampling_row(self, metrics: dict, b: dict) -> dict:
        """A step row's sampling columns: the groups it trained on and how many short of B; with
        --dynamic-sampling also the prompts issued for its data (<= F x B) and the fraction of the
        groups that reached the buffer since the previous row that were filtered."""
        B = self.cfg.prompts_per_step
        groups = int(metrics.get("groups", B))
        self.step_groups[self.step] = groups
        row = {"groups": groups, "shortfall": B - groups, "buffer_filtered": b.get("filtered", 0)}
        if self.backfill is not None:
            produced, filtered = b["produced"] - self.filter_seen[0], b.get("filtered", 0) - self.filter_seen[1]
            self.filter_seen = (b["produced"], b.get("filtered", 0))
            row.update(prompts_issued=self.backfill.issued(self.step - 1),
                       filtered_frac=filtered / produced if produced else float("nan"))
        return row

    def after_row(self, row: dict, metrics: dict):
        cfg = self.cfg
        if metrics.get("skipped_step"):
            log(f"step {self.step}: non-finite loss or gradient, update skipped ({int(metrics['skipped_step'])})")
        self.print_row(row)
        if metrics.get("skipped_in_a_row", 0) >= cfg.max_skipped_steps:
            raise TrainingAborted(f"{int(metrics['skipped_in_a_row'])} consecutive steps had a non-finite loss or "
                                  "gradient (weights left untouched); stopping. Lower --lr or check the data; "
                                  "the last checkpoint is intact")
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
            self.save()

    def print_row(self, row: dict):
        if self.cfg.quiet:
            return
        ev = f" | eval {row['eval_success']:.3f}" if "eval_success" in row else ""
        trained = (f"| kl {row.get('kl', 0):.4f} | ent {row['entropy']:.3f} | len {row['response_len']:.1f} "
                   f"| stale {row['staleness_mean']:.2f} | gap {row['logprob_gap']:.2e}"
                   if row["train_tokens"] else
                   f"| len {row['response_len']:.1f} | nothing trained: every group's rewards were equal"
                   if row.get("groups", 1) else
                   f"| no group: none of the {row.get('prompts_issued')} prompts issued had reward spread")
        if row.get("shortfall"):
            trained += f" | {row['shortfall']} groups short"
        log(f"step {self.step}/{self.cfg.steps} | reward {row['reward_mean']:.3f} | success {row['success_rate']:.3f}{ev} "
            f"{trained} | {row['time_step']:.2f}s")
        self.last_print = time.perf_counter()

    def save(self) -> Path:
        import ray
        with self.stopper.critical():
            counters = ray.get(self.buffer.checkpoint_state.remote(), timeout=self.cfg.sync_timeout)
            path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
            self.learner.save(path, {"step": self.step, "buffer": counters, "worker_restarts": self.pool.restarts,
                                     "learner_restarts": self.learner.restarts,
                                     "wall_time": time.perf_counter() - self.t_run})
            self.saved_step = self.step
            for old in sorted((self.run_dir / "checkpoints").glob("step-*"))[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ recovery
    def recover(self, e: BaseException):
        """A learner call or the pool failed: find who died and bring it back, or re-raise."""
        import ray
        from ray.exceptions import RayError
        try:
            ray.get(self.buffer.stats.remote(), timeout=self.cfg.sync_timeout)
            buffer_ok = True
        except RayError:
            buffer_ok = False
        if not self.learner.alive():
            self.recover_learner(e)
        elif not buffer_ok:
            self.recover_buffer()
        else:
            raise e

    def recover_learner(self, e: BaseException):
        """Rebuild the learner from the last complete checkpoint and redo the steps after it."""
        from nanogrpo.checkpoint import latest_run_checkpoint
        ckpt = latest_run_checkpoint(self.run_dir)
        state = json.loads((ckpt / "state.json").read_text()) if ckpt else {"step": 0}
        log(f"learner died at step {self.step} ({type(e).__name__}); rebuilding it from "
            f"{ckpt or 'the initial model'} (learner restart {self.learner.restarts + 1}/{self.cfg.max_learner_restarts})")
        self.learner.recover(ckpt)
        self.rewind(int(state["step"]))
        self.saved_step = self.step
        self.metrics_log.truncate(self.step)
        self.eval_hist = [(s, v) for s, v in self.eval_hist if s <= self.step]
        self.pool.on_every_worker("forget_weights", "the rollout workers to drop the dead learner's weights")
        if self.step == 0:
            self.warm_start()
        else:
            self.sync.start(self.pool, self.learner.actor)
            self.weights, self.version = self.learner.publish(), self.learner.state()["version"]
            self.sync.after_step(self.pool, self.learner.actor, self.weights, self.version)
        log(f"learner recovered: redoing steps {self.step + 1}.. from the checkpoint")

    def rewind(self, step: int):
        """Generate from `step` on again: rollouts in flight land, the buffer is emptied (counted as
        dropped) and serves takes from that step's ticket."""
        import ray
        takes = [take for take, _ in self.steps_q]
        for take in takes:
            ray.cancel(take)
        if takes:  # a cancelled take moves the buffer's ticket on as it ends: let it end before the reset
            ray.wait(takes, num_returns=len(takes), timeout=self.cfg.sync_timeout)
        self.steps_q.clear()
        self.learner.forget_steps()
        self.pool.clear_rollouts()
        ray.get(self.buffer.reset.remote(step), timeout=self.cfg.sync_timeout)  # room for puts in flight
        self.pool.drain()
        ray.get(self.buffer.reset.remote(step), timeout=self.cfg.sync_timeout)
        self.pool.take_window()
        self.step = self.dispatch_step = step
        if self.backfill:
            self.backfill.rewind(step)

    def recover_buffer(self):
        """A new buffer under the same name. What the dead one held is lost: the steps trained since the
        last counters seen consumed their groups, everything else it got is counted as lost."""
        self.buffer_restarts += 1
        if self.buffer_restarts > 3:
            raise TrainingAborted("the episode buffer died 4 times; stopping (the last checkpoint is intact)")
        self.finish_queued()  # a step whose groups were already taken still finishes
        b, B = self.bstats, self.cfg.prompts_per_step
        since = [self.step_groups.get(s, B) for s in range(self.bstats_step + 1, self.step + 1)]  # groups each took
        consumed, filtered = b["consumed"] + sum(since), b.get("filtered", 0)
        produced = max(b["produced"], consumed + b["dropped"] + filtered)
        lost = produced - consumed - b["dropped"] - filtered
        counters = {"produced": produced, "consumed": consumed, "dropped": b["dropped"], "lost": lost,
                    "filtered": filtered, "shortfall": b.get("shortfall", 0) + B * len(since) - sum(since),
                    "log_parts": b.get("log_parts", 0) + 1, "next_ticket": self.step}
        self.buffer = self.actors.buffer = new_buffer(self.cfg, self.run_dir, self.actors.buffer_name,
                                                      self.buffer_restarts, counters, self.learner.scheduling[0])
        self.bstats, self.bstats_step = dict(counters, in_buffer=0), self.step
        log(f"episode buffer died; re-created it at step {self.step} ({lost} groups lost in all so far), "
            "regenerating the groups of the steps to come")
        self.rewind(self.step)

    # ------------------------------------------------------------------ the end
    def finish_queued(self):
        """A queued step whose groups are taken finishes and counts; one still waiting is cancelled."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError
        for take, _ in reversed(self.steps_q):
            ray.cancel(take)
        while self.steps_q:
            try:
                metrics, weights = self.learner.result(self.steps_q[0][1], self.cfg.sync_timeout, "a queued step")
            except (RayError, GetTimeoutError, TimeoutError):
                break
            with self.stopper.critical():
                self.steps_q.popleft()
                self.step += 1
                self.weights, self.version = weights, metrics["version"]
                self.metrics_log.write(self.step_row(metrics))
        self.steps_q.clear()

    def fail(self, e: BaseException):
        """Keep what was learned: checkpoint the learner if it still answers, then the error goes on."""
        log(f"run failed at step {self.step} ({type(e).__name__}); trying to checkpoint before exiting")
        self.write_pending()
        try:
            self.finish_queued()
            log(f"checkpoint: {self.save()}")
        except Exception as e2:  # noqa: BLE001 - best effort; the original error is what matters
            log(f"could not checkpoint: {type(e2).__name__}: {e2}")
        import ray
        ray.shutdown()

    def finish(self):
        """Queued steps that have their groups finish and count; rollouts land; the final checkpoint."""
        from ray.exceptions import RayError
        if self.interrupted:
            log(f"interrupted during step {self.step + 1}: finishing the steps whose groups were taken")
        self.write_pending()
        self.finish_queued()
        try:
            self.pool.drain()
        except (RayError, TimeoutError, RuntimeError) as e:
            log(f"rollouts still in flight at the end were left ({type(e).__name__})")
        if self.interrupted:
            log(f"stopped after step {self.step}: saving a checkpoint (no final eval)")
        self.ckpt_path = self.save()

    def summary(self) -> Path:
        import ray

        from nanogrpo.plot import plot_run
        ray.get(self.buffer.flush.remote(), timeout=self.cfg.sync_timeout)
        b = ray.get(self.buffer.stats.remote(), timeout=self.cfg.sync_timeout)
        b.pop("waiting_takes", None)
        png = plot_run(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        self.metrics_log.close(png)  # the --report-to sinks get the curves image, then finish
        last = next((r for r in reversed(self.metrics_log.rows()) if r.get("reward_mean")), {})
        evals = self.eval_hist
        summary = {"steps": self.step, "wall_seconds": round(time.perf_counter() - self.t_run, 1),
                   "interrupted": self.interrupted, "eval_first": evals[0][1] if evals else None,
                   "eval_last": evals[-1][1] if evals else None, "eval_last_step": evals[-1][0] if evals else None,
                   "eval_best": max(e for _, e in evals) if evals else None,
                   "final_eval": bool(evals) and evals[-1][0] == self.step,
                   "reward_last": float(last["reward_mean"]) if last else None,
                   "worker_restarts": self.pool.restarts, "learner_restarts": self.learner.restarts,
                   "buffer_restarts": self.buffer_restarts, **b,
                   "checkpoint": str(self.ckpt_path), "plot": str(png)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log("\n" + "-" * 60)
        for k, v in summary.items():
            log(f"{k:>18} : {v:.3f}" if isinstance(v, float) else f"{k:>18} : {v}")
        log("-" * 60)
        ray.shutdown()
        log(f"run dir: {self.run_dir}")
        return self.run_dir


# ----------------------------------------------------------------------------- entry point
PLOT_USAGE = "usage: python launch.py plot RUN_DIR   (redraws RUN_DIR/curves.png from RUN_DIR/metrics.csv)"


def plot_main(args: list[str]) -> int:
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(PLOT_USAGE, file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    from nanogrpo.plot import plot_run
    try:
        print(plot_run(Path(args[0]) / "metrics.csv", Path(args[0]) / "curves.png"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


EXPORT_HELP = ("Write the policy of a --lora-rank run as a plain Hugging Face model directory: the run's base "
               "(run.json's model_dir) with the adapters of its latest complete checkpoint merged in "
               "(config.json + model.safetensors + tokenizer files), which transformers' "
               "AutoModelForCausalLM.from_pretrained loads without PEFT. The checkpoint itself is a PEFT adapter "
               "directory: peft.PeftModel.from_pretrained(base, CHECKPOINT) loads it unmerged.")


def export_main(args: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="launch.py export", description=EXPORT_HELP)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by a --lora-rank run")
    p.add_argument("--merged", metavar="OUT", required=True,
                   help="the directory to write (must not exist or be empty: nothing is overwritten)")
    ns = p.parse_args(args)
    try:
        out = export_merged_run(Path(ns.run_dir), Path(ns.merged))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def export_merged_run(run_dir: Path, out: Path) -> Path:
    """run_dir's base + the latest checkpoint's adapters, merged, written to `out`. -> out."""
    from nanogrpo import lora
    from nanogrpo.checkpoint import latest_run_checkpoint
    from nanogrpo.model import Qwen2
    from nanogrpo.runconfig import RunConfig
    if not (run_dir / "config.json").is_file() or not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"export: {run_dir} has no config.json and run.json (is it a nanogrpo run directory?)")
    if not RunConfig.from_json_file(run_dir / "config.json").lora_rank:
        raise ValueError(f"export --merged: {run_dir} was trained without --lora-rank, so there are no adapters to "
                         f"merge: its checkpoints under {run_dir}/checkpoints are full HF model directories already")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export --merged: {out} exists and is not empty (nothing there is overwritten)")
    ckpt = latest_run_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"export: no complete checkpoint under {run_dir}/checkpoints")
    base_dir = json.loads((run_dir / "run.json").read_text())["model_dir"]
    if not (Path(base_dir) / "config.json").is_file():
        raise FileNotFoundError(f"export: the run's base model {base_dir} (run.json's model_dir) is not readable")
    model = lora.load_adapter(Qwen2.from_pretrained(base_dir), ckpt)  # the base in its saved dtype
    return lora.export_merged(model, out, tokenizer_dir=ckpt)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    from nanogrpo.runconfig import cli_names, parse_args
    cfg, given = parse_args(argv, description=__doc__.split("\n\n")[0],
                            epilog="commands: `python launch.py plot RUN_DIR` redraws a run's curves.png; "
                                   "`python launch.py export RUN_DIR --merged OUT` writes a --lora-rank run's "
                                   "base with its adapters merged in as a plain HF model (see export --help)")
    # A shell starts background jobs (`nohup python launch.py &`) with SIGINT ignored, and Python
    # keeps it ignored: give `kill -INT` the clean stop of Ctrl-C there too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from learner.group import LearnerLost
    try:
        run(cfg, given)
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing was trained", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, TimeoutError) as e:
        print(f"error: {cli_names(str(e))}", file=sys.stderr)
        return 2
    except (TrainingAborted, LearnerLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
