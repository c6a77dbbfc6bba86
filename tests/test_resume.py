"""Resume mid-epoch, with and without staleness: the resumed run continues the uninterrupted one.

The run is cut by a clean stop (--steps 3, whose final checkpoint sits at data position 18 of a
16-prompt task: two positions into the second epoch), then resumed with --steps 6, and compared
with one uninterrupted 6-step run. With k = 0 a run is deterministic, so every step's metrics must
match; with k = 1 which policy version generated a group depends on timing, so what must match
exactly is the data: every group id maps to the same step and training example. k = 1 also queues
the learner's next step (a buffer ticket per step), so a resumed buffer whose first ticket is not
the resumed step would never serve a take: the run must finish.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_TASK = '''
from nanogrpo.tasks import Task, load_task
def make(data=None, seed=0):
    base = load_task("arithmetic", seed=seed)
    return Task("small", base.train[:16], base.test[:16], base.messages, base.score, "", 8)
'''


def launch(args, tmp_path):
    (tmp_path / "small_task.py").write_text(SMALL_TASK)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def steps(run: Path) -> dict[int, dict]:
    return {int(r["step"]): r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("reward_mean")}


def data_order(run: Path) -> set[tuple[int, int, int]]:
    """(group_id, step, example_index) of every group generated (a regenerated group appears twice,
    as the same triple)."""
    t = pq.read_table(run / "episodes", columns=["group_id", "step", "example_index"])
    return set(zip(*(t.column(c).to_pylist() for c in ("group_id", "step", "example_index"))))


@pytest.mark.slow
def test_resume_mid_epoch_continues_the_uninterrupted_run(tmp_path):
    """Guards against a resume that restarts at the start of the current epoch (or skips/repeats
    data), a buffer ticket that does not match the resumed step when steps are queued (k = 1:
    the queued take is never served and the run stalls), and a resumed learner version or step
    count off by one. (With k = 0 a resume also reproduces the uninterrupted run's metrics:
    test_faults.py::test_driver_sigkill_then_resume_reproduces.)"""
    k = 1
    common = ["--task", "small_task:make", "--prompts-per-step", "6", "--group-size", "4", "--sft-steps", "10",
              "--max-staleness", str(k), "--save-every", "0", "--eval-every", "0", "--seed", "5", "--quiet", "true",
              "--sync-timeout", "60"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    launch(["--out", str(ref), "--steps", "6", *common], tmp_path)
    launch(["--out", str(cut), "--steps", "3", *common], tmp_path)
    assert (cut / "checkpoints" / "step-000003" / "MANIFEST.json").is_file()
    launch(["--resume", str(cut), "--steps", "6"], tmp_path)

    a, b = steps(ref), steps(cut)
    assert sorted(b) == list(range(1, 7)) == sorted(a)
    state = json.loads((cut / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["step"] == state["version"] == 6
    assert data_order(cut) == data_order(ref)
    assert {s for _, s, _ in data_order(cut)} == set(range(6))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"]
