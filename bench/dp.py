"""Data-parallel learner benchmark: `python -m bench.dp [--quick]`.

Learner tokens/s with 1 and 2 ranks (separate processes, one torch thread each, gloo), on the
same GRPO-shaped work (a step of sequences split into whole-group shares, micro-batched, summed
gradients, clipped, the sharded CPU-offloaded AdamW). Alongside: the gradient all-reduce time per
step against what the measured gloo bandwidth predicts for the gradient bytes, and how much of
the all-reduce backward hid (overlap). Prints a table and writes bench/results_dp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from learner.sync import free_port

SHAPE = dict(model_type="qwen2", vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=True)



def _bandwidth(group, nbytes: int, reps: int) -> float:
    """Algorithm bandwidth of a SUM all-reduce of `nbytes` fp32 over the group: bytes / second."""
    t = torch.ones(nbytes // 4)
    group.all_reduce_(t)  # warm-up: first call sets up the pairs
    t0 = time.perf_counter()
    for _ in range(reps):
        group.all_reduce_(t)
    return nbytes * reps / (time.perf_counter() - t0)


def _worker(rank: int, world: int, port: int, args: dict, out):
    torch.set_num_threads(1)
    from nanogrpo.dist import DPGroup, GradReducer, ShardedOffloadAdamW, balance_groups
    from nanogrpo.grpo import token_logprobs
    from nanogrpo.model import Qwen2
    from nanogrpo.optim import clip_grad_norm_
    from nanogrpo.weights import flatten_parameters

    group = DPGroup("127.0.0.1", port, rank, world, timeout_s=300)
    model = Qwen2.from_config(SHAPE, seed=0)
    flatten_parameters(model)
    opt = ShardedOffloadAdamW(model, group, lr=1e-5)
    reducer = GradReducer(list(model.parameters()), group)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = _bandwidth(group, 32 * 2**20, args["bw_reps"])
    g = torch.Generator().manual_seed(0)
    seqs, T, micro = args["seqs"], args["T"], args["micro"]
    times, waits = [], []
    for step in range(args["warmup"] + args["steps"]):
        ids = torch.randint(0, SHAPE["vocab_size"], (seqs, T), generator=g)
        w = torch.randn(seqs, generator=g)
        den = float(seqs * (T - 1))
        mine = balance_groups([T] * seqs, world)[rank]
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        t0 = time.perf_counter()
        for j, rows in enumerate(chunks):
            if j == len(chunks) - 1:
                reducer.arm()
            logp = token_logprobs(model(ids[rows])[:, :-1], ids[rows, 1:])
            (-(w[rows, None] * logp).sum() / den).backward()
        t1 = time.perf_counter()
        reducer.finish()  # what is left of the all-reduce after backward
        t2 = time.perf_counter()
        clip_grad_norm_(opt.params, 1.0)
        opt.step()
        opt.zero_grad()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - t0)
            waits.append(t2 - t1)
    if rank == 0:
        out.put({"world": world, "step_s": statistics.median(times), "allreduce_wait_s": statistics.median(waits),
                 "tokens_per_s": seqs * T / statistics.median(times), "grad_bytes": grad_bytes,
                 "gloo_bytes_per_s": bw, "allreduce_predicted_s": grad_bytes / bw if world > 1 else 0.0})


def run_world(world: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (about a minute on 2 cores)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_dp.json")))
    a = ap.parse_args(argv)
    args = dict(seqs=16, T=128, micro=4, warmup=1, steps=3 if a.quick else 8, bw_reps=3 if a.quick else 10)
    one, two = run_world(1, args), run_world(2, args)
    res = {"workload": args, "shape": SHAPE, "cores": os.cpu_count(), "n1": one, "n2": two,
           "speedup_2_vs_1": two["tokens_per_s"] / one["tokens_per_s"],
           "allreduce_wait_vs_predicted": two["allreduce_wait_s"] / max(two["allreduce_predicted_s"], 1e-9)}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"learner tokens/s   N=1 {one['tokens_per_s']:.0f}   N=2 {two['tokens_per_s']:.0f}   "
          f"ratio {res['speedup_2_vs_1']:.2f}x  ({os.cpu_count()} cores, one thread per rank)")
    print(f"gradients {two['grad_bytes'] / 2**20:.1f} MiB, gloo all-reduce {two['gloo_bytes_per_s'] / 2**30:.2f} GiB/s "
          f"-> {two['allreduce_predicted_s'] * 1e3:.1f} ms predicted unoverlapped; "
          f"left after backward {two['allreduce_wait_s'] * 1e3:.1f} ms "
          f"({res['allreduce_wait_vs_predicted']:.2f}x the prediction)")
    return res


if __name__ == "__main__":
    main()
