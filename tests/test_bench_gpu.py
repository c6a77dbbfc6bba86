"""bench/gpu.py without a GPU: its code run on the CPU with the tiny shape, so a GPU session finds
a script that works rather than one that was never run.

Nothing here depends on the CPU model: no speed, MFU or peak is bounded (an AVX2-only CPU emulates
bf16 and is several times slower than an AMX one). What is checked is what the bench computes:
that its two learner sides are the same computation, that every figure it reports is a measured
finite ratio, and that it refuses a device it would silently not use."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_timed_steps_times_only_the_steps_after_the_first():
    """Guards against timing the first (kernel JIT, optimizer-state allocation) step, timing a
    different number of steps than asked, or reporting a later step's gradient norm as the first's."""
    pytest.importorskip("transformers")
    from bench.gpu import timed_steps

    calls = []

    def step(x):
        calls.append(x)
        return {"grad_norm": float(len(calls))}

    grad_norm, times = timed_steps(step, ("batch",), reps=3, device="cpu")
    assert calls == ["batch"] * 4 and grad_norm == 1.0
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_gpu_bench_runs_on_cpu(tmp_path):
    """Guards against a bench that crashes where it was never run, learner sides that train
    different things (their first-step gradient norms must agree on the same fp32 weights and
    batch), a figure that is missing, NaN or not a ratio, and a memory row invented on a CPU
    (which keeps no peak statistics)."""
    pytest.importorskip("transformers")
    out = tmp_path / "results_gpu.json"
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--shape", "tiny", "--quick",
                        "--out", str(out)], cwd=ROOT, env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    gen, lrn, mem = r["generate"], r["learner"], r["optimizer_memory"]
    assert gen["ours_tokens"] > 0 and gen["hf_tokens"] > 0
    # Same weights, same batch, fp32 on both sides: one computation, so the norms agree closely.
    assert lrn["first_step_grad_norm_ours"] > 0
    assert lrn["grad_norm_rel_diff"] < 1e-3, lrn
    assert len(lrn["ours_s_all"]) == 2 and len(lrn["peer_s_all"]) == 2  # --quick: 2 timed steps each
    assert lrn["completion_tokens"] < lrn["total_tokens"]
    assert mem["ratio"] is None and mem["offload_peak_bytes"] is None and mem["peer_peak_bytes"] is None
    assert set(r["weight_sync"]) == {"tiny"}
    figures = [row["figure"] for row in r["table"]]
    assert figures == ["generation tok/s vs transformers.generate", "generation FLOP/s / bf16 matmul peak",
                       "learner tok/s vs transformers + torch AdamW", "learner MFU",
                       "weight publish+load tiny, 1 worker(s) vs round trip",
                       "weight publish+load tiny, 2 worker(s) vs round trip"]
    for row in r["table"]:
        assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["figure"] in p.stdout  # the printed table shows every figure the JSON holds


def test_gpu_bench_refuses_cuda_without_a_gpu():
    """Guards against the default (--device cuda) run falling back to the CPU and writing CPU
    figures into results_gpu.json as if they were the GPU's."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: bench.gpu would run")
    p = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.gpu
def test_gpu_bench_refuses_a_cpu_run_while_cuda_is_visible():
    """Guards against a `--device cpu` run whose learner still trains on the visible GPU (the
    learner picks CUDA whenever it is there), mixing devices in one comparison."""
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CUDA device is visible" in p.stderr
