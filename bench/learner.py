"""Learner step throughput: our GRPO step vs a plain transformers + torch.optim.AdamW loop.

Both sides train on the *same* GRPO-shaped batch (groups x G completions, prompt 16-48 tokens,
completion 16-128 tokens, random group-varied rewards) under the same micro-batch token budget,
with the same weights, dtype, loss (clipped GRPO, clip-higher, dual clip, token-mean) and thread count, in
the same process; the first step of each must give the same pre-clip gradient norm (printed as
match / MISMATCH). bf16 rows run both sides under `torch.autocast("cpu", bfloat16)` with fp32 weights.

  ours  `LearnerCore.train_step(table)`: Arrow table -> tensors, advantages, micro-batching of
        whole groups, Qwen2 forward with each prompt run once for its G completions
        (`Qwen2.completion_hidden`), chunked `token_logprobs` (+ entropy, as the learner always
        reports it), `grpo_loss`, backward, `clip_grad_norm_`, `CPUOffloadAdamW`, metrics.
        Everything counted.
  peer  what a user writes: `Qwen2ForCausalLM(ids).logits` on each prompt + completion row,
        `log_softmax`, `gather`, the clipped loss, backward, `torch.nn.utils.clip_grad_norm_`,
        `torch.optim.AdamW` (its CPU default), on length-sorted right-padded row micro-batches.
        Its micro-batch tensors are prepared *outside* the timer, so the peer gets a head start.

Figures: completion and total tokens/s per step (best of interleaved repeats), ours/peer ratio,
achieved FLOP/s (6 x matmul params x the tokens each side runs through the model, attention
ignored: ours runs a group's prompt once, the peer G times) as a fraction of a square
matmul peak measured in this run, and the cost of gradient checkpointing (time ratio and peak
memory). Memory is the peak of glibc's live heap (`mallinfo2`: arena bytes in use + mmapped
bytes; torch's CPU allocator does not cache, so this is live tensor memory plus small Python
objects) sampled every ~1 ms by a thread during one extra, untimed step, minus its value right
before that step.

    python -m bench.learner            # ~2.5 min on 2 idle cores (5+ min while other jobs run)
    python -m bench.learner --quick    # ~1 min: 8 groups for tiny, no memory step for mid
    python -m bench.learner --profile  # also print torch.profiler tables of one step of each side
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import torch

from bench.generate import matmul_peak, write_results  # one matmul ceiling and results format

from learner.learner import LearnerCore
from nanogrpo.episode import SCHEMA, to_tensors
from nanogrpo.grpo import group_advantages
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from nanogrpo.tiny import TINY_MODEL_CONFIG

# The default tiny model with a realistic (sub-word sized) vocabulary instead of 23 characters.
TINY = {**TINY_MODEL_CONFIG, "vocab_size": 1024, "max_position_embeddings": 512}
# A mid-size Qwen2 (~41M params): wide enough that matmuls, not Python, dominate a step.
MID = {**TINY_MODEL_CONFIG, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 2, "intermediate_size": 1536, "vocab_size": 32768, "max_position_embeddings": 512}
LR = 1e-5  # small: the repeated steps should not push the random policy anywhere extreme


# ----------------------------------------------------------------------------- workload
def make_table(groups: int, G: int, vocab: int, seed: int) -> pa.Table:
    """A GRPO batch as the buffer hands it to the learner: `groups` groups of G episodes."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    rows = []
    for gi in range(groups):
        prompt = torch.randint(2, vocab, (randint(16, 48),), generator=g).tolist()
        rewards = torch.rand(G, generator=g)  # continuous, so no group is zero-variance (none dropped)
        for s in range(G):
            n = randint(16, 128)
            rows.append(dict(
                group_id=gi, step=0, example_index=gi, sample_index=s, prompt_ids=prompt,
                completion_ids=torch.randint(2, vocab, (n,), generator=g).tolist(),
                # A random policy's log-probs are ~ -log V; jitter them so ratios are ~1, some clipped.
                logprobs=(-math.log(vocab) + 0.1 * torch.randn(n, generator=g)).tolist(),
                response="", reward=float(rewards[s]), reward_format=1.0,
                reward_answer=float(rewards[s] > 0.8), finish_reason="length", policy_version=0,
                worker_id=0, gen_seconds=0.0, created_at=0.0))
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def row_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Row indices in micro-batches of similar length: rows x longest row <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        if cur and lengths[cur[0]] * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def peer_batches(table: pa.Table, G: int, budget: int) -> tuple[list[dict], float]:
    """The peer's right-padded row micro-batches, as plain tensors."""
    table = table.sort_by("group_id")
    b = to_tensors(table, pad_id=0)
    adv, _ = group_advantages(b["rewards"], G)
    lengths = b["lengths"].tolist()
    out = []
    for mb in row_micro_batches(lengths, budget):
        idx = torch.tensor(mb)
        L = int(b["lengths"][idx].max())
        out.append(dict(ids=b["input_ids"][idx, :L], mask=b["loss_mask"][idx, :L - 1],
                        old=b["old_logprobs"][idx, :L - 1], adv=adv[idx]))
    return out, float(b["loss_mask"].sum())


# ----------------------------------------------------------------------------- the two sides
class Ours:
    def __init__(self, model_dir: str, G: int, groups: int, budget: int, threads: int):
        cfg = RunConfig(group_size=G, prompts_per_step=groups, micro_batch_tokens=budget, lr=LR,
                        old_logprobs="sampler")  # the peer takes its ratio to the sampler too
        self.core = LearnerCore(vars(cfg), model_dir, threads=threads)
        self.model = self.core.model

    def step(self, table: pa.Table) -> dict:
        # Mark every row as made by the current version: an on-policy step, as in a synchronous run
        # (otherwise later repeats would take the decoupled/TIS path for "stale" rows).
        v = pa.array([self.core.version] * table.num_rows, pa.int64())
        table = table.set_column(table.schema.get_field_index("policy_version"), "policy_version", v)
        metrics, _ = self.core.train_step(table)
        return metrics


class Peer:
    """The straightforward transformers loop (see the module docstring)."""

    def __init__(self, model_dir: str, clip_low: float, clip_high: float, clip_c: float):
        import transformers

        self.model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.clip_low, self.clip_high, self.clip_c = clip_low, clip_high, clip_c

    def step(self, batches: list[dict], tok_den: float) -> dict:
        self.model.train()
        for mb in batches:
            ids = mb["ids"]  # (b, L)
            logits = self.model(ids).logits[:, :-1]  # (b, L-1, V)
            logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, L-1)
            ratio = torch.exp(logp - mb["old"])
            adv = mb["adv"][:, None]  # (b, 1)
            pg = -torch.min(ratio * adv, ratio.clamp(1 - self.clip_low, 1 + self.clip_high) * adv)
            # Dual clip (our default --clip-ratio-c): a negative-advantage token loses at most c |adv|.
            pg = torch.where(adv < 0, torch.minimum(pg, -self.clip_c * adv), pg)
            loss = (pg * mb["mask"]).sum() / tok_den
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}


# ----------------------------------------------------------------------------- machine limits, memory
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _live_heap_reader():
    """-> (callable returning live heap bytes, description). glibc mallinfo2 when available
    (in-use arena bytes + mmapped bytes, all arenas), else resident set size from /proc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallinfo2()

        def read():
            m = libc.mallinfo2()
            return m.uordblks + m.hblkhd

        return read, "glibc mallinfo2 live heap (uordblks + hblkhd)"
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")

        def read():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read, "resident set size (/proc/self/statm)"


READ_HEAP, HEAP_METHOD = _live_heap_reader()


def peak_memory(fn) -> int:
    """Peak live-heap bytes above the pre-call level while fn() runs (sampled every ~1 ms)."""
    base = READ_HEAP()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], READ_HEAP())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(peak[0], READ_HEAP()) - base


# ----------------------------------------------------------------------------- one workload
def matmul_params(model: torch.nn.Module, cfg: dict) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup, with the
    LM head counted once (it *is* the embedding when tied)."""
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    total = sum(p.numel() for p in model.parameters())  # tied weights appear once
    return total if cfg["tie_word_embeddings"] else total - emb


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). With other jobs on the machine the wall time
    includes time descheduled; the CPU time does not, so its ratio is the load-robust cross-check."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_workload(name: str, shape: dict, groups: int, G: int, budget: int, reps: int, threads: int,
                   dtypes: list[str], peaks: dict, do_ckpt: bool, do_mem: bool, profile: bool) -> list[dict]:
    table = make_table(groups, G, shape["vocab_size"], seed=0)
    comp_tokens = sum(len(c) for c in table.column("completion_ids").to_pylist())
    tot_tokens = comp_tokens + sum(len(p) for p in table.column("prompt_ids").to_pylist())
    # Ours runs each group's prompt once (groups are G consecutive rows sharing one prompt).
    ours_tokens = comp_tokens + sum(len(p) for p in table.column("prompt_ids").to_pylist()[::G])
    batches, tok_den = peer_batches(table, G, budget)
    padded = sum(mb["ids"].numel() for mb in batches)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        Qwen2.from_config(shape, seed=0).save_pretrained(d)
        ours = Ours(d, G, groups, budget, threads)
        cfg = ours.core.cfg
        peer = Peer(d, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c)
        n_mm = matmul_params(ours.model, shape)

        # Same weights and micro-batches -> the same pre-clip gradient norm on the first step.
        # Guards against benchmarking two different computations.
        gn_ours = ours.step(table)["grad_norm"]
        gn_peer = peer.step(batches, tok_den)["grad_norm"]
        agree = abs(gn_ours - gn_peer) <= 1e-3 * max(abs(gn_peer), 1e-12)
        print(f"  [{name}] first-step grad norm ours {gn_ours:.6g} vs peer {gn_peer:.6g} "
              f"({'match' if agree else 'MISMATCH'}); {len(batches)} micro-batches, "
              f"{tot_tokens} real / {padded} padded tokens", flush=True)

        sides = {"ours": lambda: ours.step(table), "peer": lambda: peer.step(batches, tok_den)}
        ck = {}
        for dt in dtypes:
            amp = dt == "bfloat16"
            # Checkpointing is timed in fp32 only, as a third side interleaved with the other two.
            run = dict(sides, **({"ours_ckpt": sides["ours"]} if do_ckpt and not amp else {}))
            if amp:  # first use of the bf16 kernels (oneDNN primitive creation) is not timed
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    sides["ours"]()
                    sides["peer"]()
            wall = {k: [] for k in run}
            cpu = {k: [] for k in run}
            for _ in range(reps):  # interleaved, so a burst of load from elsewhere hits every side
                for k, fn in run.items():
                    ours.model.gradient_checkpointing = k == "ours_ckpt"
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        w, c = timed2(fn)
                    wall[k].append(w)
                    cpu[k].append(c)
            ours.model.gradient_checkpointing = False
            # Best of the repeats: load from other jobs only ever adds time, so the minimum is the
            # least disturbed estimate (medians are kept in the JSON too).
            med = {k: min(v) for k, v in wall.items()}
            cmed = {k: min(v) for k, v in cpu.items()}
            to, tp = med["ours"], med["peer"]
            flops, flops_peer = 6 * n_mm * ours_tokens, 6 * n_mm * tot_tokens
            row = dict(workload=name, dtype=dt, groups=groups, group_size=G, micro_batch_tokens=budget,
                       micro_batches=len(batches), completion_tokens=comp_tokens, total_tokens=tot_tokens,
                       padded_tokens=padded, matmul_params=n_mm, reps=reps,
                       ours_s_median=statistics.median(wall["ours"]), peer_s_median=statistics.median(wall["peer"]),
                       ours_s=to, peer_s=tp, ours_s_all=wall["ours"], peer_s_all=wall["peer"],
                       ours_completion_tok_s=comp_tokens / to, peer_completion_tok_s=comp_tokens / tp,
                       ours_total_tok_s=tot_tokens / to, peer_total_tok_s=tot_tokens / tp, speedup=tp / to,
                       ours_cpu_s=cmed["ours"], peer_cpu_s=cmed["peer"], speedup_cpu_time=cmed["peer"] / cmed["ours"],
                       ours_model_tokens=ours_tokens,
                       ours_gflops=flops / to / 1e9, peer_gflops=flops_peer / tp / 1e9, peak_gflops=peaks[dt] / 1e9,
                       ours_frac_of_peak=flops / to / peaks[dt], peer_frac_of_peak=flops_peer / tp / peaks[dt],
                       first_step_grad_norm_ours=gn_ours, first_step_grad_norm_peer=gn_peer, grad_norm_match=agree)
            # Load from other jobs shows up as wall and CPU-time ratios that disagree.
            row["disturbed"] = abs(math.log(row["speedup"] / row["speedup_cpu_time"])) > math.log(1.2)
            rows.append(row)
            print(_fmt_row(row) + ("  (disturbed?)" if row["disturbed"] else ""), flush=True)
            if "ours_ckpt" in med:
                ck = dict(ckpt_off_s=to, ckpt_on_s=med["ours_ckpt"], ckpt_on_s_all=wall["ours_ckpt"],
                          ckpt_time_ratio=med["ours_ckpt"] / to, ckpt_cpu_time_ratio=cmed["ours_ckpt"] / cmed["ours"])
        if do_mem:
            ck["mem_method"] = HEAP_METHOD
            ck["peak_mem_ours_MiB"] = peak_memory(lambda: ours.step(table)) / 2**20
            ours.model.gradient_checkpointing = True
            ck["peak_mem_ours_ckpt_MiB"] = peak_memory(lambda: ours.step(table)) / 2**20
            ours.model.gradient_checkpointing = False
            ck["peak_mem_peer_MiB"] = peak_memory(lambda: peer.step(batches, tok_den)) / 2**20
            ck["ckpt_mem_ratio"] = ck["peak_mem_ours_ckpt_MiB"] / ck["peak_mem_ours_MiB"]
        if ck:
            rows[0].update(ck)  # the fp32 row carries the checkpointing figures
            print(f"  [{name}] grad checkpointing: " + ", ".join(
                f"{k} {v:.3g}" for k, v in ck.items() if isinstance(v, float)), flush=True)

        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile
            for side, fn in (("ours", lambda: ours.step(table)), ("peer", lambda: peer.step(batches, tok_den))):
                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                print(f"\n  [{name}] torch.profiler, one {side} step (fp32), top ops by self CPU time:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return rows


HEADER = (f"{'workload':<26}{'dtype':<10}{'ours tok/s':>11}{'peer tok/s':>11}{'ours s':>8}{'peer s':>8}"
          f"{'speedup':>9}{'cpu-t':>7}{'GFLOP/s':>9}{'peak':>7}{'%peak':>7}")


def _fmt_row(r):
    return (f"{r['workload']:<26}{r['dtype']:<10}{r['ours_completion_tok_s']:>11.0f}"
            f"{r['peer_completion_tok_s']:>11.0f}{r['ours_s']:>8.2f}{r['peer_s']:>8.2f}{r['speedup']:>8.2f}x"
            f"{r['speedup_cpu_time']:>6.2f}x{r['ours_gflops']:>9.1f}{r['peak_gflops']:>7.0f}"
            f"{100 * r['ours_frac_of_peak']:>6.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 groups for tiny, no memory step for mid (~1 min)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["tiny", "mid"], help="run one model size")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step each")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_learner.json")))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    peaks = {"float32": matmul_peak(torch.float32, reps=10), "bfloat16": matmul_peak(torch.bfloat16, reps=10)}
    print(f"threads={args.threads} torch={torch.__version__} transformers={transformers.__version__} "
          f"matmul peak: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    print("tok/s = completion tokens per second through one whole GRPO step (fwd+bwd+optimizer), best of "
          "interleaved repeats; speedup = peer s / ours s (wall), cpu-t = the same on process CPU time; "
          "GFLOP/s = ours, 6 x matmul params x real tokens")
    # bf16 autocast rows only where `--dtype auto` would pick bf16: on an AVX2-only CPU bf16 is
    # emulated (~1 GFLOP/s), a 41M step takes minutes, and no run there would use it.
    from nanogrpo.hardware import resolve_dtype
    dtypes = ["float32"] + (["bfloat16"] if resolve_dtype("auto", "cpu") == torch.bfloat16 else [])
    if len(dtypes) == 1:
        print("bf16 rows skipped: --dtype auto picks fp32 on this CPU (bf16 is not native here)")
    print(HEADER, flush=True)
    rows = []
    if args.only in (None, "tiny"):
        groups, reps = (8, 5) if args.quick else (16, 5)  # ~1 s steps: repeats are cheap, noise is not
        rows += bench_workload(f"tiny 1024v {groups}x8", TINY, groups, 8, 16384, reps, args.threads,
                               dtypes, peaks, do_ckpt=True, do_mem=True, profile=args.profile)
    if args.only in (None, "mid"):
        # One group: a 41M-param step on ~0.9k tokens is ~0.2 TFLOP, seconds per step on 2 cores.
        # A 32k vocabulary makes a micro-batch's logits budget x V x 4 bytes: 4096 tokens -> 512 MiB.
        reps = 2
        rows += bench_workload("mid 41M 1x8", MID, 1, 8, 4096, reps, args.threads, dtypes,
                               peaks, do_ckpt=True, do_mem=not args.quick, profile=args.profile)
    # The machine limit, measured again now; rows are rescaled to the better of the two peaks.
    for dt, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peaks[dt] = max(peaks[dt], matmul_peak(dtype, reps=10))
    for r in rows:
        r["peak_gflops"] = peaks[r["dtype"]] / 1e9
        r["ours_frac_of_peak"] = r["ours_gflops"] / r["peak_gflops"]
        r["peer_frac_of_peak"] = r["peer_gflops"] / r["peak_gflops"]
    print(f"matmul peak (best of start and end): fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    for r in rows:
        print(f"  {r['workload']} {r['dtype']}: ours {r['ours_gflops']:.1f} GFLOP/s = "
              f"{100 * r['ours_frac_of_peak']:.1f}% of peak (peer {100 * r['peer_frac_of_peak']:.1f}%)"
              + ("  [wall and CPU-time ratios disagree: disturbed by other load, repeat]" if r["disturbed"] else ""))
    headline = next(r for r in rows if r["dtype"] == "float32")
    write_results(args, peaks, rows, headline, "learner_speedup_vs_transformers", " (ours / peer tokens/s)",
                  mem_method=HEAP_METHOD)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
