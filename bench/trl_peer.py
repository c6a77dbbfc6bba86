"""GRPO steps/min and rollout tokens/s: nanogrpo vs TRL's GRPOTrainer, the same work in one run.

Both sides train the same real checkpoint on the same task (GSM8K questions in the model's chat
template, the same reward function, nanogrpo.tasks.gsm8k), with the same group size, prompts per
step, completion budget, temperature, learning rate, dtype and thread count, on this machine, one
after the other. TRL runs its plain `transformers` generation (no vLLM), as on a machine without a
GPU; nanogrpo runs as a user starts it, `launch.py` in a subprocess (one rollout worker and the
learner, synchronous: --max-staleness 0, so neither side overlaps generation with training).

Reported: steps/min (the optimizer steps over the time of the steps), rollout tokens/s (completion
tokens over generation time), their ratios, and each side's first-step reward and loss, so a
reader can see both did the same work. Needs the bench extra, `pip install "torch==2.13.0" -e ".[bench]"`
(trl: never a runtime dependency), and a checkpoint directory: --model DIR or $NANOGRPO_BENCH_MODEL,
e.g. one built by `python ../shared/tools/make_smollm2.py DIR`.

    python -m bench.trl_peer --model DIR            # 3 TRL steps, 8 of ours, 64 new tokens
    python -m bench.trl_peer --model DIR --quick    # 1 TRL step, 4 of ours
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def settings(args) -> dict:
    return dict(group_size=8, prompts_per_step=8, max_new_tokens=args.max_new_tokens, lr=1e-6, temperature=1.0,
                dtype=args.dtype, threads=args.threads)


def run_trl(args, s: dict) -> dict:
    """TRL's GRPOTrainer for args.trl_steps optimizer steps; times its steps and its generate calls."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from nanogrpo.hardware import resolve_dtype
    from nanogrpo.tasks import load_task

    torch.set_num_threads(s["threads"])
    task = load_task("gsm8k", str(args.data), seed=0)
    rows = task.train[: s["prompts_per_step"] * (args.trl_steps + 1)]
    ds = datasets.Dataset.from_list([{"prompt": task.messages(r), "target": str(r["target"])} for r in rows])

    def reward(completions, target, **_):
        return [float(task.score(c[-1]["content"], {"target": t})["total"]) for c, t in zip(completions, target)]

    dtype = resolve_dtype(s["dtype"], "cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    G, P = s["group_size"], s["prompts_per_step"]
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-peer-"), use_cpu=True, report_to="none",
                     num_generations=G, per_device_train_batch_size=G, gradient_accumulation_steps=P,
                     max_completion_length=s["max_new_tokens"], learning_rate=s["lr"], temperature=s["temperature"],
                     beta=0.0, max_steps=args.trl_steps, logging_steps=1, save_strategy="no", use_vllm=False,
                     bf16=dtype == torch.bfloat16, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant",
                     warmup_steps=0, max_grad_norm=1.0, shuffle_dataset=False,
                     gradient_checkpointing=False)  # TRL defaults it on; ours is off by default
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    gen = {"s": 0.0, "tokens": 0}
    inner = trainer.model.generate

    def timed_generate(*a, **kw):  # completion tokens (up to EOS) and seconds of every generate call
        t = time.perf_counter()
        out = inner(*a, **kw)
        gen["s"] += time.perf_counter() - t
        prompt_len = (kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]
        comp = out[:, prompt_len:]
        done = (comp == tok.eos_token_id).int().cumsum(-1)
        gen["tokens"] += int(((done == 0) | ((done == 1) & (comp == tok.eos_token_id))).sum())
        return out

    trainer.model.generate = timed_generate
    marks = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append(("begin", time.perf_counter()))

        def on_step_end(self, *a, **k):
            marks.append(("end", time.perf_counter()))

    trainer.add_callback(Clock())
    trainer.train()
    begins = [t for k, t in marks if k == "begin"]
    ends = [t for k, t in marks if k == "end"]
    step_s = [e - b for b, e in zip(begins, ends)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    first = logs[0] if logs else {}
    return dict(steps=len(step_s), step_s=step_s, steps_per_min=60 * len(step_s) / sum(step_s),
                gen_s=gen["s"], gen_tokens=gen["tokens"], rollout_tok_s=gen["tokens"] / max(gen["s"], 1e-9),
                first_reward=first.get("reward"), first_loss=first.get("loss"),
                first_completion_len=first.get("completions/mean_length"))


def run_ours(args, s: dict) -> dict:
    """launch.py as a user runs it; figures from its metrics.csv (the steps, not the start-up)."""
    run_dir = Path(tempfile.mkdtemp(prefix="nanogrpo-peer-")) / "run"
    cmd = [sys.executable, str(ROOT / "launch.py"), "--model", str(args.model), "--task", "gsm8k",
           "--data", str(args.data), "--steps", str(args.ours_steps), "--group-size", str(s["group_size"]),
           "--prompts-per-step", str(s["prompts_per_step"]), "--max-new-tokens", str(s["max_new_tokens"]),
           "--lr", str(s["lr"]), "--temperature", str(s["temperature"]), "--dtype", s["dtype"],
           "--max-staleness", "0", "--num-rollout-workers", "1", "--threads-per-worker", str(s["threads"]),
           "--learner-threads", str(s["threads"]), "--eval-every", "0", "--num-test", "8",
           "--save-every", "0", "--out", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"launch.py failed ({out.returncode}): {out.stderr[-2000:]}")
    with (run_dir / "metrics.csv").open() as f:
        steps = [r for r in csv.DictReader(f) if r.get("reward_mean")]
    # The held-out eval at the last step is ours alone (TRL's run has none): not a GRPO step's work.
    step_s = [float(r["time_step"]) - float(r.get("time_eval") or 0) for r in steps]
    gen_s = sum(float(r["time_generate"]) for r in steps if r["time_generate"])
    tokens = sum(float(r["response_len"]) * s["group_size"] * s["prompts_per_step"] for r in steps)
    first = steps[0]
    return dict(steps=len(steps), step_s=step_s, steps_per_min=60 * len(step_s) / sum(step_s), gen_s=gen_s,
                gen_tokens=tokens, rollout_tok_s=tokens / max(gen_s, 1e-9), process_wall_s=wall,
                first_reward=float(first["reward_mean"]), first_loss=float(first["loss"]) if first["loss"] else None,
                first_completion_len=float(first["response_len"]), run_dir=str(run_dir))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("NANOGRPO_BENCH_MODEL"), help="real HF checkpoint directory")
    ap.add_argument("--data", default=str(DATA), help="GSM8K JSON lines (default: ../shared/data/gsm8k/test.jsonl)")
    ap.add_argument("--quick", action="store_true", help="1 TRL step and 4 of ours")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for our launch.py run")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_trl.json")))
    args = ap.parse_args()
    if not args.model:
        raise SystemExit("bench.trl_peer needs --model DIR (or $NANOGRPO_BENCH_MODEL): a real checkpoint, e.g. "
                         "from python ../shared/tools/make_smollm2.py DIR")
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: file not found")
    args.trl_steps, args.ours_steps = (1, 4) if args.quick else (3, 8)
    s = settings(args)
    print(f"same settings on both sides: {s}; model {args.model}", flush=True)
    ours = run_ours(args, s)
    print(f"nanogrpo: {ours['steps']} steps, {ours['steps_per_min']:.2f} steps/min, rollout {ours['rollout_tok_s']:.0f} "
          f"tok/s; first step reward {ours['first_reward']:.3f} loss {ours['first_loss']} "
          f"len {ours['first_completion_len']:.1f}", flush=True)
    trl = run_trl(args, s)
    print(f"TRL:      {trl['steps']} steps, {trl['steps_per_min']:.2f} steps/min, rollout {trl['rollout_tok_s']:.0f} "
          f"tok/s; first step reward {trl['first_reward']} loss {trl['first_loss']} "
          f"len {trl['first_completion_len']}", flush=True)
    res = dict(settings=s, model=str(args.model), quick=args.quick, ours=ours, trl=trl,
               steps_per_min_ratio=ours["steps_per_min"] / trl["steps_per_min"],
               rollout_tok_s_ratio=ours["rollout_tok_s"] / trl["rollout_tok_s"])
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"steps/min ratio: {res['steps_per_min_ratio']:.2f}x; rollout tok/s ratio: {res['rollout_tok_s_ratio']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
