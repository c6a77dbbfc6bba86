"""The run's lifecycle as a new user meets it: one table row per defect found by trying the
project, each checked through the real entry point (launch.py as a subprocess)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, out.stderr[-2000:]
    for n in needles:
        assert n in err[0], err[0]


def check_failed_validation_creates_nothing(tmp_path):
    for bad in (["--group-size", "1"], ["--task", "countdown", "--data", str(tmp_path / "nope.parquet")]):
        out = launch(*bad, cwd=tmp_path, timeout=120)  # default --out: runs/<task>-<time> under cwd
        assert out.returncode == 2, out.stderr[-2000:]
        assert not (tmp_path / "runs").exists(), bad


def check_errors_name_flags(tmp_path):
    one_line_error(launch("--num-test", "0", "--out", str(tmp_path / "r"), timeout=120), "--num-test")
    one_line_error(launch("--task", "gsm8k", "--out", str(tmp_path / "r"), timeout=120), "--data")


def check_help_prints_each_default_once(tmp_path):
    out = launch("--help", timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for f in ("--num-test", "--max-new-tokens"):
        entry = text.split(f" {f} ")[1].split(" --")[0]
        assert entry.count("default") == 1, entry
    assert "launch.py plot RUN_DIR" in text


def check_tiny_model_countdown_budget(tmp_path):
    # An unreachable --address stops the run right after the plan, where the budget is decided.
    out = launch("--task", "countdown", "--address", "127.0.0.1:1", "--out", str(tmp_path / "r"), timeout=120)
    assert "warning: --task countdown asks for" in out.stdout and "--max-new-tokens 64" in out.stdout, out.stdout


CHEAP = {
    "failed validation leaves no run dir": check_failed_validation_creates_nothing,
    "errors name CLI flags": check_errors_name_flags,
    "--help prints a default once, lists plot": check_help_prints_each_default_once,
    "tiny model + countdown gets a budget that fits": check_tiny_model_countdown_budget,
}


@pytest.mark.parametrize("row", list(CHEAP))
def test_lifecycle_without_training(row, tmp_path):
    """Guards against each defect in the row's name (the issue's lifecycle table): empty run dirs
    left by bad flags, errors naming Python parameters, defaults printed twice in --help, a
    countdown budget the tiny model spends minutes per step on."""
    CHEAP[row](tmp_path)


TINY = ["--task", "arithmetic", "--prompts-per-step", "4", "--group-size", "4", "--sft-steps", "5",
        "--num-test", "8", "--eval-every", "2", "--save-every", "2", "--max-staleness", "0", "--dtype", "fp32",
        "--quiet", "true"]


@pytest.mark.slow
def test_lifecycle_resume(tmp_path):
    """Guards against the resume rows of the table: `--resume RUN --steps N` with N <= steps done
    starting Ray and rewriting config.json; a resume that does not say where it resumes; and a
    summary that holds only the resumed part (the first eval and the best one lost)."""
    run = tmp_path / "run"
    first = launch("--out", str(run), "--steps", "2", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    config = (run / "config.json").read_text()
    again = launch("--resume", str(run), "--steps", "2", timeout=120)
    one_line_error(again, "--steps", "already trained 2 steps")
    assert (run / "config.json").read_text() == config and "Ray" not in again.stdout + again.stderr
    res = launch("--resume", str(run), "--steps", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step 2" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    evals = [(int(r["step"]), float(r["eval_success"])) for r in rows if r["eval_success"]]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert summary["steps"] == 4 and summary["eval_first"] == evals[0][1]
    assert summary["eval_best"] == max(e for _, e in evals) and summary["final_eval"] is True
    assert summary["wall_seconds"] > float(rows[[int(r["step"]) for r in rows].index(2)]["wall_time"])
