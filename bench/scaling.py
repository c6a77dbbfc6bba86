"""System benchmark: rollout scaling, weight publish+load cost, async vs sync steps/min.

    python -m bench.scaling            # ~3-4 minutes on 2 cores
    python -m bench.scaling --quick

Every figure is a ratio measured in this run against a peer or a limit measured in this run:
  * rollout tokens/s with 2 workers vs 1 worker (1 torch thread each), same workload, alternating
    rounds (median of the per-round ratios), with a learner-sized take always waiting in the buffer;
  * time to publish (pack + one ray.put) and load one Qwen2.5-0.5B-sized weight version on 1, 2
    and 4 workers vs one local memcpy of the same bytes;
  * steps/min and learner idle fraction of the full driver with k = 1 vs k = 0, with the learner and
    the rollout worker on cores of their own (as on a cluster) and in the default shared layout.
Writes bench/results_scaling.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.generate import QWEN05, empty_model
from nanogrpo.model import Qwen2
from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir
from nanogrpo.weights import flatten_parameters, pack, unpack_into


# ----------------------------------------------------------------------------- rollout scaling
def rollout_scaling(model_dir: str, rounds: int, window: float) -> dict:
    """Rollout tokens/s of 1 worker and of 2 workers (1 thread each), alternating in `rounds` rounds
    of `window` seconds each on the same two actors (worker 1 sits idle in the 1-worker windows).
    Alternating spreads slow drifts of the machine's speed over both sides; the figure is the
    median of the per-round ratios."""
    from actors.buffer import EpisodeBuffer
    from actors.rollout import RolloutWorker
    from nanogrpo.runconfig import RunConfig
    from nanogrpo.tasks import load_task

    n_train = len(load_task("arithmetic").train)
    cfg = RunConfig(group_size=8, max_new_tokens=16, threads_per_worker=1, dtype="fp32")
    name = f"bench-buffer-{time.time_ns()}"
    buf = EpisodeBuffer.options(name=f"{name}#0", max_concurrency=100).remote(10**6)  # workers look up name#N
    ws = [RolloutWorker.remote(i, cfg, model_dir, name) for i in range(2)]
    ray.get([w.ready.remote() for w in ws])
    weights = [ray.put(pack(Qwen2.from_pretrained(model_dir), 0))]
    calls = itertools.count()

    def work():  # 16 prompts per call, as the default run's 32 prompts per step over 2 workers
        k = next(calls)
        return [(k * 16 + j, 0, (k * 16 + j) % n_train) for j in range(16)]

    def measure(n: int) -> float:
        """Sum over the n workers of (tokens of the calls it finished in the window) / (time its
        last one finished). Per-worker spans: with one shared span, whichever worker finished
        its last call first would sit idle while the other's ran on, counted against 2 workers.
        A take of 32 groups (a default learner step's) is always waiting in the buffer, as the
        learner's next step is in a run: groups leave the buffer as they do in a run, instead of
        piling up (a buffer that only grows made each put ~0.3 ms dearer)."""
        tokens, last, t0 = [0] * n, [0.0] * n, time.perf_counter()
        take = buf.take.remote(32, 0)
        pending = {w.rollout.remote(work(), weights, 0): i for i, w in enumerate(ws[:n])}
        while pending:
            [done], _ = ray.wait(list(pending) + [take], num_returns=1)
            if done == take:
                take = buf.take.remote(32, 0)
                continue
            i, out, now = pending.pop(done), ray.get(done), time.perf_counter() - t0
            if now < window or not last[i]:  # calls ending after the window count only if a worker has no other
                tokens[i], last[i] = tokens[i] + out["tokens"], now
            if now < window:
                pending[ws[i].rollout.remote(work(), weights, 0)] = i
        ray.cancel(take)
        return sum(t / s for t, s in zip(tokens, last))

    ray.get([w.rollout.remote(work(), weights, 0) for w in ws])  # warm-up + weight load
    one, two = [], []
    for _ in range(rounds):
        one.append(measure(1))
        two.append(measure(2))
    for a in ws + [buf]:
        ray.kill(a)
    ratios = [b / a for a, b in zip(one, two)]
    return {"tokens_per_s_1_worker": statistics.median(one), "tokens_per_s_2_workers": statistics.median(two),
            "scaling_1_to_2": statistics.median(ratios), "scaling_per_round": ratios,
            "rounds": rounds, "window_s": window}


# ----------------------------------------------------------------------------- weight sync
@ray.remote(num_cpus=0)
class SyncPeer:
    def __init__(self, cfg, device: str = "cpu"):
        torch.set_num_threads(1)
        self.model = empty_model(cfg, torch.bfloat16, device)

    def load(self, weights: list) -> float:
        t0 = time.perf_counter()
        self.packed = ray.get(weights[0])  # held like a rollout worker holds its current version
        unpack_into(self.model, self.packed, share=True)  # what RolloutWorker._sync does
        return time.perf_counter() - t0


def publish_load(model: Qwen2, workers: tuple[int, ...], reps: int, make_peer) -> dict[int, float]:
    """For each worker count n: the best time over `reps` versions to publish (pack + one ray.put)
    and load on n peers from make_peer(). Steady state: 3 untimed versions first (the first puts
    fault in fresh object-store pages), and versions 0.5 s apart, as a run publishes once per
    learner step. Back-to-back 1.3 GB puts 80 ms apart outran Ray's release of the versions before
    them: a put then stalled for 0.5-2.5 s (every third one with 1 worker)."""
    out = {}
    for n in workers:
        peers = [make_peer() for _ in range(n)]
        best = float("inf")
        for v in range(-3, reps):
            t0 = time.perf_counter()
            ref = [ray.put(pack(model, v, copy=False))]
            ray.get([p.load.remote(ref) for p in peers])
            if v >= 0:
                best = min(best, time.perf_counter() - t0)
            del ref
            time.sleep(0.5)
        out[n] = best
        for p in peers:
            ray.kill(p)
    return out


def weight_sync(cfg: dict, reps: int) -> dict:
    model = empty_model(cfg, torch.bfloat16)
    flatten_parameters(model)  # as the learner keeps its weights
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flat = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(flat)
    memcpy = min(_timed(lambda: dst.copy_(flat)) for _ in range(5))
    res = {"state_bytes": nbytes, "memcpy_s": memcpy, "memcpy_GBps": nbytes / memcpy / 1e9}
    for n, best in publish_load(model, (1, 2, 4), reps, lambda: SyncPeer.remote(cfg)).items():
        res[f"publish_load_s_{n}_workers"] = best
        res[f"vs_memcpy_{n}_workers"] = best / memcpy
    return res


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- async vs sync
def async_vs_sync(steps: int, pairs: int) -> dict:
    """k = 1 vs k = 0 steps/min of the full driver, in two layouts:
    * "disjoint": 1 rollout worker and the learner, one thread each, so each has a core of its own
      as rollout GPUs and the learner GPU do on a cluster. This measures the pipelining itself;
    * "shared": the default run (2 workers + learner on 2 cores). Every thread already competes
      for the same two cores, so overlap can only fill the core the learner leaves idle.
    The disjoint layout (the one with a target) runs `pairs` back-to-back (k = 0, k = 1) pairs, the
    shared one half as many; the speed-up is the median of the per-pair ratios, so a slow spell of
    the machine lands on both sides of a ratio."""
    import csv

    import launch
    from nanogrpo.runconfig import RunConfig

    def one_run(k: int, extra: dict) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as d:
            cfg = RunConfig(steps=steps, sft_steps=0, eval_every=0, save_every=0, max_staleness=k, num_test=8,
                            quiet=True, out=str(Path(d) / "run"), **extra)
            run_dir = launch.run(cfg, set())
            rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["reward_mean"]]
        # Steady state: skip the first steps (actor warm-up) and time the rest from the CSV.
        tail = rows[steps // 5:]
        span = float(tail[-1]["wall_time"]) - float(rows[steps // 5 - 1]["wall_time"])
        return 60 * len(tail) / span, sum(float(r["learner_idle_s"]) for r in tail) / span

    layouts = {"disjoint": dict(num_rollout_workers=1, threads_per_worker=1, learner_threads=1), "shared": {}}
    res = {}
    for name, extra in layouts.items():
        runs = {0: [], 1: []}
        for _ in range(pairs if name == "disjoint" else max(1, pairs // 2)):
            for k in (0, 1):
                runs[k].append(one_run(k, extra))
        for k in (0, 1):
            res[f"{name}_k{k}_steps_per_min"] = statistics.median(r[0] for r in runs[k])
            res[f"{name}_k{k}_learner_idle_frac"] = statistics.median(r[1] for r in runs[k])
        ratios = [b[0] / a[0] for a, b in zip(runs[0], runs[1])]
        res[f"{name}_pair_speedups"] = ratios
        res[f"{name}_async_speedup"] = statistics.median(ratios)
        # Perfect overlap hides the shorter of generation and training: with k = 0 the learner waits
        # for data a fraction f of the time, so k = 1 can be at most 1 / (1 - f) faster (when training
        # is the longer part, as here) or 1 / f (when generation is).
        f = res[f"{name}_k0_learner_idle_frac"]
        res[f"{name}_overlap_bound"] = 1.0 / max(f, 1.0 - f)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter measurements")
    args = ap.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "ray": ray.__version__,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(write_tiny_model_dir(Path(d) / "tiny"))
        Qwen2.from_config(TINY_MODEL_CONFIG, seed=0).save_pretrained(model_dir)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            roll = rollout_scaling(model_dir, 10 if args.quick else 16, 1.5 if args.quick else 2.5)
            sync = weight_sync(QWEN05, 2 if args.quick else 4)
        finally:
            ray.shutdown()
    asyn = async_vs_sync(30 if args.quick else 80, 3 if args.quick else 4)
    results = {"machine": machine, "rollout": roll, "weight_sync": sync, "async": asyn}
    Path(__file__).with_name("results_scaling.json").write_text(json.dumps(results, indent=2))
    rows = [
        ("rollout tokens/s, 1 worker", f"{roll['tokens_per_s_1_worker']:.0f}", ""),
        ("rollout tokens/s, 2 workers", f"{roll['tokens_per_s_2_workers']:.0f}",
         f"{roll['scaling_1_to_2']:.2f}x of 1 worker (target >= 1.8x; median of {roll['rounds']} rounds, "
         f"{min(roll['scaling_per_round']):.2f}-{max(roll['scaling_per_round']):.2f})"),
        ("one local memcpy of 0.5B bf16 state", f"{sync['memcpy_s'] * 1e3:.0f} ms", f"{sync['memcpy_GBps']:.1f} GB/s"),
    ] + [(f"publish+load 0.5B, {n} worker(s)", f"{sync[f'publish_load_s_{n}_workers'] * 1e3:.0f} ms",
          f"{sync[f'vs_memcpy_{n}_workers']:.2f}x memcpy (target <= 2x, flat)") for n in (1, 2, 4)]
    for name, what in (("disjoint", "1 worker + learner, a core each"), ("shared", "default: 2 workers + learner, 2 cores")):
        rows += [
            (f"steps/min k=0, {what}", f"{asyn[f'{name}_k0_steps_per_min']:.0f}",
             f"learner idle {asyn[f'{name}_k0_learner_idle_frac']:.0%}"),
            (f"steps/min k=1, {what}", f"{asyn[f'{name}_k1_steps_per_min']:.0f}",
             f"{asyn[f'{name}_async_speedup']:.2f}x of k=0" + (" (target >= 1.5x)" if name == "disjoint" else "")
             + f", median of {len(asyn[f'{name}_pair_speedups'])} pairs "
             + f"{min(asyn[f'{name}_pair_speedups']):.2f}-{max(asyn[f'{name}_pair_speedups']):.2f}"
             + f", overlap bound {asyn[f'{name}_overlap_bound']:.2f}x"
             + f", learner idle {asyn[f'{name}_k1_learner_idle_frac']:.0%}"),
        ]
    print(f"machine: {machine}")
    w = max(len(r[0]) for r in rows)
    for name, val, note in rows:
        print(f"{name:<{w}}  {val:>10}  {note}")
    print(f"rollout_scaling_1_to_2: {roll['scaling_1_to_2']:.2f}")


if __name__ == "__main__":
    main()
