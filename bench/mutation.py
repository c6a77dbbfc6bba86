"""Mutation score of the tests (a benchmark of the test suite, not part of CI), with mutmut 3.

    pip install mutmut                      # not a project dependency
    flock /tmp/heavy.lock python -m bench.mutation --sample 40            # the current tests
    flock /tmp/heavy.lock python -m bench.mutation --sample 40 --tests-rev 788e9d8   # older tests

For each target (a module, or the functions of one that matter, each with only its relevant test
files) the committed tree (HEAD) is copied into a work directory (mutmut rewrites files: never the
checkout itself), mutmut generates every mutant of the target file and maps tests to functions, and then a
seeded random sample of the target's mutants is run (`--sample 0`: all of them; grpo.py alone has
~540, about 20 minutes on 2 cores). `--tests-rev REV` takes tests/ from another commit, so a before
and after pair measures the same mutants against two test suites; `--inherit-kills-from REV` then
runs only the before run's survivors (its kills stand while its test files are unchanged). mutmut caches verdicts in the
work directory, so a run cut short by `--time-limit` continues where it stopped.

Prints, per target, killed / timeout / survived / no-tests counts and the score
(killed + timeout) / (sampled - no tests); with --show-survivors, each survivor's diff.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# target -> (file to mutate, mutant-name patterns inside it, test files that exercise it)
TARGETS = {
    "grpo": ("nanogrpo/grpo.py", ["nanogrpo.grpo.*"],
             ["tests/test_grpo.py", "tests/test_advantages.py", "tests/test_learner.py", "tests/test_learner_step.py"]),
    "generate": ("nanogrpo/generate.py", ["nanogrpo.generate.*"],
                 ["tests/test_generate.py", "tests/test_sampling.py"]),
    "learner-step": ("learner/learner.py",
                     ["learner.learner.x*LearnerCore*train_step__mutmut_*",
                      "learner.learner.x*LearnerCore*_apply_grads__mutmut_*",
                      "learner.learner.x*LearnerCore*_lr__mutmut_*",
                      "learner.learner.x_micro_batches__mutmut_*"],
                     ["tests/test_learner.py", "tests/test_learner_step.py"]),
    # Only the module-level scoring helpers: mutmut 3's method trampolines break under Ray's wrapping of
    # an actor class's methods (RolloutWorker.__init__ then gets its arguments shifted), so the tests that
    # build a RolloutWorker are left out here; they still run in the suite.
    "rollout-scoring": ("actors/rollout.py",
                        ["actors.rollout.x_stop_ids__mutmut_*", "actors.rollout.x_prompt_ids__mutmut_*"],
                        ["tests/test_scoring.py", "-k", "not rollout_rows and not prefix_is_in and not episodes_carry and not refuses"]),
}
DETECTED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
            255: "timeout", -9: "timeout", -11: "segfault"}  # -9: killed by mutmut's own timeout


def prepare(workdir: Path, file: str, tests: list[str], tests_rev: str | None) -> list[str]:
    """Copy the checkout's tracked files (tests/ from tests_rev if given) and write mutmut's config.
    -> the test files that exist in that tests/."""
    if workdir.exists():
        return json.loads((workdir / ".bench-tests.json").read_text())
    workdir.mkdir(parents=True)
    # The committed tree, not the working tree: edits made while a run is going cannot leak into it.
    for rev, paths in (("HEAD", []), (tests_rev, ["tests"])):
        if rev is None:
            continue
        if paths:
            shutil.rmtree(workdir / "tests", ignore_errors=True)
        archive = subprocess.run(["git", "archive", rev, *paths], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # tests find ../shared beside their checkout: mutmut runs them in <workdir>/mutants
        (workdir / "shared").symlink_to(shared.resolve())
    present = [t for t in tests if not t.startswith("tests/") or (workdir / t).is_file()]
    conf = {"source_paths": ["nanogrpo/", "learner/", "actors/"], "only_mutate": [file],
            "also_copy": ["bench/", "launch.py"], "pytest_add_cli_args_test_selection": present,
            # -x: a mutant is killed by its first failing test; no per-test timeout (mutmut times out mutants)
            "pytest_add_cli_args": ["-x", "-q", "-p", "no:timeout", "-p", "no:cacheprovider"]}
    with open(workdir / "pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items()))
    (workdir / ".bench-tests.json").write_text(json.dumps(present))
    return present


def mutmut(workdir: Path, args: list[str], timeout: float | None) -> int:
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "PYTHONPATH": str(workdir / "mutants")}
    # Its own session, so a time limit ends mutmut's forked mutant runs too (not orphans).
    p = subprocess.Popen([str(exe), *args], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return -1


def verdicts(workdir: Path, file: str) -> dict[str, int | None]:
    meta = workdir / "mutants" / (file + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}


def run_target(name: str, args, deadline: float) -> dict:
    file, patterns, tests = TARGETS[name]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    label = args.tests_rev or head
    workdir = Path(args.workdir) / f"{name}-{label}"
    present = prepare(workdir, file, tests, args.tests_rev)
    if not any(t.startswith("tests/") for t in present):  # none of its test files exist in that tests/
        return {"target": name, "tests": label, "test_files": [], "mutants": None, "sampled": args.sample,
                "killed": 0, "timeout": 0, "survived": [], "no_tests": args.sample, "unchecked": 0, "other": 0,
                "score": 0.0, "inherited": 0}
    if not verdicts(workdir, file):  # generate the mutants and the test map; run none of them
        mutmut(workdir, ["run", "--max-children", str(args.max_children), "no-such-mutant"],
               max(1.0, deadline - time.time()))
    names = sorted(k for k in verdicts(workdir, file) if any(fnmatch(k, p) for p in patterns))
    sample = names if not args.sample or args.sample >= len(names) else \
        sorted(random.Random(args.seed).sample(names, args.sample))
    done = verdicts(workdir, file)
    inherited = {}
    if args.inherit_kills_from:
        # The earlier suite's kills stand when its test files are all still here unchanged (check that
        # yourself: `git diff REV -- <files>`): only its survivors need running against the new tests.
        old = verdicts(Path(args.workdir) / f"{name}-{args.inherit_kills_from}", file)
        inherited = {n: old[n] for n in sample if old.get(n) not in (None, 0, 5, 33)}
    todo = [n for n in sample if done.get(n) is None and n not in inherited]
    if todo and time.time() < deadline:
        mutmut(workdir, ["run", "--max-children", str(args.max_children), *todo], max(1.0, deadline - time.time()))
    v = {**verdicts(workdir, file), **inherited}
    res = {"target": name, "tests": label, "test_files": present, "mutants": len(names), "sampled": len(sample),
           "killed": 0, "timeout": 0, "survived": [], "no_tests": 0, "unchecked": 0, "other": 0,
           "inherited": len(inherited)}
    for n in sample:
        code = v.get(n)
        if code is None:
            res["unchecked"] += 1
        elif code == 0:
            res["survived"].append(n)
        elif code in (5, 33):
            res["no_tests"] += 1
        elif DETECTED.get(code) == "killed":
            res["killed"] += 1
        elif code in DETECTED:
            res["timeout"] += 1
        else:
            res["other"] += 1
    checked = len(sample) - res["no_tests"] - res["unchecked"]
    res["score"] = (res["killed"] + res["timeout"]) / checked if checked else float("nan")
    if args.show_survivors:
        exe = Path(sys.executable).with_name("mutmut")
        res["survivor_diffs"] = {n: subprocess.run([str(exe), "show", n], cwd=workdir, capture_output=True,
                                                   text=True).stdout for n in res["survived"]}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--sample", type=int, default=40, help="mutants per target, seeded (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tests-rev", default=None, help="take tests/ from this commit (default: HEAD's)")
    ap.add_argument("--workdir", default="/tmp/nanogrpo-mutation")
    ap.add_argument("--inherit-kills-from", default=None, metavar="LABEL",
                    help="take the kills of an earlier run (its --tests-rev, e.g. the before commit) and run "
                         "only its survivors: valid when the new tests keep the old test files unchanged")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=540, help="seconds for the whole call; rerun to continue")
    ap.add_argument("--show-survivors", action="store_true")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    deadline = time.time() + args.time_limit
    results = []
    for name in args.targets:
        r = run_target(name, args, deadline)
        results.append(r)
        print(f"{name:<16} tests={r['tests']:<10} sampled {r['sampled']:>3}/{r['mutants'] or '?':<4} killed {r['killed']:>3} "
              f"timeout {r['timeout']:>2} survived {len(r['survived']):>3} no-tests {r['no_tests']:>2} "
              f"unchecked {r['unchecked']:>3} (inherited kills {r['inherited']:>2})  score {r['score']:.2f}", flush=True)
        for n in r["survived"]:
            print(f"    survived: {n}")
            if args.show_survivors:
                print("      " + r["survivor_diffs"][n].strip().replace("\n", "\n      "))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
