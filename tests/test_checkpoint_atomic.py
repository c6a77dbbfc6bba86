"""Run checkpoints survive a crash at every filesystem step of a save, the directory replace
included (the older fault test injects its crash only at torch.save, before any rename).

A crash is simulated by raising from the N-th call to any of the calls a save can make that move,
copy or delete files (os.replace, os.rename, shutil.copyfile/copytree/move/rmtree), for every N."""
import json
import os
import shutil

import pytest

from nanogrpo.checkpoint import check_run_checkpoint, latest_run_checkpoint, save_run_checkpoint
from nanogrpo.model import Qwen2
from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir

CALLS = [(os, "replace"), (os, "rename"), (shutil, "copyfile"), (shutil, "copytree"), (shutil, "move"),
         (shutil, "rmtree")]


class Crash(BaseException):
    """Not an Exception: no `except Exception` in the code under test may swallow the 'crash'."""


def crash_at(monkeypatch, n: int) -> dict:
    """Make the n-th filesystem call (counting all of CALLS) raise Crash. -> the counter."""
    seen = {"calls": 0}
    for mod, name in CALLS:
        real = getattr(mod, name)

        def wrapped(*a, _real=real, **k):
            seen["calls"] += 1
            if seen["calls"] == n:
                raise Crash(f"crash at call {n}")
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return seen


@pytest.fixture
def setup(tmp_path):
    tok = write_tiny_model_dir(tmp_path / "tok")
    model = Qwen2.from_config(TINY_MODEL_CONFIG, seed=0)
    ckpts = tmp_path / "run" / "checkpoints"
    return tok, model, ckpts


def save(ckpts, model, tok, step):
    return save_run_checkpoint(ckpts / f"step-{step:06d}", model, tok, {"state": {}, "param_groups": []},
                               {"step": step})


def n_calls(tmp_path, monkeypatch, model, tok) -> int:
    seen = crash_at(monkeypatch, 0)
    save(tmp_path / "count" / "checkpoints", model, tok, 1)
    monkeypatch.undo()
    return seen["calls"]


def intact(path, step) -> bool:
    check_run_checkpoint(path)
    Qwen2.from_pretrained(path)
    return json.loads((path / "state.json").read_text())["step"] == step


def test_crash_at_any_step_of_a_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    """Guards against a non-atomic save (files written straight into the checkpoint's real name, or
    a directory replaced by copying into place): whatever call a crash interrupts, the previous
    checkpoint is intact and loadable, and the new one either does not exist under its real name
    or is complete, so a resume never loads a half-written checkpoint."""
    tok, model, ckpts = setup
    total = n_calls(tmp_path, monkeypatch, model, tok)
    assert total >= 3  # the files' renames and the directory's
    save(ckpts, model, tok, 1)
    for n in range(1, total + 1):
        crash_at(monkeypatch, n)
        with pytest.raises(Crash):
            save(ckpts, model, tok, 2)
        monkeypatch.undo()
        assert intact(ckpts / "step-000001", 1), n
        new = ckpts / "step-000002"
        if new.exists():
            assert intact(new, 2), n
            assert latest_run_checkpoint(tmp_path / "run") == new
            shutil.rmtree(new)
        assert latest_run_checkpoint(tmp_path / "run") == ckpts / "step-000001", n
    assert save(ckpts, model, tok, 2) and intact(ckpts / "step-000002", 2)  # nothing left in the way


def test_crash_while_overwriting_a_checkpoint_keeps_one_under_its_name(setup, tmp_path, monkeypatch):
    """Guards against losing a step's checkpoint when it is saved again (a resumed run that fails
    at once saves the same step) and the save crashes at the directory replace (two renames, no
    atomic exchange): once the resume looks for it, the name holds the old or the new complete
    checkpoint."""
    tok, model, ckpts = setup
    total = n_calls(tmp_path, monkeypatch, model, tok)
    for n in range(1, total + 1):
        shutil.rmtree(ckpts, ignore_errors=True)
        save(ckpts, model, tok, 1)
        crash_at(monkeypatch, n)
        with pytest.raises(Crash):
            save(ckpts, model, tok, 1)
        monkeypatch.undo()
        assert latest_run_checkpoint(tmp_path / "run") == ckpts / "step-000001", n
        assert intact(ckpts / "step-000001", 1), n
