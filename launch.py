"""nanogrpo driver: GRPO on a Ray cluster, from a 2-core laptop to `ray up cluster.yaml`.

Reads top to bottom: config -> task, model, tokenizer checked before anything starts -> Ray and
actor placement -> the loop (dispatch rollouts, train, sync weights, log, eval, checkpoint) ->
summary. `python launch.py plot RUN_DIR` redraws a run's plots.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

RESUMABLE_OVERRIDES = {"steps", "eval_every", "save_every", "keep_last", "quiet", "address", "sync_timeout",
                       "num_rollout_workers", "threads_per_worker", "learner_threads", "resume"}
REISSUE_OFFSET = 10**12  # added to a group id that is generated again, so ids stay unique


def log(msg: str):
    print(msg, flush=True)


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite gradients); checkpoints already written stay."""


def get(refs, timeout: float, what: str):
    """ray.get with a deadline whose error names what was being waited for."""
    import ray
    from ray.exceptions import GetTimeoutError
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (raise --sync-timeout if the "
                           "work is legitimately slow)") from None


# ----------------------------------------------------------------------------- run directory
def prepare_run_dir(cfg, given: set[str]):
    """Fresh run: create the directory. Resume: reload its config, apply only safe overrides."""
    from nanogrpo.runconfig import RunConfig

    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"--resume: {run_dir}/config.json not found (is it a nanogrpo run directory?)")
        saved = RunConfig.from_json_file(run_dir / "config.json")
        bad = sorted(given - RESUMABLE_OVERRIDES)
        if bad:
            raise ValueError(f"--resume: flags {['--' + b.replace('_', '-') for b in bad]} would change the run; "
                             f"only {sorted('--' + o.replace('_', '-') for o in RESUMABLE_OVERRIDES)} may be given")
        for k in given:
            setattr(saved, k, getattr(cfg, k))
        saved.resume, saved.out = str(run_dir), str(run_dir)
        return run_dir, saved
    run_dir = Path(cfg.out or f"runs/{cfg.task.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"--out: {run_dir} exists and is not empty; use --resume {run_dir} to continue it "
                              "or pick another directory (nothing there is overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.out = str(run_dir)
    return run_dir, cfg


def prepare_model(cfg, run_dir: Path) -> str:
    """The initial policy directory: the user's HF checkpoint, or the built-in tiny model."""
    from nanogrpo.model import Qwen2
    from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir

    if cfg.model != "tiny":
        if not Path(cfg.model).is_dir():
            raise FileNotFoundError(f"--model: checkpoint directory {cfg.model} does not exist")
        return cfg.model
    d = run_dir / "init_model"
    if not (d / "model.safetensors").is_file():
        write_tiny_model_dir(d)
        Qwen2.from_config(TINY_MODEL_CONFIG, seed=cfg.seed).save_pretrained(d)
    return str(d)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    perm = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm


def example_index(pos: int, n: int, seed: int) -> int:
    """Data position -> train example: a fresh seeded permutation every epoch, so the order is
    a pure function of (seed, position) and a resume continues exactly where it stopped."""
    return _epoch_order(seed, pos // n, n)[pos % n]


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


# ----------------------------------------------------------------------------- Ray placement
def start_actors(cfg, run_dir: Path, model_dir: str, counters: dict, resume_from: str | None):
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.buffer import EpisodeBuffer
    from actors.rollout import RolloutWorker
    from learner.learner import Learner
    from nanogrpo.checkpoint import read_dir_files

    W = cfg.num_rollout_workers
    n_gpu = ray.cluster_resources().get("GPU", 0)
    learner_gpus = (1 if n_gpu >= 1 else 0) if cfg.learner_gpus < 0 else cfg.learner_gpus
    cfg.learner_gpus = learner_gpus
    cfg.validate(cluster_gpus=n_gpu)

    def bundle(cpus, gpus):
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    bundles = [bundle(1, learner_gpus)] + [bundle(1, cfg.gpus_per_worker) for _ in range(W)]
    nodes = [n for n in ray.nodes() if n["Alive"]]
    # One node: pack (learner on the first GPU, workers on the rest). Several: spread them out.
    strategy = "SPREAD" if len(nodes) > 1 else "PACK"
    pg = placement_group(bundles, strategy=strategy)
    if not pg.wait(timeout_seconds=cfg.sync_timeout):
        raise TimeoutError(f"placement group {bundles} ({strategy}) could not be placed within {cfg.sync_timeout:.0f}s; "
                           f"cluster has {ray.cluster_resources()}")

    def on(i):
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

    where = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    colocated = sum(cfg.threads_per_worker for i in range(1, W + 1) if where[i] == where[0])
    # Small models travel with the actors, so nodes that cannot see the driver's disk still load them. Only
    # when an actor lands off the driver's node: Ray logs an error for object refs among restartable actors' args.
    driver_node = ray.get_runtime_context().get_node_id()
    files = read_dir_files(model_dir, 1 << 30) if any(n != driver_node for n in where.values()) else None
    model_files = [ray.put(files) if files is not None else None]

    buffer_name = f"nanogrpo-buffer-{os.getpid()}-{time.time_ns()}"  # workers find it by name (see RolloutWorker)
    buffer = EpisodeBuffer.options(name=buffer_name, max_concurrency=1000).remote(
        cfg.buffer_capacity or 4 * cfg.prompts_per_step, str(run_dir / "episodes"), counters)
    learner = Learner.options(num_cpus=1, num_gpus=learner_gpus, scheduling_strategy=on(0)).remote(
        vars(cfg), model_dir, cfg.learner_threads, resume_from, model_files, colocated)
    sampling = {"group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_k": cfg.top_k, "top_p": cfg.top_p}
    workers = [RolloutWorker.options(num_cpus=1, num_gpus=cfg.gpus_per_worker, scheduling_strategy=on(i + 1),
                                     max_restarts=-1, max_task_retries=0).remote(
        i, model_dir, cfg.task, cfg.data, cfg.seed, cfg.threads_per_worker, sampling, buffer_name, cfg.num_test,
        cfg.sync_timeout, model_files) for i in range(W)]
    info = ray.get([learner.node_info.remote()] + [w.ready.remote() for w in workers], timeout=cfg.sync_timeout * 2)
    return pg, buffer, learner, workers, info


# ----------------------------------------------------------------------------- the run
def run(cfg, given: set[str]) -> Path:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    from actors.rollout import prompt_ids
    from learner.broadcast import CollectiveSync, ObjectStoreSync
    from nanogrpo.checkpoint import latest_run_checkpoint
    from nanogrpo.metrics import MetricsLog
    from nanogrpo.tasks import load_task
    from nanogrpo.tokenizer import Tokenizer

    run_dir, cfg = prepare_run_dir(cfg, given)
    cfg.validate()
    # Everything that can be wrong with the inputs fails here, before Ray starts or files are written.
    task = load_task(cfg.task, cfg.data, seed=cfg.seed, num_test=cfg.num_test, on_bad_row=cfg.on_bad_row)
    cfg.max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    ckpt = latest_run_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
    model_dir = prepare_model(cfg, run_dir) if not cfg.resume else json.loads((run_dir / "run.json").read_text())["model_dir"]
    tok = Tokenizer.from_pretrained(model_dir)
    prompt_ids(tok, task, task.train[0])  # raises if the tokenizer has no chat template
    (run_dir / "config.json").write_text(cfg.to_json())
    (run_dir / "run.json").write_text(json.dumps({"model_dir": model_dir, "argv": sys.argv[1:]}))
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    start_step = int(state.get("step", 0))

    if cfg.address:
        check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"--address: cannot connect to a Ray cluster at {cfg.address!r}: {e}") from None
    else:
        need = 1 + cfg.num_rollout_workers
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=False)
    if threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM exit on the spot. Stop as on Ctrl-C instead (finish, checkpoint, summary):
        # `kill PID` and `ray job stop` send SIGTERM.
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    pg, buffer, learner, workers, info = start_actors(cfg, run_dir, model_dir,
                                                      {**state.get("buffer", {}), "next_ticket": start_step},
                                                      str(ckpt) if ckpt else None)
    log(f"learner on {info[0]['device']} (node {info[0]['node'][:8]}), {len(workers)} rollout workers on "
        f"{', '.join(i['device'] + '@' + i['node'][:8] for i in info[1:])}")
    metrics_log = MetricsLog(run_dir, start_step if ckpt else None, report_to=cfg.report_to,
                             run_config=json.loads(cfg.to_json()))
    W, B, k = len(workers), cfg.prompts_per_step, cfg.max_staleness
    pids = [i["pid"] for i in info[1:]]  # a changed pid means Ray restarted that worker
    down = [False] * W  # a call failed and the restarted process has not answered yet
    retry_at = [0.0] * W  # earliest time to send a worker that just failed another call
    n_train = len(task.train)

    # Supervised warm start (fresh runs only), then the first published weights.
    sft_steps = cfg.sft_steps if cfg.sft_steps >= 0 else (300 if cfg.model == "tiny" else 0)
    # The text trained on is the example's "warm_start" when the task gives one (the built-in arithmetic task: a
    # target-blind format example), else its "solution".
    field = next((f for f in ("warm_start", "solution") if f in task.train[0]), None)
    if not ckpt and sft_steps > 0 and field:
        eos = tok.eos_token_id
        seqs = [(prompt_ids(tok, task, ex), tok.encode(ex[field]) + [eos]) for ex in task.train]
        t0 = time.perf_counter()
        sft = get(learner.sft.remote(seqs, sft_steps, 64, cfg.sft_lr, cfg.seed), cfg.sync_timeout + 2.0 * sft_steps,
                  "the learner's supervised warm start")
        log(f"supervised warm start: {sft_steps} steps in {time.perf_counter() - t0:.1f}s, "
            f"loss {sft['sft_loss_first']:.3f} -> {sft['sft_loss_last']:.3f}")
    weights = get(learner.publish.remote(), cfg.sync_timeout, "the learner to publish its weights")
    version = get(learner.state.remote(), cfg.sync_timeout, "the learner's state")["version"]
    sync = CollectiveSync(learner, workers, cfg.sync_timeout) if cfg.weight_sync == "collective" else \
        ObjectStoreSync(learner, workers)
    if sync.mode == "collective":
        sync.after_step(workers, cfg.sync_timeout)

    def evaluate() -> float:
        idx = list(range(len(task.test)))
        chunks = [idx[i::W] for i in range(W)]
        res = get([w.evaluate.remote(c, sync.ref_for(weights), version) for w, c in zip(workers, chunks) if c],
                  cfg.sync_timeout * 4, "held-out evaluation on the rollout workers")
        flat = [x for r in res for x in r]
        return sum(flat) / max(len(flat), 1)

    def save(step: int) -> Path:
        counters = get(buffer.checkpoint_state.remote(), cfg.sync_timeout, "the episode buffer's counters")
        path = run_dir / "checkpoints" / f"step-{step:06d}"
        get(learner.save.remote(str(path), {"step": step, "buffer": counters, "worker_restarts": restarts}),
            cfg.sync_timeout * 4, f"the learner to write checkpoint {path}")
        done = sorted((run_dir / "checkpoints").glob("step-*"))
        for old in done[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    t_run = time.perf_counter()
    restarts = int(state.get("worker_restarts", 0))
    eval_hist = []
    if not ckpt:
        t0 = time.perf_counter()
        if not cfg.quiet:
            log(f"step 0: greedy pass@1 on {len(task.test)} held-out prompts ...")
        e0 = evaluate()
        eval_hist.append((0, e0))
        metrics_log.write({"step": 0, "eval_success": e0, "wall_time": 0.0})
        log(f"step 0: held-out greedy success {e0:.3f} ({len(task.test)} prompts, {time.perf_counter() - t0:.1f}s)")

    step, dispatch_step = start_step, start_step
    # Learner steps queued on the actor, oldest first: (buffer take, train_step). With k >= 1 the next
    # step is queued while one trains, so the learner goes straight on when its groups are ready
    # instead of waiting for a round trip through this loop.
    steps_q: collections.deque = collections.deque()
    depth = 2 if k >= 1 and sync.mode != "collective" else 1

    def queue_steps(unsaved: int | None = None):
        while len(steps_q) < depth and step + len(steps_q) < cfg.steps:
            n = step + len(steps_q)  # steps done or queued before this one
            if (steps_q or n == unsaved) and cfg.save_every and n % cfg.save_every == 0:
                break  # the checkpoint after step n is still to be written and must not include this step
            take = buffer.take.remote(B, max(0, n - k), cfg.sync_timeout, ticket=n)
            steps_q.append((take, learner.train_step.remote(take)))

    def finish_queued():
        """Stop: a queued step whose groups are taken finishes and counts; one still waiting is cancelled."""
        nonlocal step
        for take, _ in reversed(steps_q):
            ray.cancel(take)
        for _, ref in steps_q:
            try:
                metrics, _ = ray.get(ref, timeout=cfg.sync_timeout)
            except (RayError, GetTimeoutError):
                continue
            step += 1
            metrics_log.write({**metrics, "step": step, "wall_time": time.perf_counter() - t_run})
        steps_q.clear()
    queue: collections.deque = collections.deque()
    in_flight: dict = {}
    started: dict = {}  # rollout ref -> dispatch time, to spot stalled workers
    stalled: set = set()
    last_progress = time.perf_counter()
    idle = list(range(W))
    window = {"gen": 0.0, "sync": 0.0, "tokens": 0, "t0": time.perf_counter()}
    chunk = cfg.rollout_batch or math.ceil(B / W)
    last_metrics = {}
    interrupted = False
    try:
        while step < cfg.steps:
            # 1. Queue the prompts of every step whose groups may already be generated: step s's groups
            #    must come from version >= s - k, and the newest version is `version`.
            while dispatch_step < cfg.steps and dispatch_step <= version + k:
                items = [(dispatch_step * B + j, dispatch_step, example_index(dispatch_step * B + j, n_train, cfg.seed))
                         for j in range(B)]
                queue.extend(items[i:i + chunk] for i in range(0, B, chunk))
                dispatch_step += 1
            now = time.perf_counter()
            while queue and any(retry_at[i] <= now for i in idle):
                w = next(i for i in idle if retry_at[i] <= now)
                idle.remove(w)
                work = queue.popleft()
                r = workers[w].rollout.remote(work, sync.ref_for(weights), version)
                in_flight[r], started[r] = (w, work), time.perf_counter()
            # 2. The learner's next step waits (inside the buffer, not here) for B fresh groups.
            queue_steps()
            waiting_retry = bool(queue) and any(retry_at[i] > now for i in idle)
            ready, _ = ray.wait(list(in_flight) + [steps_q[0][1]], num_returns=1,
                                timeout=0.25 if waiting_retry else min(5.0, cfg.sync_timeout))
            if not ready:
                now = time.perf_counter()
                for r, (w, work) in in_flight.items():
                    if now - started[r] > cfg.sync_timeout and w not in stalled:
                        # A stalled worker is replaced, not waited on: kill it, Ray restarts it, and its call
                        # fails with RayActorError, which re-issues the prompts below.
                        log(f"rollout worker {w} stalled for {now - started[r]:.0f}s on {len(work)} prompts; restarting it")
                        stalled.add(w)
                        ray.kill(workers[w], no_restart=False)
                if now - last_progress > cfg.sync_timeout * 2:
                    raise TimeoutError(f"no progress for {now - last_progress:.0f}s: learner step {step + 1} waits "
                                       f"for {B} groups and {len(in_flight)} rollout calls are pending")
                continue
            last_progress = time.perf_counter()
            ref = ready[0]
            if ref in in_flight:
                w, work = in_flight.pop(ref)
                started.pop(ref, None)
                stalled.discard(w)
                try:
                    st = ray.get(ref)
                    window["gen"] += st["gen_seconds"]
                    window["sync"] += st["sync_seconds"]
                    window["tokens"] += st["tokens"]
                    if st["pid"] != pids[w]:  # a new process: Ray restarted this worker
                        if not down[w]:  # it died while idle, so no call failed to tell us
                            restarts += 1
                            log(f"rollout worker {w} was restarted; restarts so far: {restarts}")
                        pids[w], down[w] = st["pid"], False
                except RayActorError as e:
                    # Died mid-call (or is still restarting): Ray restarts the actor (max_restarts=-1);
                    # the new process starts at version -1, so its next call loads the latest
                    # published weights before generating. Count each death once.
                    if not down[w]:
                        down[w] = True
                        restarts += 1
                        log(f"rollout worker {w} died ({type(e).__name__}); restarts so far: {restarts}; "
                            f"re-issuing its {len(work)} prompts")
                    queue.appendleft(work)
                    retry_at[w] = time.perf_counter() + 1.0  # do not spin on an actor that is restarting
                idle.append(w)
                continue
            # The learner finished a step.
            steps_q.popleft()
            metrics, weights = get(ref, cfg.sync_timeout, f"learner step {step + 1}")
            step += 1
            version = metrics["version"]
            if sync.mode != "collective":
                queue_steps(unsaved=step)  # before the bookkeeping below, so the learner does not wait on it
            else:  # (the broadcast needs the learner free, so the next step is queued after it)
                # A worker busy generating cannot receive: let in-flight calls finish, then broadcast.
                for r in list(in_flight):
                    w, _ = in_flight.pop(r)
                    st = get(r, cfg.sync_timeout, f"rollout worker {w} to finish before the weight broadcast")
                    window["gen"] += st["gen_seconds"]
                    window["tokens"] += st["tokens"]
                    idle.append(w)
                window["sync"] += sync.after_step(workers, cfg.sync_timeout)
            if metrics.get("skipped_step"):
                log(f"step {step}: non-finite loss or gradient, update skipped ({int(metrics['skipped_step'])})")
            bstats = get(buffer.stats.remote(), cfg.sync_timeout, "the episode buffer's stats")
            # Groups dropped as too stale leave their step short: generate them again, fresh.
            redo = get(buffer.pop_dropped.remote(), cfg.sync_timeout, "the episode buffer's dropped groups")
            if redo:
                queue.extendleft([[(gid + REISSUE_OFFSET, s, i)] for gid, s, i in redo])
            now = time.perf_counter()
            row = {**metrics, "step": step, "time_step": now - window["t0"], "time_generate": window["gen"],
                   "time_train": metrics["train_seconds"], "time_sync": window["sync"],
                   "tokens_per_s": window["tokens"] / max(now - window["t0"], 1e-9),
                   "buffer_produced": bstats["produced"], "buffer_consumed": bstats["consumed"],
                   "buffer_dropped": bstats["dropped"], "buffer_in": bstats["in_buffer"],
                   "worker_restarts": restarts, "wall_time": now - t_run}
            window = {"gen": 0.0, "sync": 0.0, "tokens": 0, "t0": now}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                row["eval_success"] = evaluate()
                eval_hist.append((step, row["eval_success"]))
            metrics_log.write(row)
            last_metrics = row
            if not cfg.quiet:
                ev = f" | eval {row['eval_success']:.3f}" if "eval_success" in row else ""
                trained = (f"| kl {row.get('kl', 0):.4f} | ent {row['entropy']:.3f} "
                           f"| len {row['response_len']:.1f} | stale {row['staleness_mean']:.2f} "
                           f"| gap {row['logprob_gap']:.2e}"
                           if row["train_tokens"] else
                           f"| len {row['response_len']:.1f} | nothing trained: every group's rewards were equal")
                log(f"step {step}/{cfg.steps} | reward {row['reward_mean']:.3f} | success {row['success_rate']:.3f}{ev} "
                    f"{trained} | {row['time_step']:.2f}s")
            if metrics.get("skipped_in_a_row", 0) >= cfg.max_skipped_steps:
                raise TrainingAborted(f"{int(metrics['skipped_in_a_row'])} consecutive steps had a non-finite loss or "
                                      "gradient (weights left untouched); stopping. Lower --lr or check the data; "
                                      "the last checkpoint is intact")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted at step {step}: saving a checkpoint")
    except Exception as e:
        # Keep what was learned: checkpoint the learner if it still answers, then re-raise.
        log(f"run failed at step {step} ({type(e).__name__}); trying to checkpoint before exiting")
        try:
            finish_queued()
            log(f"checkpoint: {save(step)}")
        except Exception as e2:  # noqa: BLE001 - best effort; the original error is what matters
            log(f"could not checkpoint: {type(e2).__name__}: {e2}")
        raise
    # Let in-flight rollouts land so the episode accounting is complete, then the final checkpoint.
    for r in list(in_flight):
        try:
            ray.get(r, timeout=cfg.sync_timeout)
        except (RayActorError, GetTimeoutError):
            pass
    finish_queued()
    ckpt_path = save(step)
    get(buffer.flush.remote(), cfg.sync_timeout, "the episode buffer to flush its log")
    bstats = get(buffer.stats.remote(), cfg.sync_timeout, "the episode buffer's stats")
    wall = time.perf_counter() - t_run

    from nanogrpo.plot import plot_run
    png = plot_run(run_dir / "metrics.csv", run_dir / "curves.png")
    metrics_log.close(png)  # the --report-to sinks get the curves and end their runs
    summary = {"steps": step, "wall_seconds": round(wall, 1), "interrupted": interrupted,
               "eval_first": eval_hist[0][1] if eval_hist else None,
               "eval_last": eval_hist[-1][1] if eval_hist else None,
               "eval_best": max(e for _, e in eval_hist) if eval_hist else None,
               "reward_last": last_metrics.get("reward_mean"), "worker_restarts": restarts, **bstats,
               "checkpoint": str(ckpt_path), "plot": str(png)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log("\n" + "-" * 60)
    for k_, v in summary.items():
        log(f"{k_:>18} : {v:.3f}" if isinstance(v, float) else f"{k_:>18} : {v}")
    log("-" * 60)
    ray.shutdown()
    log(f"run dir: {run_dir}")
    return run_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        if len(argv) != 2:
            print("usage: python launch.py plot RUN_DIR", file=sys.stderr)
            return 2
        from nanogrpo.plot import plot_run
        print(plot_run(Path(argv[1]) / "metrics.csv", Path(argv[1]) / "curves.png"))
        return 0
    from nanogrpo.runconfig import parse_args
    cfg, given = parse_args(argv, description=__doc__.split("\n\n")[0])
    # A shell starts background jobs (`nohup python launch.py &`) with SIGINT ignored, and Python
    # keeps it ignored: give `kill -INT` the clean stop of Ctrl-C there too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(cfg, given)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
