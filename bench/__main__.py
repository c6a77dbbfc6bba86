"""The benchmark suite: `python -m bench [--quick]`.

Runs the sub-benchmarks one after another as subprocesses (so one crashing or leaking memory
cannot take the others down), then the end-to-end default run, then prints one table with a row
per figure (value, the peer or machine limit it is compared to, the ratio, the target, pass/miss)
and writes bench/results.json with the machine description and every sub-result.

    python -m bench --quick     # 6.5-7.1 min measured on 2 idle cores (~12 min under heavy load)
    python -m bench             # full sub-benchmarks and the whole default run: ~20-25 min
                                # (estimated from its parts; not timed as a whole)

  generate   bench/generate.py -> results_generate.json  rollout tokens/s vs transformers.generate
  learner    bench/learner.py  -> results_learner.json   GRPO step tokens/s vs transformers + AdamW
  scaling    bench/scaling.py  -> results_scaling.json   1 -> 2 rollout workers, weight sync, async
  dp         bench/dp.py       -> results_dp.json        learner tokens/s with 2 data-parallel ranks vs 1,
             the all-reduce time left after backward vs the measured gloo bandwidth's prediction
  gpu        bench/gpu.py      -> results_gpu.json       bf16 on a CUDA device, 0.5B shape: generation,
             learner and MFU, offloaded-optimizer memory, weight sync (0.5B, 1.5B); only when torch
             sees a CUDA device
  trl        bench/trl_peer.py -> results_trl.json       GRPO steps/min and rollout tok/s vs TRL's
             GRPOTrainer on a real checkpoint; only with --model DIR (or $NANOGRPO_BENCH_MODEL, which
             also adds the real-checkpoint rows of `generate`) and trl installed
  e2e        python launch.py --out TMP (the default run): time to +0.20 held-out success over the
             first eval, and the fraction of the GRPO phase the learner spent waiting for data.
             With --quick the run is stopped cleanly (SIGINT) at that threshold or after 120 s of
             GRPO; without, it runs all its steps (800 by default: ~8-10 min on 2 cores).

A sub-benchmark that fails (non-zero exit, time-out, missing or stale JSON) shows up as a
"failed" row; the suite carries on. Every sub-process inherits this environment plus
PYTHONPATH=<repo root>; the load average before each is recorded, since on a shared 2-core
machine other jobs change wall-clock figures (the learner benchmark also reports CPU-time ratios).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# name -> (module, results file, time limit in seconds: quick, full). The limits are safety nets at
# ~3x the time on 2 idle cores (generate/learner/scaling --quick: ~1.5 min each), so a sub-benchmark
# slowed by other jobs on a shared machine still finishes.
SUBS = {
    "generate": ("bench.generate", "results_generate.json", (480, 1200)),  # + the real checkpoint with --model
    "learner": ("bench.learner", "results_learner.json", (300, 900)),
    "scaling": ("bench.scaling", "results_scaling.json", (480, 1200)),
    "dp": ("bench.dp", "results_dp.json", (300, 900)),  # --quick: about a minute on 2 idle cores
    "gpu": ("bench.gpu", "results_gpu.json", (900, 1800)),  # only where torch sees a CUDA device
    # only with a real checkpoint (--model or $NANOGRPO_BENCH_MODEL) and trl installed
    "trl": ("bench.trl_peer", "results_trl.json", (900, 2400)),
}
E2E_LIMIT_S = 1800
KILL_GRACE_S = 60  # after a time limit's SIGINT, before SIGKILL
# --quick: the default run is stopped cleanly at the threshold or after this much GRPO time.
E2E_QUICK_CAP_S = 120
# The success threshold of the end-to-end run: first eval >= initial eval + this.
E2E_GAIN = 0.20
# Targets, one place: (comparison, bound). ">=" means the ratio must be at least the bound.
TARGETS = {
    "generate_speedup": (">=", 3.0),       # our sampler vs transformers.generate, same work (fp32 and --dtype auto)
    "refill_speedup": (">=", 1.0),         # continuous refill vs chunked batches, long-tailed lengths
    "trl_steps_per_min": (">=", 10.0),     # GRPO steps/min vs TRL's GRPOTrainer, same settings
    "learner_speedup": (">=", 1.0),        # our GRPO step vs transformers + torch AdamW, same batches
    "ckpt_time": ("<=", 1.5),              # one extra forward per step should cost <= +50%
    "ckpt_mem": ("<=", 0.75),              # ... and buy at least a quarter of the step's peak memory
    "rollout_scaling": (">=", 1.8),        # 2 workers vs 1 on 2 cores
    "dp_speedup": (">=", 1.6),             # 2 learner ranks vs 1 on 2 cores
    "dp_allreduce": ("<=", 1.0),           # what backward does not hide of the gradient all-reduce
    "publish_load": ("<=", 2.0),           # publish + load one version vs one local memcpy
    "async_speedup": (">=", 1.5),          # steps/min with staleness 1 vs 0
    "e2e_reach": ("<=", 1.0),              # time to threshold / GRPO wall: reached within the run
    "e2e_idle": ("<=", 0.5),               # learner waits for data at most half the GRPO phase
    "gpu_generate_speedup": (">=", 3.0),   # bf16 on the GPU, 0.5B shape
    "gpu_learner_speedup": (">=", 1.0),
    "gpu_offload_mem": ("<=", 0.40),       # CPUOffloadAdamW step peak vs torch.optim.AdamW's
}


# ----------------------------------------------------------------------------- machine
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    cuda = None
    if torch.cuda.is_available():
        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": cuda, "platform": platform.platform()}


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------------- sub-processes
def run_streamed(cmd: list[str], limit_s: float, log_path: Path, echo: bool,
                 watch=None) -> tuple[int | None, float, str]:
    """Run cmd in the repo root, tee its output (stdout + stderr) to log_path and, if echo, to our
    stdout with a prefix. watch(elapsed_s) -> True sends the child one SIGINT (a clean stop).
    At limit_s it gets SIGINT, KILL_GRACE_S later SIGKILL (with its process group).
    -> (exit code, or None if it ran past limit_s; wall seconds; last non-empty line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    last = [""]
    # Own process group, so a hard kill also takes down what it started (e.g. a local Ray cluster).
    with log_path.open("w") as log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                                     start_new_session=True) as proc:
        def pump():
            for line in proc.stdout:
                log.write(line)
                if line.strip():
                    last[0] = line.strip()
                if echo:
                    print("    | " + line.rstrip()[:200], flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out, interrupted = False, False
        try:
            while True:
                try:
                    proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.perf_counter() - t0
                    if elapsed > limit_s + KILL_GRACE_S:
                        os.killpg(proc.pid, signal.SIGKILL)
                    elif elapsed > limit_s and not timed_out:
                        timed_out = True  # ask first (a clean stop), kill after the grace period
                        proc.send_signal(signal.SIGINT)
                    elif watch is not None and not interrupted and watch(elapsed):
                        interrupted = True
                        proc.send_signal(signal.SIGINT)
        except KeyboardInterrupt:  # our Ctrl-C does not reach a child in its own session: pass it on
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=KILL_GRACE_S)
            raise
        reader.join(timeout=10)
    return (None if timed_out else proc.returncode), time.perf_counter() - t0, last[0]


def run_sub(name: str, quick: bool, logs: Path) -> dict:
    module, fname, limits = SUBS[name]
    limit = limits[0] if quick else limits[1]
    out = BENCH / fname
    cmd = [sys.executable, "-m", module] + (["--quick"] if quick else [])
    load = loadavg()
    print(f"\n== {name}: {' '.join(cmd[1:])} (limit {limit}s, load average {load})", flush=True)
    started = time.time()
    rc, wall, last = run_streamed(cmd, limit, logs / f"{name}.log", echo=True)
    res = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(wall, 1), "last_line": last,
           "load_before": load, "log": str(logs / f"{name}.log")}
    result, why = None, None
    if rc is None:
        why = f"timed out after {limit}s"
    elif rc != 0:
        why = f"exit code {rc}"
    elif not out.is_file() or out.stat().st_mtime < started:
        why = f"{out.name} was not written by this run"
    else:
        try:
            result = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as e:
            why = f"{out.name} unreadable: {e}"
    res["result"], res["error"] = result, why
    print(f"== {name}: {'ok' if why is None else 'FAILED (' + why + ')'} in {wall:.0f}s", flush=True)
    return res


# ----------------------------------------------------------------------------- end to end
def read_evals(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, wall_time, eval_success) of every eval row in metrics.csv so far (step 0 first)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [(int(r["step"]), float(r["wall_time"]), float(r["eval_success"]))
                for r in csv.DictReader(f) if r.get("eval_success")]


def first_hit(evals, threshold):
    return next(((s, t, e) for s, t, e in evals[1:] if e >= threshold - 1e-9), None)


def end_to_end(logs: Path, keep: bool, cap_s: float | None) -> dict:
    """The default run as a user starts it; figures from its metrics.csv and summary.json.

    cap_s (--quick): stop the run cleanly (SIGINT: launch.py saves a checkpoint and writes its
    summary) once it reaches the threshold or after cap_s seconds of its GRPO phase, whichever comes
    first; the learner-idle fraction is then over the part that ran. None: run it to the end.
    """
    tmp = Path(tempfile.mkdtemp(prefix="nanogrpo-bench-"))
    run_dir = tmp / "run"
    cmd = [sys.executable, "launch.py", "--out", str(run_dir)]
    load = loadavg()
    cap = f"stopped at the threshold or after {cap_s:.0f}s of GRPO" if cap_s else "run to the end"
    print(f"\n== e2e: python launch.py --out {run_dir} (the default run, {cap}; limit {E2E_LIMIT_S}s, "
          f"load average {load})", flush=True)
    grpo_start = []

    def watch(elapsed: float) -> bool:
        evals = read_evals(run_dir)
        if not evals:  # still starting up or in the supervised warm start: never interrupt there
            return False
        if not grpo_start:
            grpo_start.append(elapsed)
        hit = len(evals) > 1 and first_hit(evals, evals[0][2] + E2E_GAIN)
        return bool(hit) or elapsed - grpo_start[0] > cap_s

    rc, wall, last = run_streamed(cmd, E2E_LIMIT_S, logs / "e2e.log", echo=False, watch=watch if cap_s else None)
    res = {"cmd": f"python launch.py --out {run_dir}", "cap_s": cap_s, "rc": rc, "process_wall_s": round(wall, 1),
           "last_line": last, "load_before": load, "log": str(logs / "e2e.log"),
           "run_dir": str(run_dir) if keep else None}
    try:
        if rc != 0:
            raise RuntimeError(f"timed out after {E2E_LIMIT_S}s" if rc is None else f"exit code {rc}: {last}")
        summary = json.loads((run_dir / "summary.json").read_text())
        with (run_dir / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        evals = read_evals(run_dir)
        if not evals:
            raise RuntimeError("metrics.csv has no eval_success values")
        e0 = evals[0][2]
        threshold = e0 + E2E_GAIN
        hit = first_hit(evals, threshold)
        grpo_wall = float(summary["wall_seconds"])
        idle = sum(float(r["learner_idle_s"]) for r in rows if r.get("learner_idle_s"))
        res.update({
            "steps": summary["steps"], "stopped_early": bool(summary.get("interrupted")), "grpo_wall_s": grpo_wall,
            "eval_first": e0, "eval_best": max(e for _, _, e in evals), "eval_last": evals[-1][2],
            "threshold": threshold, "reached": hit is not None,
            "reached_step": hit[0] if hit else None, "reached_wall_s": hit[1] if hit else None,
            "learner_idle_s": idle, "learner_idle_frac": idle / grpo_wall if grpo_wall > 0 else None,
            "evals": [{"step": s, "wall_time": t, "eval_success": e} for s, t, e in evals],
        })
        early = ", stopped early" if res["stopped_early"] else ""
        print(f"== e2e: ok in {wall:.0f}s ({summary['steps']} steps{early}): eval {e0:.3f} -> best {res['eval_best']:.3f}, threshold {threshold:.3f} "
              f"{'reached at step %d (%.0fs)' % hit[:2] if hit else 'not reached'}, "
              f"learner idle {idle:.0f}s of {grpo_wall:.0f}s", flush=True)
        res["error"] = None
    except (OSError, RuntimeError, KeyError, ValueError, json.JSONDecodeError) as e:
        res["error"] = str(e)
        print(f"== e2e: FAILED ({e}); log: {logs / 'e2e.log'}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- the table
def verdict(key: str, ratio: float | None) -> tuple[str, str]:
    op, bound = TARGETS[key]
    target = f"{op} {bound:.2f}x"
    if ratio is None:
        return target, "miss"
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return target, "pass" if ok else "miss"


def _generate_rows(res: dict, add):
    auto = res.get("auto_dtype", "torch.float32").removeprefix("torch.")
    for r in res["rows"]:
        w = f"{r['workload']} {r['dtype']}"
        # The targets hold in fp32 and in the dtype --dtype auto picks here; bf16 where it is
        # emulated is for information.
        add(f"rollout tok/s, {w}", f"{r['ours_tok_s']:.0f}", f"transformers {r['hf_tok_s']:.0f}",
            r["speedup"], "generate_speedup" if r["dtype"] in ("float32", auto) else None)
        add(f"rollout FLOP/s, {w}", f"{r['ours_gflops']:.1f} GFLOP/s",
            f"matmul peak {r['peak_gflops']:.0f}", r["frac_of_peak"], pct=True)
    for d in res.get("decode_bandwidth", []):
        add(f"{d['workload']} {d['dtype']} memory bandwidth", f"{d['decode_GBps']:.1f} GB/s",
            f"copy {d['copy_GBps']:.1f} GB/s", d["frac_of_copy"], pct=True,
            note=f"{d['decode_tok_s']:.1f} tok/s")
    for r in res.get("refill", []):
        add(f"rollout tok/s with refill, {r['workload']} {r['dtype']}, {r['rows_limit']} rows",
            f"{r['refill_tok_s']:.0f}", f"chunked {r['chunked_tok_s']:.0f}", r["refill_speedup"], "refill_speedup",
            f"lengths p10/p50/p90 {r['length_p10_p50_p90']}")


def _trl_rows(res: dict, add):
    o, t = res["ours"], res["trl"]
    add("GRPO steps/min vs TRL GRPOTrainer", f"{o['steps_per_min']:.2f}", f"TRL {t['steps_per_min']:.3f}",
        res["steps_per_min_ratio"], "trl_steps_per_min",
        f"first-step reward {o['first_reward']:.3f} vs {t['first_reward']}, loss {o['first_loss']} vs {t['first_loss']}")
    add("rollout tok/s vs TRL GRPOTrainer", f"{o['rollout_tok_s']:.0f}", f"TRL {t['rollout_tok_s']:.0f}",
        res["rollout_tok_s_ratio"])


def _learner_rows(res: dict, add):
    for r in res["rows"]:
        w = f"{r['workload']} {r['dtype']}"
        add(f"learner tok/s (completion / total), {w}",
            f"{r['ours_completion_tok_s']:.0f} / {r['ours_total_tok_s']:.0f}",
            f"transformers {r['peer_completion_tok_s']:.0f} / {r['peer_total_tok_s']:.0f}",
            r["speedup"], "learner_speedup",
            f"cpu-time ratio {r['speedup_cpu_time']:.2f}x"
            + ("; wall and CPU-time ratios disagree (disturbed)" if r.get("disturbed") else ""))
        add(f"learner FLOP/s, {w}", f"{r['ours_gflops']:.1f} GFLOP/s",
            f"matmul peak {r['peak_gflops']:.0f}", r["ours_frac_of_peak"], pct=True)
        if "ckpt_time_ratio" in r:
            add(f"grad checkpointing step time, {r['workload']}", f"{r['ckpt_on_s']:.2f} s",
                f"off {r['ckpt_off_s']:.2f} s", r["ckpt_time_ratio"], "ckpt_time")
        if "ckpt_mem_ratio" in r:
            add(f"grad checkpointing peak memory, {r['workload']}", f"{r['peak_mem_ours_ckpt_MiB']:.0f} MiB",
                f"off {r['peak_mem_ours_MiB']:.0f} MiB", r["ckpt_mem_ratio"], "ckpt_mem",
                f"peer {r['peak_mem_peer_MiB']:.0f} MiB; {r['mem_method']}")


def _scaling_rows(res: dict, add):
    ro, ws, asy = res["rollout"], res["weight_sync"], res["async"]
    add("rollout tok/s, 2 workers", f"{ro['tokens_per_s_2_workers']:.0f}",
        f"1 worker {ro['tokens_per_s_1_worker']:.0f}", ro["scaling_1_to_2"], "rollout_scaling")
    for n in (1, 2, 4):
        if f"publish_load_s_{n}_workers" in ws:
            add(f"publish+load 0.5B bf16, {n} worker(s)", f"{1e3 * ws[f'publish_load_s_{n}_workers']:.0f} ms",
                f"memcpy {1e3 * ws['memcpy_s']:.0f} ms", ws[f"vs_memcpy_{n}_workers"], "publish_load")
    for name, what, key in (("disjoint", "1 worker + learner, a core each", "async_speedup"),
                            ("shared", "2 workers + learner on 2 cores", None)):
        add(f"steps/min, max-staleness 1, {what}", f"{asy[f'{name}_k1_steps_per_min']:.0f}",
            f"staleness 0: {asy[f'{name}_k0_steps_per_min']:.0f}", asy[f"{name}_async_speedup"], key,
            f"learner idle {asy[f'{name}_k1_learner_idle_frac']:.0%} vs {asy[f'{name}_k0_learner_idle_frac']:.0%}"
            + (f"; overlap bound {asy[f'{name}_overlap_bound']:.2f}x" if f"{name}_overlap_bound" in asy else ""))


def _dp_rows(res: dict, add):
    one, two = res["n1"], res["n2"]
    add("learner tok/s, 2 data-parallel ranks (gloo, 1 thread each)", f"{two['tokens_per_s']:.0f}",
        f"1 rank {one['tokens_per_s']:.0f}", res["speedup_2_vs_1"], "dp_speedup")
    add("all-reduce left after backward, 2 ranks", f"{1e3 * two['allreduce_wait_s']:.1f} ms",
        f"unoverlapped {1e3 * two['allreduce_predicted_s']:.1f} ms ({two['gloo_bytes_per_s'] / 2**30:.2f} GiB/s)",
        res["allreduce_wait_vs_predicted"], "dp_allreduce")


def _gpu_rows(res: dict, add):
    g, lr, mem = res["generate"], res["learner"], res["optimizer_memory"]
    add(f"GPU rollout tok/s, {g['workload']} bf16", f"{g['ours_tok_s']:.0f}", f"transformers {g['hf_tok_s']:.0f}",
        g["speedup"], "gpu_generate_speedup")
    add("GPU rollout FLOP/s", f"{g['ours_gflops'] / 1e3:.1f} TFLOP/s", f"bf16 peak {g['peak_gflops'] / 1e3:.0f}",
        g["frac_of_peak"], pct=True)
    add("GPU learner completion tok/s", f"{lr['ours_completion_tok_s']:.0f}",
        f"transformers {lr['peer_completion_tok_s']:.0f}", lr["speedup"], "gpu_learner_speedup",
        f"MFU {lr['ours_mfu']:.1%} vs {lr['peer_mfu']:.1%}")
    if mem["ratio"] is not None:
        add("GPU step peak memory, CPUOffloadAdamW", f"{mem['offload_peak_bytes'] / 2**30:.2f} GiB",
            f"torch AdamW {mem['peer_peak_bytes'] / 2**30:.2f} GiB", mem["ratio"], "gpu_offload_mem")
    for shape, w in res["weight_sync"].items():
        for n in (1, 2):
            add(f"GPU publish+load {shape}, {n} worker(s)", f"{1e3 * w[f'publish_load_s_{n}_workers']:.0f} ms",
                f"D2H+H2D {1e3 * w['round_trip_s']:.0f} ms", w[f"vs_round_trip_{n}_workers"])


def _e2e_rows(e2e: dict, add):
    reach = e2e["reached_wall_s"]
    budget = e2e["cap_s"] or e2e["grpo_wall_s"]
    add(f"e2e time to eval >= {e2e['threshold']:.3f} (first {e2e['eval_first']:.3f} + {E2E_GAIN:.2f})",
        f"{reach:.0f} s (step {e2e['reached_step']})" if e2e["reached"] else "not reached",
        f"GRPO {'cap' if e2e['cap_s'] else 'wall'} {budget:.0f} s",
        reach / budget if e2e["reached"] else None, "e2e_reach",
        f"best eval {e2e['eval_best']:.3f} in {e2e['steps']} steps")
    add("e2e learner waiting for data", f"{e2e['learner_idle_s']:.0f} s",
        f"GRPO wall {e2e['grpo_wall_s']:.0f} s", e2e["learner_idle_frac"], "e2e_idle",
        "stopped early (--quick)" if e2e["stopped_early"] else "")


PARTS = {  # name -> (rows from its result, what the failed row says it measures)
    "generate": (_generate_rows, "rollout tokens/s vs transformers.generate"),
    "learner": (_learner_rows, "GRPO step tokens/s vs transformers + AdamW"),
    "scaling": (_scaling_rows, "rollout workers, weight sync, async"),
    "dp": (_dp_rows, "data-parallel learner ranks, all-reduce"),
    "gpu": (_gpu_rows, "bf16 generation, learner, offload memory, weight sync on the GPU"),
    "trl": (_trl_rows, "GRPO steps/min vs TRL's GRPOTrainer"),
    "e2e": (_e2e_rows, "the default run"),
}


def table_rows(subs: dict, e2e: dict | None) -> list[dict]:
    """One row per figure; a part that failed, or whose JSON lacks a key we read, becomes one
    "failed" row naming why, so a sub-benchmark changing its output never crashes the suite."""
    rows = []

    def add(name, value, peer, ratio, key=None, note="", pct=False):
        target, ok = verdict(key, ratio) if key else ("-", "info")
        rows.append({"figure": name, "value": value, "vs": peer,
                     "ratio": None if ratio is None else round(ratio, 4), "pct": pct, "target": target,
                     "result": ok, "note": note})

    results = {k: (v["result"], v["error"]) for k, v in subs.items()}
    if e2e is not None:
        results["e2e"] = (None if e2e.get("error") else e2e, e2e.get("error"))
    for name, (res, error) in results.items():
        build, what = PARTS[name]
        start = len(rows)
        if res is not None:
            try:
                build(res, add)
                continue
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                del rows[start:]
                error = f"unexpected results format: {type(e).__name__}: {e}"
        rows.append({"figure": f"{name} ({what})", "value": "failed", "vs": "", "ratio": None, "target": "",
                     "result": "failed", "note": error})
    return rows


def fmt_ratio(r: dict) -> str:
    if r["ratio"] is None:
        return ""
    return f"{100 * r['ratio']:.1f}%" if r.get("pct") else f"{r['ratio']:.2f}x"


def print_table(rows: list[dict]) -> str:
    head = ("figure", "value", "compared to", "ratio", "target", "result")
    body = [(r["figure"], r["value"], r["vs"], fmt_ratio(r), r["target"], r["result"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="quick sub-benchmarks (suite < 10 min on 2 cores)")
    ap.add_argument("--only", nargs="+", choices=list(SUBS) + ["e2e"], help="run only these parts")
    ap.add_argument("--keep-run", action="store_true", help="keep the end-to-end run directory")
    ap.add_argument("--model", default=os.environ.get("NANOGRPO_BENCH_MODEL"),
                    help="a real checkpoint directory: adds its generation rows and the TRL peer benchmark")
    ap.add_argument("--out", default=str(BENCH / "results.json"))
    args = ap.parse_args()
    parts = args.only or list(SUBS) + ["e2e"]
    t0 = time.perf_counter()
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB, torch {mach['torch']}, "
          f"CUDA {mach['cuda'] or 'none'}; load average {loadavg()}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="nanogrpo-bench-logs-"))
    subs = {}
    if args.model:
        os.environ["NANOGRPO_BENCH_MODEL"] = str(Path(args.model).resolve())  # the sub-benchmarks read it
    for name in SUBS:
        if name == "gpu" and not mach["cuda"]:
            continue  # the CPU suite; bench.gpu needs a CUDA device
        if name == "trl" and not (args.model and importlib.util.find_spec("trl")):
            print("\n== trl: skipped (needs --model DIR and trl: pip install -e '.[bench]')", flush=True)
            continue
        if name in parts:
            subs[name] = run_sub(name, args.quick, logs)
    e2e = end_to_end(logs, args.keep_run, E2E_QUICK_CAP_S if args.quick else None) if "e2e" in parts else None
    rows = table_rows(subs, e2e)
    total = time.perf_counter() - t0
    print(f"\n== nanogrpo benchmark suite ({'--quick' if args.quick else 'full'}), {total / 60:.1f} min; "
          f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, CUDA {mach['cuda'] or 'none'}")
    table = print_table(rows)
    result = {"machine": mach, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "suite_wall_s": round(total, 1), "load_after": loadavg(), "logs": str(logs), "targets": TARGETS,
              "table": rows, "table_text": table, "sub_benchmarks": subs, "e2e": e2e}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    n_fail = sum(r["result"] == "failed" for r in rows)
    n_miss = sum(r["result"] == "miss" for r in rows)
    print(f"\nwrote {args.out} (logs in {logs}); {len(rows)} figures, {n_miss} missed targets, {n_fail} failed parts")


if __name__ == "__main__":
    main()
