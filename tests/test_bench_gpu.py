"""bench/gpu.py has no GPU here: run its code on the CPU with the tiny shape, so a GPU session
finds a script that works rather than one that was never run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "results_gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--shape", "tiny", "--quick",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    gen, lrn = r["generate"], r["learner"]
    # Both engines generated real work, and the ratio is theirs.
    assert gen["ours_tokens"] > 0 and gen["hf_tokens"] > 0
    assert abs(gen["speedup"] - gen["ours_tok_s"] / gen["hf_tok_s"]) < 1e-9
    # On the CPU both learner sides train the same fp32 weights on the same batch: the first
    # step's gradient norms must agree, or the two sides are not the same computation.
    assert lrn["grad_norm_rel_diff"] < 1e-3, lrn
    assert lrn["ours_s"] > 0 and lrn["peer_s"] > 0 and 0 < lrn["ours_mfu"] < 1
    # The memory comparison ran its steps; there is no peak to read on a CPU.
    assert r["optimizer_memory"]["ratio"] is None
    s = r["weight_sync"]["tiny"]
    assert s["state_bytes"] > 0 and s["publish_load_s_1_workers"] > 0 and s["publish_load_s_2_workers"] > 0
    figures = [row["figure"] for row in r["table"]]
    assert figures[0].startswith("generation") and any("publish+load" in f for f in figures)


def test_gpu_bench_refuses_cuda_without_a_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: bench.gpu would run")
    p = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
