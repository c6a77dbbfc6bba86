"""launch.py as a user runs it: --help pairs every flag with its own full help text and default,
and the run stops after exactly --max-skipped-steps consecutive non-finite steps."""
import csv
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from nanogrpo.runconfig import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, timeout=600, extra_path=""):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra_path) if p),
           "OMP_NUM_THREADS": "1", "COLUMNS": "10000"}  # no wrapping: one line per flag
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def help_blocks(text: str) -> dict[str, str]:
    """--help's options section -> {flag: the text printed beside it}, whitespace-normalised."""
    blocks, cur = {}, None
    for line in text.split("\n"):
        m = re.match(r"^  (--[a-z0-9-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if m:
            cur = m[1]
            blocks[cur] = m[2] or ""
        elif cur and line.startswith("    "):
            blocks[cur] += " " + line.strip()
        else:
            cur = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_help_pairs_each_flag_with_its_own_full_help_and_default():
    """Guards against help texts shifted by one flag (each flag described by its neighbour's text),
    truncated help, and a default shown for the wrong flag: the text printed beside each flag must
    be exactly that field's help followed by its own default, printed once (a help that already
    says its default gets no second one)."""
    out = launch("--help", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    blocks = help_blocks(out.stdout)
    names = {"--" + f.name.replace("_", "-") for f in fields(RunConfig)}
    assert names <= set(blocks), names - set(blocks)
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata["help"]
        want = h if "(default" in h or "default:" in h else f"{h} (default: {f.default})"
        assert blocks[flag] == " ".join(want.split()), flag
        assert blocks[flag].count("default") <= h.count("default") + 1, flag


# A task whose every reward is NaN: every step's loss and gradient are non-finite.
NAN_TASK = '''
from nanogrpo.tasks import Task, load_task
def make(data=None, seed=0):
    base = load_task("arithmetic", seed=seed)
    return Task("nan", base.train[:64], base.test[:8], base.messages,
                lambda text, ex: {"format": 0.0, "answer": 0.0, "total": float("nan")}, "", 8)
'''


def test_run_aborts_after_exactly_max_skipped_steps(tmp_path):
    """Guards against the abort check being off by one (`>` instead of `>=`: one more poisoned step
    than --max-skipped-steps allows) or missing (a run that never learns again runs on): with every
    step non-finite and --max-skipped-steps 2 the run stops with exit code 1 after step 2, the
    weights untouched, and says why."""
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    run = tmp_path / "run"
    out = launch("--task", "nan_task:make", "--out", str(run), "--steps", "8", "--prompts-per-step", "2",
                 "--group-size", "2", "--sft-steps", "0", "--eval-every", "0", "--save-every", "0",
                 "--max-staleness", "0", "--max-skipped-steps", "2", "--num-rollout-workers", "1",
                 timeout=600, extra_path=str(tmp_path))
    assert out.returncode == 1, out.stderr[-3000:]
    assert "2 consecutive steps had a non-finite loss or gradient" in out.stderr
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("skipped_step")]
    assert [(int(r["step"]), float(r["skipped_step"])) for r in rows] == [(1, 1.0), (2, 1.0)]
