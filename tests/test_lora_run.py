"""LoRA wired into the trainer (--lora-rank): the learner trains and publishes adapters only, workers
hold the base once and take each version as adapters, the KL reference is the base with adapters
off, checkpoints are PEFT adapter directories that resume, and `launch.py export --merged` writes a
model transformers loads. nanogrpo/lora.py's own maths and PEFT parity are in tests/test_lora.py.

Adapter B starts at zero, so every comparison here is made after learner steps (lr 1e-2) have moved
the adapters: with B = 0 a bug that drops the adapters would still give the base's numbers.
"""
import csv
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from actors.rollout import policy_model, take_version
from learner.learner import LearnerCore
from nanogrpo import lora
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from test_learner import G, episodes, model_dir  # noqa: F401 - model_dir is a fixture

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> dict:
    return {"group_size": G, "lr": 1e-2, "max_new_tokens": 16, "lora_rank": 8, "lora_alpha": 16.0,
            "dtype": "fp32", **kw}


def _trained(model_dir, steps: int = 2, **kw) -> tuple[LearnerCore, list]:
    core = LearnerCore(_cfg(**kw), str(model_dir), threads=1)
    base = Qwen2.from_pretrained(model_dir)
    tables = [episodes(base, 4, seed=20 + s) for s in range(steps + 1)]
    for t in tables[:steps]:
        core.train_step(t)
    return core, tables


def adapter_numel(model) -> int:
    return sum(p.numel() for _, p in lora.lora_parameters(model))


def test_learner_trains_and_publishes_adapters_only(model_dir):
    """Guards against a LoRA learner that still updates the base (optimizer over every weight, base
    not frozen), keeps Adam state for frozen weights, or publishes whole weights each version
    (model bytes instead of adapter bytes)."""
    core, _ = _trained(model_dir)
    base = Qwen2.from_pretrained(model_dir)
    adapters = dict(lora.lora_parameters(core.model))
    for name, p in core.model.named_parameters():
        if name not in adapters:
            assert not p.requires_grad and torch.equal(p, base.get_parameter(name)), name
    assert all(adapters[n].abs().max() > 0 for n in adapters if ".lora_B." in n)  # the adapters did train
    held = {id(p) for p in core.opt.state}
    assert held == {id(p) for p in adapters.values()}
    assert sum(s["exp_avg"].numel() for s in core.opt.state.values()) == adapter_numel(core.model)
    packed = core.packed()
    assert isinstance(packed, lora.PackedAdapters) and packed.version == core.version == 2
    assert packed.nbytes == 4 * adapter_numel(core.model)
    assert packed.nbytes < 0.2 * sum(p.numel() * p.element_size() for p in base.parameters())
    assert core.ref is None


def test_workers_hold_learner_base_plus_adapters(model_dir):
    """Guards against a worker that adds each version on top of the last (updates summed over
    versions), merges with the wrong scale or a transposed B A, drops the adapters, keeps a second
    copy of the base in fp32, or unpacks whole weights into a LoRA worker: after every version its
    effective weights are the learner's base + alpha/r B A (atol 1e-6) and its logits the learner's."""
    cfg = RunConfig(**_cfg())
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)
    worker = policy_model(cfg, str(model_dir), torch.float32, torch.device("cpu"))
    assert lora.is_merged(worker) and all(m.pristine is None for _, m in lora.lora_modules(worker))
    base = Qwen2.from_pretrained(model_dir)
    ids = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    for v in range(3):
        take_version(worker, core.packed())
        scale = cfg.lora_alpha / cfg.lora_rank
        for name, m in lora.lora_modules(core.model):
            want = (base.get_parameter(f"{name}.weight").double()
                    + scale * m.lora_B.weight.double() @ m.lora_A.weight.double())
            torch.testing.assert_close(worker.get_parameter(f"{name}.weight").double(), want, atol=1e-6, rtol=0)
        assert lora.adapter_digest(worker) == lora.adapter_digest(core.model)
        with torch.no_grad():
            torch.testing.assert_close(worker(ids), core.model.eval()(ids), atol=1e-5, rtol=1e-5)
        core.train_step(episodes(base, 4, seed=30 + v))
    from nanogrpo.weights import pack
    with pytest.raises(RuntimeError, match="disagree on --lora-rank"):
        take_version(worker, pack(base, 9))


def test_kl_reference_is_the_base_with_adapters_off(model_dir):
    """Guards against a KL reference that includes the adapters (KL stuck at 0), a second model
    copy kept for it, or a reference other than the initial base: the same steps with a separately
    loaded base as the reference give the same KL and the same adapters."""
    core = LearnerCore(_cfg(kl_coef=0.3), str(model_dir), threads=1)
    peer = LearnerCore(_cfg(kl_coef=0.3), str(model_dir), threads=1)
    separate = Qwen2.from_pretrained(model_dir).eval()
    peer._reference = lambda: nullcontext(separate)
    assert core.ref is None and peer.ref is None
    base = Qwen2.from_pretrained(model_dir)
    kls = []
    for s in range(3):
        t = episodes(base, 4, seed=40 + s)
        a, b = core.train_step(t)[0], peer.train_step(t)[0]
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-7), s
        kls.append(a["kl"])
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 1e-4  # B = 0 at step 1, not after
    for (n, p), (_, q) in zip(lora.lora_parameters(core.model), lora.lora_parameters(peer.model)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_checkpoint_is_a_peft_adapter_and_resumes(model_dir, tmp_path):
    """Guards against a LoRA checkpoint that writes the whole model (or no adapters), adapters in a
    layout PEFT does not read, and a resume that restarts the adapters or the optimizer: the resumed
    learner's next step equals the uninterrupted one's; PEFT on the transformers base gives
    nanogrpo's logits (atol 1e-4)."""
    core, tables = _trained(model_dir)
    path = Path(core.save(str(tmp_path / "step-000002"), {"step": 2}))
    files = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "state.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    resumed = LearnerCore(_cfg(), str(model_dir), threads=1, resume_from=str(path))
    assert resumed.version == 2 and lora.adapter_digest(resumed.model) == lora.adapter_digest(core.model)
    a, b = core.train_step(tables[2])[0], resumed.train_step(tables[2])[0]
    for k in ("loss", "grad_norm", "entropy"):
        assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-6), k
    assert lora.adapter_digest(resumed.model) == lora.adapter_digest(core.model)
    with pytest.raises(ValueError, match="field r=8"):
        LearnerCore(_cfg(lora_rank=4), str(model_dir), threads=1, resume_from=str(path))

    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import peft
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").float()
    pm = peft.PeftModel.from_pretrained(hf, str(path)).eval()
    ids = torch.randint(3, 20, (2, 11), generator=torch.Generator().manual_seed(1))
    lora.load_adapter(resumed.model, path)  # back to the checkpoint's adapters (it has trained one more step)
    with torch.no_grad():
        ref, ours = pm(ids).logits, resumed.model.eval()(ids)
        with pm.disable_adapter():
            plain = pm(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (plain - ref).abs().max() > 1e-3  # the adapters PEFT loaded change the logits


def test_lora_checkpoint_write_stays_atomic(model_dir, tmp_path, monkeypatch):
    """Guards against the adapter files bypassing the checkpoint's temp-dir-then-rename write (a
    crash mid-save leaving a half-written checkpoint a resume would pick up) or being left out of
    its manifest (a truncated adapter file not noticed)."""
    from nanogrpo.checkpoint import check_run_checkpoint, latest_run_checkpoint
    core, _ = _trained(model_dir, steps=1)
    ckpts = tmp_path / "run" / "checkpoints"
    core.save(str(ckpts / "step-000001"), {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(torch, "save", boom)  # the optimizer state is written after the adapters
    with pytest.raises(OSError, match="injected"):
        core.save(str(ckpts / "step-000002"), {"step": 2})
    monkeypatch.undo()
    assert latest_run_checkpoint(tmp_path / "run") == ckpts / "step-000001"
    assert [p.name for p in ckpts.iterdir()] == ["step-000001"]
    f = ckpts / "step-000001" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors has 100 bytes"):
        check_run_checkpoint(ckpts / "step-000001")


def _run_dir(tmp_path, model_dir, lora_rank: int, with_ckpt: bool = True) -> Path:
    run = tmp_path / f"run-r{lora_rank}"
    run.mkdir()
    (run / "config.json").write_text(RunConfig(**{**_cfg(), "lora_rank": lora_rank}).to_json())
    (run / "run.json").write_text(json.dumps({"model_dir": str(model_dir), "argv": []}))
    if with_ckpt:
        core, _ = _trained(model_dir, steps=1, lora_rank=lora_rank) if lora_rank else (None, None)
        if core is not None:
            core.save(str(run / "checkpoints" / "step-000001"), {"step": 1})
    return run


def test_export_merged_loads_in_transformers_with_the_same_logits(model_dir, tmp_path, capsys):
    """Guards against an export that leaves the adapters out (the base's logits), writes adapter keys
    transformers cannot place, or overwrites a directory; and against unclear errors for a run
    without LoRA or without a checkpoint."""
    import launch
    run = _run_dir(tmp_path, model_dir, 8)
    out = tmp_path / "merged"
    assert launch.export_main([str(run), "--merged", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = lora.load_adapter(Qwen2.from_pretrained(model_dir), run / "checkpoints" / "step-000001").eval()
    ids = torch.randint(3, 20, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, base = model(ids), Qwen2.from_pretrained(model_dir)(ids)
    assert (want - base).abs().max() > 1e-3
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=1e-4)

    assert launch.export_main([str(run), "--merged", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    full = _run_dir(tmp_path, model_dir, 0)
    assert launch.export_main([str(full), "--merged", str(tmp_path / "x")]) == 2
    assert "trained without --lora-rank" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run / "config.json").read_text())
    (bare / "run.json").write_text((run / "run.json").read_text())
    assert launch.export_main([str(bare), "--merged", str(tmp_path / "y")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_two_ranks_train_adapters_as_one(model_dir):
    """Guards against the data-parallel learner sharding or all-reducing frozen base weights (or
    skipping the adapters) with --lora-rank: two ranks end two steps with one rank's adapters."""
    from test_dp_learner import _run
    base = Qwen2.from_pretrained(model_dir)
    tables = [episodes(base, 6, seed=s) for s in (11, 12)]
    kw = {"lora_rank": 8, "lr": 2e-5}  # small, as in test_dp_learner: Adam amplifies summation-order noise
    (one, m1), = _run(1, model_dir, tables, **kw)
    assert max(p.abs().max() for n, p in lora.lora_parameters(one.model) if ".lora_B." in n) > 1e-5  # it moved
    for core, m2 in _run(2, model_dir, tables, **kw):
        assert m2[-1]["loss"] == pytest.approx(m1[-1]["loss"], abs=1e-6)
        for (n, p), (_, q) in zip(lora.lora_parameters(one.model), lora.lora_parameters(core.model)):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
        assert sum(s["exp_avg"].numel() for s in core.opt.opt.state.values()) < adapter_numel(core.model)


@pytest.mark.parametrize("kw,message", [
    ({"lora_rank": -1}, "--lora-rank: must be >= 0"),
    ({"lora_rank": 8, "lora_alpha": 0.0}, "--lora-alpha must be > 0"),
    ({"lora_rank": 8, "lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
    ({"lora_rank": 8, "lora_targets": "q_proj,qkv"}, "--lora-targets: ['qkv'] not adaptable"),
    ({"lora_rank": 8, "weight_sync": "collective"}, "--weight-sync: collective broadcasts whole models"),
])
def test_lora_flags_fail_with_the_flag_named(kw, message):
    """Guards against a bad --lora-* value that surfaces as a traceback from deep inside an actor."""
    with pytest.raises(ValueError) as e:
        RunConfig(**kw).validate()
    assert message in str(e.value)


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory) -> Path:
    """The built-in tiny model after its usual supervised warm start, as a plain model directory:
    LoRA adapts a trained base (on the random one its frozen embeddings leave little to adapt)."""
    from actors.rollout import prompt_ids
    from nanogrpo.tasks import load_task
    from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir
    from nanogrpo.tokenizer import Tokenizer
    d = write_tiny_model_dir(tmp_path_factory.mktemp("warm"))
    Qwen2.from_config(TINY_MODEL_CONFIG, seed=1).save_pretrained(d)
    task, tok = load_task("arithmetic", None, seed=1), Tokenizer.from_pretrained(d)
    seqs = [(prompt_ids(tok, task, ex), tok.encode(ex["warm_start"]) + [tok.eos_token_id]) for ex in task.train]
    core = LearnerCore({"group_size": 8, "dtype": "fp32"}, str(d), threads=2)
    core.sft(seqs, 150, 64, 2e-3, 1)
    core.model.save_pretrained(d)
    return d


def launch(*args):
    # RAY_ADDRESS=local: a cluster of the run's own, even where another one runs on the same machine
    # (ray.init() would join it, and then refuse num_cpus or wait for its resources).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_lora_run_learns_and_ships_adapter_bytes(warm_base, tmp_path):
    """The real entry point with --lora-rank 8 on a warm-started tiny base. Guards against a LoRA run
    that does not learn (reward must rise), versions that ship more than the adapters (sync_bytes of
    every step = the adapters' fp32 bytes), workers that sample from another policy than the learner
    trains (on-policy log-prob gap ~0 at k = 0) and checkpoints that hold the whole model. (Resuming
    from a LoRA checkpoint: test_checkpoint_is_a_peft_adapter_and_resumes; the driver's resume path
    does not depend on LoRA and is tests/test_resume.py's.)"""
    run = tmp_path / "run"
    common = ["--model", str(warm_base), "--lora-rank", "8", "--prompts-per-step", "16", "--max-staleness", "0",
              "--seed", "1", "--dtype", "fp32", "--quiet", "true"]
    # LoRA wants a larger lr than full fine-tuning (3e-4 in test_launch): 1e-3 went 0.29 -> 0.43.
    launch("--out", str(run), "--steps", "40", "--save-every", "20", "--eval-every", "20", "--lr", "3e-3", *common)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["reward_mean"]]
    assert len(rows) == 40
    # Measured with this seed: held-out greedy success 0.29 -> 0.59, reward 0.33 -> 0.40 (first and
    # last 10 steps) on an AMX CPU; 0.29 -> 0.41 with oneDNN/MKL/ATen capped at AVX2 (other kernels,
    # another trajectory). Adapters that never reach the workers, or never train, leave both flat.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_last"] > summary["eval_first"] + 0.08, summary
    rewards = [float(r["reward_mean"]) for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.03, (first, last)
    cfg = json.loads((warm_base / "config.json").read_text())
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv_dim = kv * h // cfg["num_attention_heads"]
    per_layer = 2 * (h + h) + 2 * (h + kv_dim) + 3 * (h + inter)  # q, o; k, v; gate, up, down: r x (in + out)
    adapter_bytes = 4 * 8 * per_layer * cfg["num_hidden_layers"]
    assert {int(r["sync_bytes"]) for r in rows} == {adapter_bytes}
    assert max(float(r["logprob_gap"]) for r in rows if r["logprob_gap"]) < 1e-3
    ckpt = run / "checkpoints" / "step-000040"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
