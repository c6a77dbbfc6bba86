"""A real Hugging Face checkpoint end to end: transformers writes a random Qwen2 with the real
151k-token Qwen2.5 vocabulary (save_pretrained), the real tokenizer and chat template ride along,
and launch.py trains on it as a user runs it."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_real_checkpoint(d: Path, tokenizer_dir: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, eos_token_id=151645, bos_token_id=None)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    return d


@pytest.mark.slow
def test_real_checkpoint_trains_end_to_end(tmp_path, qwen_tokenizer_dir, shared_dir):
    """Guards against a run that works only on the built-in tiny model: a HF checkpoint with a
    151k vocabulary and a real chat template must load in every actor, sample, score and train
    (finite rewards and loss), with the learner's log-probs equal to the sampler's at staleness 0
    (a wrong tokenizer/prompt alignment or a weight-sync bug shows as a gap), and leave the run
    directory with every step's row."""
    model = tiny_real_checkpoint(tmp_path / "model", qwen_tokenizer_dir)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "tests"))), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--model", str(model),
                          "--task", "real_model_task:make_task", "--data", str(shared_dir / "data/gsm8k/test.jsonl"),
                          "--steps", "3", "--prompts-per-step", "2", "--group-size", "4", "--max-staleness", "0",
                          "--num-rollout-workers", "1", "--eval-every", "0", "--save-every", "0", "--lr", "1e-4",
                          "--dtype", "fp32", "--out", str(run_dir)],
                         cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    with (run_dir / "metrics.csv").open() as f:
        steps = [r for r in csv.DictReader(f) if r.get("reward_mean")]
    assert [int(r["step"]) for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(float(r["reward_mean"])) and math.isfinite(float(r["loss"]))
        assert r["logprob_gap"] and abs(float(r["logprob_gap"])) < 1e-3, r
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
