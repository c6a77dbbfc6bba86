"""Fault injection: killed workers, a killed driver, crashes mid-checkpoint, non-finite gradients."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from nanogrpo.checkpoint import check_run_checkpoint, latest_run_checkpoint, save_run_checkpoint
from nanogrpo.model import Qwen2
from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]

# A 16-prompt task so that 8 prompts per step make every second step an epoch boundary.
SMALL_TASK = '''
from nanogrpo.tasks import Task, load_task
def make(data=None, seed=0):
    base = load_task("arithmetic", seed=seed)
    return Task("small", base.train[:16], base.test[:16], base.messages, base.score, "", 8)
'''


def start(args, tmp_path, **kw):
    (tmp_path / "small_task.py").write_text(SMALL_TASK)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def step_rows(run_dir: Path) -> list[dict]:
    try:
        return [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("reward_mean")]
    except (FileNotFoundError, KeyError):
        return []


def session_pids(sid: int, name: str) -> list[int]:
    """Processes of one launch session whose command line starts with `name` (e.g. ray::RolloutWorker)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid and (d / "cmdline").read_bytes().startswith(name.encode()):
                    out.append(int(d.name))
            except (OSError, ProcessLookupError):
                continue
    return sorted(out)


def kill_session(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_rollout_worker_sigkill_twice(tmp_path):
    """Guards against a dead rollout worker taking the run down, a restarted worker generating
    with stale initial weights forever, and episodes lost in the accounting."""
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--steps", "600", "--prompts-per-step", "4", "--group-size", "4",
               "--sft-steps", "0", "--eval-every", "0", "--save-every", "0", "--quiet", "true"], tmp_path)
    try:
        wait_for(lambda: len(step_rows(run_dir)) >= 5, 180, "5 steps")
        seen = set(session_pids(p.pid, "ray::RolloutWorker"))
        assert len(seen) == 2
        victim = sorted(seen)[0]
        for i in range(2):
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(set(session_pids(p.pid, "ray::RolloutWorker")) - seen) > 0, 120, "a restarted worker")
            victim = (set(session_pids(p.pid, "ray::RolloutWorker")) - seen).pop()  # kill the new one next
            seen.add(victim)
            # The driver has counted this death, and the new process is past its start-up (a kill
            # during start-up would be the same outage, not a second restart).
            wait_for(lambda: any(int(r["worker_restarts"] or 0) > i for r in step_rows(run_dir)) or p.poll() is not None,
                     180, "the driver to count the restart")
            n = len(step_rows(run_dir))
            time.sleep(15)
            wait_for(lambda: len(step_rows(run_dir)) >= n + 10 or p.poll() is not None, 180, "progress after restart")
        assert p.poll() is None, "the run ended before both restarts were seen"
        p.send_signal(signal.SIGINT)  # the rest of the 600 steps would only cost time: a clean stop
        out, err = p.communicate(timeout=300)
    finally:
        kill_session(p)
    assert p.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == len(step_rows(run_dir)) > n + 10
    assert [int(r["step"]) for r in step_rows(run_dir)] == list(range(1, summary["steps"] + 1))
    assert summary["worker_restarts"] == 2, out[-3000:]
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"]


COMMON = ["--task", "small_task:make", "--steps", "8", "--prompts-per-step", "8", "--group-size", "4",
          "--sft-steps", "10", "--max-staleness", "0", "--save-every", "2", "--keep-last", "10", "--eval-every", "0",
          "--seed", "3", "--quiet", "true", "--dtype", "fp32"]


@pytest.mark.slow
def test_driver_sigkill_then_resume_reproduces(tmp_path):
    """Guards against resumes that reload the initial weights into workers, skip or repeat data
    (every checkpoint here sits at an epoch boundary), or diverge from the uninterrupted run."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = start(["--out", str(ref_dir), *COMMON], tmp_path)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]

    cut = start(["--out", str(cut_dir), *COMMON], tmp_path)
    try:
        wait_for(lambda: (cut_dir / "checkpoints" / "step-000004" / "MANIFEST.json").exists(), 300, "checkpoint 4")
    finally:
        kill_session(cut)  # SIGKILL the driver and its local Ray cluster
    resumed_from = latest_run_checkpoint(cut_dir)
    k = int(resumed_from.name.split("-")[1])
    assert 4 <= k < 8
    res = start(["--resume", str(cut_dir)], tmp_path)
    out, err = res.communicate(timeout=600)
    assert res.returncode == 0, err[-3000:]
    a = {int(r["step"]): r for r in step_rows(ref_dir)}
    b = {int(r["step"]): r for r in step_rows(cut_dir)}
    assert sorted(b) == list(range(1, 9))
    for s in range(k + 1, 9):
        for col in ("reward_mean", "success_rate", "loss", "entropy", "grad_norm", "response_len"):
            assert float(a[s][col]) == pytest.approx(float(b[s][col]), rel=1e-4, abs=1e-6), (s, col)
    assert float(b[8]["logprob_gap"]) < 1e-3  # workers run the resumed weights, not the initial ones


def tiny_model():
    return Qwen2.from_config(TINY_MODEL_CONFIG, seed=0)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """Guards against a crash mid-save destroying the last good checkpoint or leaving a
    half-written one that a resume would pick up."""
    tok_dir = write_tiny_model_dir(tmp_path / "tok")
    model = tiny_model()
    ckpts = tmp_path / "run" / "checkpoints"
    save_run_checkpoint(ckpts / "step-000001", model, tok_dir, {"state": {}, "param_groups": []}, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="injected"):
        save_run_checkpoint(ckpts / "step-000002", model, tok_dir, {"state": {}}, {"step": 2})
    monkeypatch.undo()
    assert latest_run_checkpoint(tmp_path / "run") == ckpts / "step-000001"
    assert not (ckpts / "step-000002").exists()
    Qwen2.from_pretrained(ckpts / "step-000001")
    # Overwriting the same step and crashing also leaves the old copy intact.
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_run_checkpoint(ckpts / "step-000001", model, tok_dir, {"state": {}}, {"step": 1})
    monkeypatch.undo()
    check_run_checkpoint(ckpts / "step-000001")


def test_truncated_checkpoint_is_detected_and_skipped(tmp_path):
    """Guards against resuming from a checkpoint whose files were truncated (e.g. a full disk)."""
    tok_dir = write_tiny_model_dir(tmp_path / "tok")
    ckpts = tmp_path / "run" / "checkpoints"
    for s in (1, 2):
        save_run_checkpoint(ckpts / f"step-00000{s}", tiny_model(), tok_dir, {"state": {}}, {"step": s})
    f = ckpts / "step-000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors has 1000 bytes"):
        check_run_checkpoint(ckpts / "step-000002")
    assert latest_run_checkpoint(tmp_path / "run") == ckpts / "step-000001"


def test_non_finite_gradient_skips_step_and_leaves_weights(tmp_path):
    """Guards against a NaN batch poisoning the weights: the step is skipped, the weights are
    bitwise unchanged, and the consecutive-skip counter the driver aborts on goes up."""
    from learner.learner import LearnerCore
    from nanogrpo.episode import SCHEMA
    from nanogrpo.runconfig import RunConfig
    from nanogrpo.weights import digest

    model_dir = write_tiny_model_dir(tmp_path / "m")
    tiny_model().save_pretrained(model_dir)
    # NaN sampler log-probs reach the ratio only with --old-logprobs sampler (the learner's own are
    # finite); fp32: a bf16 step can round to no change in the working weights.
    cfg = RunConfig(group_size=2, prompts_per_step=1, max_new_tokens=4, old_logprobs="sampler", dtype="fp32")
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)

    def table(logp):
        rows = [{"group_id": 0, "step": 0, "example_index": 0, "sample_index": i, "prompt_ids": [1, 2, 3],
                 "completion_ids": [4, 5], "logprobs": [logp, logp], "response": "", "reward": float(i),
                 "reward_format": 0.0, "reward_answer": 0.0, "finish_reason": "stop", "policy_version": 0,
                 "worker_id": 0, "gen_seconds": 0.0, "created_at": 0.0} for i in range(2)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    before = digest(core.model)
    for i in range(3):
        m, _ = core.train_step(table(float("nan")))
        assert m["skipped_step"] == 1.0 and m["skipped_in_a_row"] == i + 1
    assert digest(core.model) == before
    m, _ = core.train_step(table(-1.0))
    assert m["skipped_step"] == 0.0 and m["skipped_in_a_row"] == 0
    assert digest(core.model) != before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_with_a_consistent_checkpoint(tmp_path, sig):
    """Guards against Ctrl-C losing work or leaving a checkpoint that disagrees with the run: with
    k = 1 the next learner step is queued while one trains, so an interrupt must let a step whose
    groups were already taken finish and count it, and cancel one still waiting for groups. The run
    starts with SIGINT ignored, as a shell starts a background job (`nohup python launch.py &`).
    SIGTERM (`kill`, `ray job stop`) must stop the same way, not exit on the spot as Ray makes it."""
    run_dir = tmp_path / "run"
    flags = dict(zip(COMMON[::2], COMMON[1::2]), **{"--steps": "400", "--max-staleness": "1", "--save-every": "3"})
    p = start(["--out", str(run_dir), *[x for kv in flags.items() for x in kv]], tmp_path,
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: len(step_rows(run_dir)) >= 7 or p.poll() is not None, 300, "7 logged steps")
        p.send_signal(sig)
        out, err = p.communicate(timeout=300)
    finally:
        kill_session(p)
    assert p.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and 7 <= summary["steps"] < 400
    ckpt = latest_run_checkpoint(run_dir)
    state = json.loads((ckpt / "state.json").read_text())
    # The checkpoint is named for the steps the learner has taken, and every one of them is logged.
    assert ckpt.name == f"step-{summary['steps']:06d}" and state["step"] == state["version"] == summary["steps"]
    assert [int(r["step"]) for r in step_rows(run_dir)] == list(range(1, summary["steps"] + 1))
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"]


def kill_first(sid: int, name: str, timeout: float, poll: float = 0.005) -> int:
    """SIGKILL the first process of the session whose title starts with `name` (Ray titles a
    worker busy in a call `ray::Class.method`), as soon as one shows up. -> its pid."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        pids = session_pids(sid, name)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(poll)
    raise AssertionError(f"no {name} process within {timeout}s")


def finished_run(p, run_dir, steps):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, (out[-3000:], err[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert [int(r["step"]) for r in step_rows(run_dir)] == list(range(1, steps + 1))  # none missing, none twice
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"] + summary["lost"]
    return out, summary


# The held-out set is 256 prompts with 16-token answers, so an eval lasts long enough to be hit.
EVAL_TASK = '''
from nanogrpo.tasks import Task, load_task
def make(data=None, seed=0):
    base = load_task("arithmetic", seed=seed)
    return Task("evalheavy", base.train[:64], base.test[:256], base.messages, base.score, "", 16)
'''
FAULT = ["--prompts-per-step", "4", "--group-size", "4", "--sft-steps", "0", "--seed", "1", "--quiet", "true",
         "--dtype", "fp32", "--sync-timeout", "30"]


@pytest.mark.slow
def test_worker_sigkilled_during_evaluation(tmp_path):
    """Guards against the unsupervised evaluation fan-out: a worker killed inside `evaluate` ended
    the run with ActorUnavailableError. Its eval share must go to a live worker, the death be
    counted once, and every step still finish."""
    (tmp_path / "eval_task.py").write_text(EVAL_TASK)
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "eval_task:make", "--steps", "6", "--eval-every", "2",
               "--save-every", "0", *FAULT], tmp_path)
    try:
        kill_first(p.pid, "ray::RolloutWorker.evaluate", 300)
        out, summary = finished_run(p, run_dir, 6)
    finally:
        kill_session(p)
    assert summary["worker_restarts"] == 1, out[-3000:]
    assert "died" in out and "in evaluate" in out
    assert summary["final_eval"] is True and summary["eval_last"] is not None


@pytest.mark.slow
def test_worker_sigkilled_during_start_up(tmp_path):
    """Guards against the unsupervised start-up wait (`ray.get` over every worker's `ready`): a
    worker that dies while it loads must be restarted, counted once (Ray tells the new process it
    was reconstructed), and the run go on."""
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "small_task:make", "--steps", "4", "--eval-every", "0",
               "--save-every", "0", *FAULT], tmp_path)
    try:
        kill_first(p.pid, "ray::RolloutWorker", 300, poll=0.001)
        out, summary = finished_run(p, run_dir, 4)
    finally:
        kill_session(p)
    assert summary["worker_restarts"] == 1, out[-3000:]


@pytest.mark.slow
def test_learner_sigkilled_after_a_checkpoint_recovers_in_run(tmp_path):
    """Guards against a learner death ending the run (only a manual --resume continued it): the
    driver must rebuild the learner from the last complete checkpoint, redo the steps after it
    (their first rows replaced, not duplicated) and exit 0."""
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "small_task:make", "--steps", "10", "--eval-every", "0",
               "--save-every", "2", "--keep-last", "10", *FAULT], tmp_path)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-000004" / "MANIFEST.json").exists(), 300, "checkpoint 4")
        kill_first(p.pid, "ray::LearnerCore", 30)
        out, summary = finished_run(p, run_dir, 10)
    finally:
        kill_session(p)
    assert summary["learner_restarts"] == 1, out[-3000:]
    assert "learner recovered" in out
    gaps = [float(r["logprob_gap"]) for r in step_rows(run_dir) if r["logprob_gap"]]
    assert max(gaps) < 0.5  # workers run the rebuilt learner's weights (k = 1 leaves a small gap)


@pytest.mark.slow
def test_buffer_actor_killed(tmp_path):
    """Guards against the episode buffer's death ending the run or unbalancing the accounting: it is
    re-created under its name, the steps to come regenerate their groups, and what it held is
    counted as lost."""
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "small_task:make", "--steps", "10", "--eval-every", "0",
               "--save-every", "0", *FAULT], tmp_path)
    try:
        wait_for(lambda: len(step_rows(run_dir)) >= 3, 300, "3 steps")
        kill_first(p.pid, "ray::EpisodeBuffer", 30)
        out, summary = finished_run(p, run_dir, 10)
    finally:
        kill_session(p)
    assert summary["buffer_restarts"] == 1, out[-3000:]
    assert "episode buffer died" in out


@pytest.mark.slow
def test_collective_sync_worker_killed_mid_broadcast(tmp_path):
    """Guards against the collective branch's unsupervised broadcast: a worker killed while it
    receives must not hang the run; the group is rebuilt (the restarted worker included) and the
    broadcast repeated within the timeout, and every step finishes."""
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "small_task:make", "--steps", "40", "--eval-every", "0",
               "--save-every", "0", "--weight-sync", "collective", "--max-staleness", "0",
               *[a if a != "30" else "20" for a in FAULT]], tmp_path)
    try:
        wait_for(lambda: len(step_rows(run_dir)) >= 2, 300, "2 steps")
        pids = session_pids(p.pid, "ray::RolloutWorker")
        hit, t0 = None, time.time()
        while hit is None and time.time() - t0 < 120 and p.poll() is None:
            for pid in pids:  # poll only the two workers' titles: fast enough to land inside a receive
                try:
                    if b".receive" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                        hit = pid
                        break
                except OSError:
                    continue
        assert hit is not None, "never saw a worker inside receive"
        out, summary = finished_run(p, run_dir, 40)
    finally:
        kill_session(p)
    assert summary["worker_restarts"] == 1, out[-3000:]
    assert "rebuilding" in out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigterm_at_a_random_moment_keeps_every_finished_step(tmp_path, seed):
    """Guards against the row of the last trained step missing from metrics.csv although its
    checkpoint was written (a SIGTERM between the learner's result and the row's write). Wherever
    the signal lands, every step the learner finished (the final checkpoint's step) has its row."""
    import random
    delay = random.Random(seed).uniform(2.0, 25.0)
    run_dir = tmp_path / "run"
    p = start(["--out", str(run_dir), "--task", "small_task:make", "--steps", "400", "--eval-every", "3",
               "--save-every", "4", *FAULT], tmp_path)
    try:
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        kill_session(p)
    ckpt = latest_run_checkpoint(run_dir)
    if p.returncode == 130 or ckpt is None:  # it landed before the first step: nothing trained, nothing to keep
        assert step_rows(run_dir) == [], (delay, err[-2000:])
        return
    assert p.returncode == 0, (delay, err[-3000:])
    done = json.loads((ckpt / "state.json").read_text())["step"]
    assert [int(r["step"]) for r in step_rows(run_dir)] == list(range(1, done + 1)), delay
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == done and summary["interrupted"] is True
    assert f"stopped after step {done}" in out
