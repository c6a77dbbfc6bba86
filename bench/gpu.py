"""GPU benchmarks: bf16 on one CUDA device with a Qwen2.5-0.5B-shaped model (random weights).

    python -m bench.gpu                      # on a machine with a CUDA GPU
    python -m bench.gpu --quick              # smaller workloads
    python -m bench.gpu --device cpu --shape tiny --quick   # the same code on the CPU (the smoke test)

Every figure is measured in this run against a peer or a limit also measured in this run:
  * generation: nanogrpo.generate vs transformers.generate on the same weights, prompts and
    sampling (bench.generate's workload), completed tokens/s, and FLOP/s vs a bf16 matmul peak;
  * learner: one whole GRPO step (LearnerCore.train_step: bf16 weights on the device under autocast,
    fp32 masters and Adam moments on the CPU via CPUOffloadAdamW) vs transformers + torch.optim.AdamW
    with fp32 weights and moments on the device under bf16 autocast (mixed-precision training as a
    user writes it), on the same batch and micro-batch budget (bench.learner's workload): tokens/s
    and MFU (6 x matmul params x tokens / step time / the measured peak);
  * offloaded-optimizer memory: the peak device memory of a training step
    (torch.cuda.max_memory_allocated: weights, gradients, optimizer state, activations) with the
    same model and batch, CPUOffloadAdamW vs torch.optim.AdamW (see optimizer_memory);
  * weight sync: pack the learner's flat bf16 buffer (one device-to-host copy) + one ray.put, and
    load on 1 and 2 rollout actors sharing the device (ray.get + one host-to-device copy each), for
    the 0.5B and 1.5B shapes, vs one local device -> host -> device round trip of the same bytes.
Writes bench/results_gpu.json (machine, peak, every figure). The CPU smoke run exercises the same
code on small shapes; its figures mean little: the learner runs in fp32 there (as LearnerCore does on
a CPU), the memory row is left out (torch's CPU allocator keeps no peak statistics), and the
round trip is a host copy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.generate import QWEN05, TINY, bench_shape, empty_model, matmul_peak, sync
from bench.learner import Ours, Peer, make_table, matmul_params, peer_batches
from bench.scaling import SyncPeer, _timed, publish_load
from nanogrpo.config import ModelConfig
from nanogrpo.grpo import token_logprobs
from nanogrpo.model import Qwen2
from nanogrpo.optim import CPUOffloadAdamW, param_groups
from nanogrpo.runconfig import RunConfig
from nanogrpo.weights import flatten_parameters

QWEN15 = {**QWEN05, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
          "num_attention_heads": 12, "num_key_value_heads": 2}
SHAPES = {"0.5b": QWEN05, "tiny": TINY}
TARGETS = {"generate_speedup": 3.0, "learner_speedup": 1.0, "offload_peak_mem_ratio": 0.40}


def device_peak_mem(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def reset_peak_mem(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- learner
class DevicePeer(Peer):
    """bench.learner's transformers + torch.optim.AdamW loop, on `device` under bf16 autocast."""

    def __init__(self, model_dir: str, clip_low: float, clip_high: float, clip_c: float, device):
        super().__init__(model_dir, clip_low, clip_high, clip_c)
        self.model.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.opt.defaults["lr"], weight_decay=0.0)
        self.device = torch.device(device)

    def step(self, batches: list[dict], tok_den: float) -> dict:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return super().step(batches, tok_den)


def timed_steps(step, args: tuple, reps: int, device) -> tuple[float, list[float]]:
    """One untimed step (first use: kernels, optimizer state) -> its grad norm, then `reps` timed steps."""
    grad_norm = step(*args)["grad_norm"]
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step(*args)
        sync(device)
        times.append(time.perf_counter() - t)
    return grad_norm, times


def bench_learner(shape: dict, groups: int, G: int, budget: int, reps: int, device, peak: float) -> dict:
    """Ours vs the peer: each side's first step untimed, then `reps` timed steps, best kept."""
    table = make_table(groups, G, shape["vocab_size"], seed=0)
    comp = sum(len(c) for c in table.column("completion_ids").to_pylist())
    prompts = table.column("prompt_ids").to_pylist()
    total = comp + sum(len(p) for p in prompts)
    ours_tokens = comp + sum(len(p) for p in prompts[::G])  # ours runs each group's prompt once
    batches, tok_den = peer_batches(table, G, budget)
    batches = [{k: v.to(device) for k, v in mb.items()} for mb in batches]
    res = {"groups": groups, "group_size": G, "micro_batch_tokens": budget, "completion_tokens": comp,
           "total_tokens": total}
    with tempfile.TemporaryDirectory() as d:
        Qwen2.from_config(shape, seed=0).save_pretrained(d)
        ours = Ours(d, G, groups, budget, threads=torch.get_num_threads())
        n_mm = matmul_params(ours.model, shape)
        gn_ours, t_ours = timed_steps(ours.step, (table,), reps, device)
        del ours
        reset_peak_mem(device)
        cfg = RunConfig()
        peer = DevicePeer(d, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, device)
        gn_peer, t_peer = timed_steps(peer.step, (batches, tok_den), reps, device)
        del peer
        reset_peak_mem(device)
    to, tp = min(t_ours), min(t_peer)
    res.update(matmul_params=n_mm, ours_s=to, peer_s=tp, ours_s_all=t_ours, peer_s_all=t_peer,
               ours_completion_tok_s=comp / to, peer_completion_tok_s=comp / tp, speedup=tp / to,
               ours_mfu=6 * n_mm * ours_tokens / to / peak, peer_mfu=6 * n_mm * total / tp / peak,
               first_step_grad_norm_ours=gn_ours, first_step_grad_norm_peer=gn_peer,
               # bf16 weights (ours) vs fp32 weights under autocast (peer): close, not equal.
               grad_norm_rel_diff=abs(gn_ours - gn_peer) / max(abs(gn_peer), 1e-12))
    return res


def optimizer_memory(shape: dict, device, rows: int, seq: int) -> dict:
    """Peak device memory of one training step (weights, gradients, optimizer state, activations)
    with the same model, batch and loss, differing only in where the optimizer keeps its state:
      offload  bf16 weights and gradients on the device, fp32 masters + moments on the CPU
               (CPUOffloadAdamW, as the learner runs);
      peer     fp32 weights, gradients and torch.optim.AdamW moments on the device, bf16 autocast.
    The second step is measured (optimizer state exists by then). On a CPU the steps run (the
    smoke test) but there is no peak to read: the byte counts are None."""
    on_gpu = torch.device(device).type == "cuda"
    ids = torch.randint(2, shape["vocab_size"], (rows, seq), device=device)
    out = {"rows": rows, "seq": seq}
    for side in ("offload", "peer"):
        torch.manual_seed(0)
        model = Qwen2(ModelConfig(**shape))
        if side == "offload":
            model = model.to(device=device, dtype=torch.bfloat16)
            flatten_parameters(model)
            opt = CPUOffloadAdamW(param_groups(model, 0.0), lr=1e-5)
        else:
            model = model.to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        model.train()
        for step in range(2):
            if step == 1:
                reset_peak_mem(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                logits = model(ids)[:, :-1]
            loss = -token_logprobs(logits, ids[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del logits, loss
            sync(device)
        out[f"{side}_peak_bytes"] = device_peak_mem(device)
        del model, opt
        reset_peak_mem(device)
    out["ratio"] = out["offload_peak_bytes"] / out["peer_peak_bytes"] if on_gpu else None
    return out


# ----------------------------------------------------------------------------- weight sync
def round_trip_s(flat: torch.Tensor, device) -> float:
    """Best of 3: one device -> host (pinned on a GPU) -> device copy of `flat`; the least a
    weight version that crosses the host can cost."""
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=torch.device(device).type == "cuda")
    back = torch.empty_like(flat)

    def once():
        host.copy_(flat)
        back.copy_(host)
        sync(device)

    once()
    return min(_timed(once) for _ in range(3))


def bench_sync(cfg: dict, device, reps: int) -> dict:
    model = empty_model(cfg, torch.bfloat16, device)
    flat = flatten_parameters(model)[torch.bfloat16]  # as the learner keeps its weights
    nbytes = flat.numel() * flat.element_size()
    ref = round_trip_s(flat, device)
    res = {"state_bytes": nbytes, "round_trip_s": ref}
    gpu_share = 0.5 if torch.device(device).type == "cuda" else 0

    def make_peer():  # a rollout worker's share of the one GPU
        return SyncPeer.options(num_gpus=gpu_share).remote(cfg, str(device))

    for n, best in publish_load(model, (1, 2), reps, make_peer).items():
        res[f"publish_load_s_{n}_workers"] = best
        res[f"vs_round_trip_{n}_workers"] = best / ref
    return res


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="torch device to run on (default cuda; cpu for a smoke run)")
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b", help="model shape for generation and learner")
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--sync-shapes", nargs="*", default=None, choices=["tiny", "0.5b", "1.5b"],
                    help="weight-sync shapes (default: 0.5b 1.5b; tiny with --shape tiny)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_gpu.json")))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch here (use --device cpu for a smoke run)")
    if device.type == "cpu" and torch.cuda.is_available():
        ap.error("--device cpu: a CUDA device is visible, and the learner would still train on it; "
                 "hide it for a CPU run (CUDA_VISIBLE_DEVICES= python -m bench.gpu --device cpu ...)")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16
    on_gpu = device.type == "cuda"
    peak = matmul_peak(dtype, n=8192 if on_gpu else 1024, reps=10 if on_gpu else 3, device=device)
    mach = {"device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda if on_gpu else None, "cpu_cores": os.cpu_count()}
    print(f"device {mach['device']}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)

    # Generation: bench.generate's RL workload (P prompts x G samples, EOS-biased lengths).
    n_p, max_new = (16, 64) if args.quick else (64, 256)
    if not on_gpu:
        n_p, max_new = 4, 16
    name = f"{args.shape} {n_p}x8 {max_new}new"
    [gen] = bench_shape(name, shape, n_p, 8, max_new, (16, 128), bias=3.0 if shape is TINY else 9.0,
                        dtypes=[dtype], reps=2 if args.quick else 3, device=device)
    gen["peak_gflops"] = peak / 1e9
    gen["frac_of_peak"] = gen["ours_gflops"] * 1e9 / peak

    # Learner: one GRPO step, ours vs the peer.
    groups = 4 if args.quick or not on_gpu else 16
    lrn = bench_learner(shape, groups, 8, 8192 if on_gpu else 4096, 2 if args.quick else 3, device, peak)
    print(f"learner: ours {lrn['ours_completion_tok_s']:.0f} completion tok/s (MFU {lrn['ours_mfu']:.1%}) vs "
          f"peer {lrn['peer_completion_tok_s']:.0f} (MFU {lrn['peer_mfu']:.1%}): {lrn['speedup']:.2f}x; "
          f"grad norms differ by {lrn['grad_norm_rel_diff']:.1%}", flush=True)
    mem = optimizer_memory(shape, device, rows=4 if args.quick else 8, seq=512 if on_gpu else 64)
    if mem["ratio"] is not None:
        print(f"peak device memory of a step: CPUOffloadAdamW {mem['offload_peak_bytes'] / 2**30:.2f} GiB vs "
              f"torch.optim.AdamW {mem['peer_peak_bytes'] / 2**30:.2f} GiB = {mem['ratio']:.0%}", flush=True)

    # Weight sync.
    sync_shapes = args.sync_shapes if args.sync_shapes is not None else (["tiny"] if shape is TINY else ["0.5b", "1.5b"])
    syncs = {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **({} if on_gpu else {"num_cpus": 4}))
    try:
        for s in sync_shapes:
            syncs[s] = bench_sync({"tiny": TINY, "0.5b": QWEN05, "1.5b": QWEN15}[s], device, 2 if args.quick else 4)
            r = syncs[s]
            print(f"weight sync {s} ({r['state_bytes'] / 2**30:.2f} GiB): round trip {r['round_trip_s'] * 1e3:.0f} ms; "
                  + ", ".join(f"{n} worker(s) {r[f'publish_load_s_{n}_workers'] * 1e3:.0f} ms "
                              f"({r[f'vs_round_trip_{n}_workers']:.2f}x)" for n in (1, 2)), flush=True)
    finally:
        ray.shutdown()

    rows = [("generation tok/s vs transformers.generate", gen["speedup"], TARGETS["generate_speedup"]),
            ("generation FLOP/s / bf16 matmul peak", gen["frac_of_peak"], None),
            ("learner tok/s vs transformers + torch AdamW", lrn["speedup"], TARGETS["learner_speedup"]),
            ("learner MFU", lrn["ours_mfu"], None)]
    if mem["ratio"] is not None:
        rows.append(("offloaded-optimizer peak memory vs torch AdamW", mem["ratio"], TARGETS["offload_peak_mem_ratio"]))
    for s, r in syncs.items():
        rows += [(f"weight publish+load {s}, {n} worker(s) vs round trip", r[f"vs_round_trip_{n}_workers"], None)
                 for n in (1, 2)]
    print(f"\n== bench.gpu on {mach['device']} ({args.shape}, bf16{', quick' if args.quick else ''})")
    w = max(len(r[0]) for r in rows)
    for label, ratio, target in rows:
        verdict = ""
        if target is not None:
            ok = ratio <= target if "memory" in label else ratio >= target
            verdict = f"target {'<=' if 'memory' in label else '>='} {target:g}: {'met' if ok else 'miss'}"
        print(f"{label:<{w}}  {ratio:>7.3f}  {verdict}")
    out = {"machine": mach, "device": str(device), "shape": args.shape, "quick": args.quick,
           "bf16_matmul_peak_flops": peak, "generate": gen, "learner": lrn, "optimizer_memory": mem,
           "weight_sync": syncs,
           "table": [{"figure": a, "ratio": b, "target": c} for a, b, c in rows]}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
