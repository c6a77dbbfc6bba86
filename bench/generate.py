"""Rollout throughput: nanogrpo.generate vs transformers.generate on the same weights, prompts, dtype.

The workload is what a GRPO rollout actor does: P prompts of mixed length, G samples each at
temperature 1, up to N new tokens, completion lengths spread out by an EOS logit bias (as a
partly trained policy's are). Both engines sample from the same distribution (same bias, no top-k /
top-p), so they complete about the same number of tokens; we report completed tokens per second.

With --model DIR (a real checkpoint, e.g. SmolLM2-135M-Instruct from
../shared/tools/make_smollm2.py) it also runs the real RL workload: 8 GSM8K questions in the model's
chat template x 8 samples, temperature 1, the model's own EOS and lengths, in fp32 and in the dtype
`--dtype auto` picks on this machine. Continuous refill is compared with chunked batches on the
same prompts (long-tailed lengths), our engine only.

Also reported: batch-1 decode bytes read per second on the 0.5B shape vs one large copy's
bandwidth (the memory roofline a batch-1 decode step lives under), and our achieved FLOP/s
(2 * matmul params * tokens + attention, prefill counted once per prompt) as a fraction of a
matmul peak measured in the same run, so "fast" is judged against the machine, not only a peer.

    python -m bench.generate --model DIR          # full run (256 new tokens on the real model)
    python -m bench.generate --quick --model DIR  # 3 tiny repeats, a shorter 0.5B run, 64 new tokens

The headline (last line) is the tiny model in fp32, the dtype the CPU rollout actors use. The
machine is shared: the load average is printed, the tiny model's runs alternate engines and keep
each one's best, and a CPU-time ratio is reported beside the wall-clock one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from nanogrpo.config import ModelConfig
from nanogrpo.generate import generate
from nanogrpo.model import Qwen2

EOS = 1
PAD = 0
TINY = dict(model_type="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=384,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512)
QWEN05 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)


def sync(device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done, not when it is queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype, n=2048, reps=5, device="cpu", budget_s: float = 4.0) -> float:
    """Best-of-reps FLOP/s of an (m x m) @ (m x m) matmul, m <= n: the ceiling for our matmuls.

    Capped by time, not by work: the size doubles from 256 only while one matmul takes under a
    tenth of budget_s / reps, and the repeats stop once budget_s is spent. Where bf16 is emulated
    (AVX2-only CPUs, ~1-25 GFLOP/s) a fixed 2048^3 x 6 measurement took minutes; a 256-1024 matmul
    already runs at the machine's rate there."""
    def once(m):
        a, b = torch.randn(m, m, dtype=dtype, device=device), torch.randn(m, m, dtype=dtype, device=device)
        a @ b  # first call picks kernels
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        return a, b, time.perf_counter() - t

    m = 256
    a, b, dt = once(m)
    while 2 * m <= n and dt * 8 < budget_s / (10 * reps):
        m *= 2
        a, b, dt = once(m)
    best, spent = dt, 0.0
    for _ in range(reps):
        if spent > budget_s:
            break
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
        spent += time.perf_counter() - t
    return 2 * m ** 3 / best


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-reps bytes moved per second (read + written, the STREAM 'copy' convention) by one
    large tensor copy, far bigger than any cache: the roofline for a memory-bound decode step."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode_bandwidth(shape: dict, dtype, new_tokens: int = 32) -> dict:
    """Batch-1 decode: every step reads all matmul weights (plus the short KV cache), so its bytes
    read per second against copy_bandwidth() says how close the engine runs to the memory roofline.
    Prefill is timed separately (a 1-token run) and subtracted."""
    cfg = ModelConfig(**shape)
    model = random_model(cfg, seed=0).to(dtype).eval()
    prompt = make_prompts(1, 16, 17, cfg.vocab_size, seed=2)
    no_eos = {EOS: -1e4}

    def timed(n):
        t = time.perf_counter()
        out = generate(model, prompt, n=1, max_new_tokens=n, temperature=1.0, stop_token_ids=[EOS],
                       logit_bias=no_eos, seed=0)
        return time.perf_counter() - t, len(out[0].token_ids)

    timed(2)  # first-use costs
    t1 = min(timed(1)[0] for _ in range(2))
    tn, got = min(timed(new_tokens + 1) for _ in range(2))
    step_s = (tn - t1) / (got - 1)
    esz = torch.finfo(dtype).bits // 8
    weight_bytes = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * esz
    if cfg.tie_word_embeddings:
        weight_bytes += model.lm_head.weight.numel() * esz
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * esz * (16 + new_tokens / 2)
    return {"dtype": str(dtype).removeprefix("torch."), "decode_tok_s": 1.0 / step_s,
            "bytes_per_step": weight_bytes + kv_bytes, "decode_GBps": (weight_bytes + kv_bytes) / step_s / 1e9}


def empty_model(cfg: ModelConfig | dict, dtype, device="cpu") -> Qwen2:
    """Right shapes, uninitialised values: a matmul's or a copy's speed does not depend on them."""
    cfg = ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    with torch.device("meta"):
        model = Qwen2(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty from meta unties them
    return model


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16) -> Qwen2:
    """N(0, 0.02) weights, unit norms, zero biases. Stored in bf16 (both engines then load and
    cast the same bits); matrices are filled from one pool of 2^22 normal draws at random offsets,
    because drawing all 494M values of the 0.5B shape takes ~15 s on 2 cores and the speed of a
    matmul does not depend on the values."""
    model = empty_model(cfg, dtype)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=gen).mul_(0.02).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                flat = p.view(-1)
                for i in range(0, flat.numel(), pool.numel() // 2):
                    n = min(pool.numel() // 2, flat.numel() - i)
                    off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
                    flat[i:i + n] = pool[off:off + n]
    return model


def make_prompts(n, lo, hi, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def count_completed(rows: list[list[int]], eos: int = EOS) -> int:
    """transformers pads finished rows; count up to and including the first EOS."""
    return sum(r.index(eos) + 1 if eos in r else len(r) for r in rows)


def useful_flops(cfg: ModelConfig, n_matmul_params: int, prompts, completions) -> float:
    """2*params per token through the layers, lm_head only where logits are needed, attention
    4*L*H*D*context per token; each prompt prefilled once (the work a sampler must do)."""
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    head = cfg.vocab_size * cfg.hidden_size
    body = n_matmul_params - head
    f = 0.0
    for p in prompts:
        f += 2 * body * len(p) + 2 * head + 4 * L * H * D * len(p) * (len(p) + 1) / 2
    for p, c in completions:
        k = max(len(c) - 1, 0)  # the last sampled token is never fed back
        ctx = sum(len(p) + i + 1 for i in range(k))
        f += 2 * (body + head) * k + 4 * L * H * D * ctx
    return f


def run_ours(model, prompts, G, max_new, bias, eos=EOS, **kw):
    """bias: a logit bias on EOS, or None. kw: generate's batch settings (max_batch_rows, refill)."""
    sync(model.device)
    c, t = time.process_time(), time.perf_counter()
    outs = generate(model, prompts, n=G, max_new_tokens=max_new, temperature=1.0, stop_token_ids=[eos],
                    logit_bias=None if bias is None else {eos: bias}, seed=0, **kw)  # ends in .tolist(): synced
    return (time.perf_counter() - t, time.process_time() - c), outs


def run_hf(hf, prompts, G, max_new, bias, eos=EOS, pad=PAD):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # transformers wants left padding for decoder-only generate
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    torch.manual_seed(0)
    sync(hf.device)
    c, t = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=G,
                          max_new_tokens=max_new, temperature=1.0, top_k=0, top_p=1.0,
                          eos_token_id=eos, pad_token_id=pad, use_cache=True,
                          **({} if bias is None else {"sequence_bias": [[[eos], float(bias)]]}))
    sync(hf.device)
    return (time.perf_counter() - t, time.process_time() - c), count_completed(out[:, T:].tolist(), eos)


def compare(name, dtype, ours, hf, prompts, G, max_new, bias, reps, eos=EOS, pad=PAD) -> dict:
    """Time both engines on the same work; one row of tokens/s, their ratio and our FLOP/s."""
    # One short call each so first-use costs (allocator, oneDNN kernels) are not timed.
    run_ours(ours, prompts[:2], 2, 4, bias, eos)
    run_hf(hf, prompts[:2], 2, 4, bias, eos, pad)
    # Alternate the engines and keep each one's best run: the machine is shared, and a burst of
    # someone else's work should not decide the ratio.
    t_hf = t_ours = (float("inf"), float("inf"))  # (wall s, cpu s) of the fastest run
    for _ in range(reps):
        t, tok_hf = run_hf(hf, prompts, G, max_new, bias, eos, pad)
        t_hf = min(t_hf, t)
        t, outs = run_ours(ours, prompts, G, max_new, bias, eos)
        t_ours = min(t_ours, t)
    (t_hf, cpu_hf), (t_ours, cpu_ours) = t_hf, t_ours
    tok_ours = sum(len(c.token_ids) for c in outs)
    cfg = ours.config
    matmul_params = sum(p.numel() for n, p in ours.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        matmul_params += ours.lm_head.weight.numel()
    flops = useful_flops(cfg, matmul_params, prompts, [(prompts[c.prompt_index], c.token_ids) for c in outs])
    row = dict(workload=name, dtype=str(dtype).removeprefix("torch."), prompts=len(prompts), samples=G,
               max_new_tokens=max_new, ours_tokens=tok_ours, ours_s=t_ours, ours_tok_s=tok_ours / t_ours,
               hf_tokens=tok_hf, hf_s=t_hf, hf_tok_s=tok_hf / t_hf, speedup=(tok_ours / t_ours) / (tok_hf / t_hf),
               # CPU seconds (both threads) are less swayed by other jobs than wall time.
               ours_cpu_s=cpu_ours, hf_cpu_s=cpu_hf, speedup_cpu_time=(tok_ours / cpu_ours) / (tok_hf / cpu_hf),
               ours_gflops=flops / t_ours / 1e9)
    print(_fmt_row(row), flush=True)
    return row


def bench_shape(name, shape, n_prompts, G, max_new, plen, bias, dtypes, reps, device="cpu"):
    import transformers

    cfg = ModelConfig(**shape)
    base = random_model(cfg, seed=0)
    prompts = make_prompts(n_prompts, *plen, cfg.vocab_size, seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        del base
        for dtype in dtypes:
            ours = Qwen2.from_pretrained(d, dtype=dtype, device=device).eval()
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
            rows.append(compare(name, dtype, ours, hf, prompts, G, max_new, bias, reps))
            del ours, hf
    return rows


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    """The first n GSM8K test questions in the checkpoint's own chat template (../shared data), or
    n fixed arithmetic questions where that file is absent."""
    from nanogrpo.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if data.is_file():
        qs = [json.loads(line)["question"] for line in data.read_text().splitlines()[:n]]
    else:
        qs = [f"What is {17 * i + 3} times {i + 4}? Explain step by step." for i in range(n)]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            for q in qs]


def bench_real(model_dir: str, n_prompts, G, max_new, dtypes, reps) -> list[dict]:
    """A real checkpoint on chat prompts, its own EOS, no bias: the lengths are the model's own."""
    import transformers

    from nanogrpo.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = chat_prompts(model_dir, n_prompts)
    name = f"{Path(model_dir).name} {n_prompts}x{G} {max_new}new"
    rows = []
    for dtype in dtypes:
        ours = Qwen2.from_pretrained(model_dir, dtype=dtype).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        rows.append(compare(name, dtype, ours, hf, prompts, G, max_new, None, reps, eos, pad))
        del ours, hf
    return rows


def bench_refill(model, prompts, G, max_new, bias, rows_limit, reps, eos=EOS) -> dict:
    """Rollout tokens/s with continuous refill vs chunks of rows_limit rows, same seed and work:
    lengths spread by an EOS bias (geometric: many short, a long tail) or a real model's own."""
    run_ours(model, prompts[:2], 2, 4, bias, eos)
    best = {True: float("inf"), False: float("inf")}
    toks = {}
    for _ in range(reps):
        for refill in (False, True):
            (t, _), outs = run_ours(model, prompts, G, max_new, bias, eos, max_batch_rows=rows_limit, refill=refill)
            best[refill] = min(best[refill], t)
            toks[refill] = sum(len(c.token_ids) for c in outs)
    lens = sorted(len(c.token_ids) for c in outs)
    row = dict(rows_limit=rows_limit, prompts=len(prompts), samples=G, max_new_tokens=max_new,
               length_p10_p50_p90=[lens[len(lens) // 10], lens[len(lens) // 2], lens[9 * len(lens) // 10]],
               refill_tok_s=toks[True] / best[True], chunked_tok_s=toks[False] / best[False],
               refill_speedup=(toks[True] / best[True]) / (toks[False] / best[False]),
               dtype=str(model.dtype).removeprefix("torch."))
    print(f"refill vs chunks ({len(prompts)}x{G}, {max_new} new, {rows_limit} rows, lengths p10/50/90 "
          f"{row['length_p10_p50_p90']}): {row['refill_tok_s']:.0f} vs {row['chunked_tok_s']:.0f} tok/s "
          f"= {row['refill_speedup']:.2f}x", flush=True)
    return row


HEADER = (f"{'workload':<24}{'dtype':<10}{'ours tok/s':>11}{'hf tok/s':>10}{'speedup':>9}"
          f"{'ours tok':>9}{'hf tok':>8}{'ours s':>8}{'hf s':>8}{'cpu-s ratio':>12}{'GFLOP/s':>9}{'peak':>8}{'%peak':>7}")


def _fmt_row(r):
    return (f"{r['workload']:<24}{r['dtype']:<10}{r['ours_tok_s']:>11.0f}{r['hf_tok_s']:>10.0f}{r['speedup']:>8.2f}x"
            f"{r['ours_tokens']:>9}{r['hf_tokens']:>8}{r['ours_s']:>8.2f}{r['hf_s']:>8.2f}{r['speedup_cpu_time']:>11.2f}x"
            f"{r['ours_gflops']:>9.1f}" + (f"{r['peak_gflops']:>8.0f}{100 * r['frac_of_peak']:>6.1f}%"
                                           if "peak_gflops" in r else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 tiny repeats, a shorter 0.5B run in fp32 only, "
                    "the real checkpoint with 64 new tokens (~3 min with --model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["tiny", "0.5b", "real"], help="run one workload")
    ap.add_argument("--model", default=os.environ.get("NANOGRPO_BENCH_MODEL"),
                    help="a real HF checkpoint directory for the 8x8 chat workload (default: $NANOGRPO_BENCH_MODEL; "
                    "none: skipped), e.g. one built by ../shared/tools/make_smollm2.py")
    ap.add_argument("--reps", type=int, default=0, help="timed runs per engine, alternating, best kept "
                    "(default: 5 on the tiny model, 2 on the real one; --quick: 3 and 1)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_generate.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from nanogrpo.hardware import resolve_dtype

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load0 = os.getloadavg()[0]
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    auto = resolve_dtype("auto", "cpu")
    # The dtypes a user's run would use: fp32 and what --dtype auto picks here. bf16 where it is
    # emulated (AVX2-only CPUs) runs only in the full suite, for information.
    used = [torch.float32] + ([auto] if auto != torch.float32 else [])
    print(f"threads={args.threads} torch={torch.__version__} transformers={transformers.__version__}; "
          f"load average {load0:.1f} on {os.cpu_count()} cores (shared machine); --dtype auto = {auto}")
    print(HEADER[:HEADER.index("    peak")], flush=True)
    rows, bandwidth, refill = [], [], []
    # EOS bias: a random model is near-uniform over the vocabulary, so P(EOS) ~ e^b / V per step.
    if args.only in (None, "tiny"):
        # The same workload with --quick (3 repeats instead of 5): 256 rows of up to 128 tokens, a
        # run of ~0.7 s (ours) and ~3 s (transformers). An earlier quick workload, 16x8 with 64 new
        # tokens, ran ours for 0.25 s, where fixed per-call costs and the machine's jitter moved
        # the ratio between 2.9x and 3.8x from run to run.
        rows += bench_shape("tiny 32x8 128new", TINY, 32, 8, 128, (8, 64), bias=3.0,
                            dtypes=used if args.quick else [torch.float32, torch.bfloat16],
                            reps=args.reps or (3 if args.quick else 5))
        tiny = random_model(ModelConfig(**TINY), seed=0).float().eval()
        refill.append(bench_refill(tiny, make_prompts(64, 8, 64, TINY["vocab_size"], seed=1), 8, 128, 3.0,
                                   rows_limit=64, reps=3))
        refill[-1]["workload"] = "tiny 64x8 128new"
    if args.only in (None, "0.5b"):
        # ~2 GFLOP a token: where fp32 runs below ~60 GFLOP/s (older AVX2 parts), halve the budget
        # so the quick suite stays within its limit.
        max_new = (32 if peaks["float32"] > 60e9 else 16) if args.quick else 64
        rows += bench_shape(f"qwen2.5-0.5b 4x8 {max_new}new", QWEN05, 4, 8, max_new, (8, 64),
                            bias=9.0, dtypes=[torch.float32] if args.quick else used, reps=1)
        copy_bw = copy_bandwidth()
        for dtype in ([torch.float32] if args.quick else used):
            d = decode_bandwidth(QWEN05, dtype)
            d.update(workload="qwen2.5-0.5b batch-1 decode", copy_GBps=copy_bw / 1e9,
                     frac_of_copy=d["decode_GBps"] * 1e9 / copy_bw)
            bandwidth.append(d)
            print(f"batch-1 decode, 0.5B shape, {d['dtype']}: {d['decode_tok_s']:.1f} tok/s, "
                  f"{d['decode_GBps']:.1f} GB/s read vs copy {copy_bw / 1e9:.1f} GB/s ({100 * d['frac_of_copy']:.0f}%)",
                  flush=True)
    if args.only in (None, "real") and args.model:
        # The RL workload of a real run: 8 prompts x 8 samples at temperature 1, the model's own
        # lengths. 256 new tokens take transformers minutes in fp32 on 2 cores: 64 with --quick.
        # Two alternating runs each: the first run after loading is often the slower one here.
        real = bench_real(args.model, 8, 8, 64 if args.quick else 256, used,
                          reps=args.reps or (1 if args.quick else 2))
        for r in real:
            r["auto_dtype"] = r["dtype"] == str(auto).removeprefix("torch.")
        rows += real
        if not args.quick:
            model = Qwen2.from_pretrained(args.model, dtype=auto).eval()
            from nanogrpo.tokenizer import Tokenizer

            refill.append(bench_refill(model, chat_prompts(args.model, 16), 8, 256, None, rows_limit=64, reps=1,
                                       eos=Tokenizer.from_pretrained(args.model).eos_token_id))
            refill[-1]["workload"] = f"{Path(args.model).name} 16x8 256new"
    elif args.only == "real":
        raise SystemExit("--only real needs --model DIR (or $NANOGRPO_BENCH_MODEL)")
    # The peak is measured again at the end and the better figure kept, so a busy moment at the
    # start does not flatter the fraction of peak.
    for k, v in {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}.items():
        peaks[k] = max(peaks[k], v)
    for r in rows:
        r["peak_gflops"] = peaks[r["dtype"]] / 1e9
        r["frac_of_peak"] = r["ours_gflops"] / r["peak_gflops"]
    print(f"\nmatmul peak (up to 2048^3, time-capped; best of start/end): fp32 {peaks['float32'] / 1e9:.0f} "
          f"GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s; load average at end {os.getloadavg()[0]:.1f}")
    print(HEADER)
    for r in rows:
        print(_fmt_row(r))
    headline = next((r for r in rows if r["workload"].startswith("tiny") and r["dtype"] == "float32"), rows[0])
    write_results(args, peaks, rows, headline, "speedup_vs_transformers", "", auto_dtype=str(auto),
                  loadavg_start=load0, loadavg_end=os.getloadavg()[0], decode_bandwidth=bandwidth, refill=refill)


def write_results(args, peaks: dict, rows: list, headline: dict, key: str, what: str, **extra):
    """Write a benchmark's JSON (machine, peaks, rows, headline ratio) to args.out and print the
    headline as the last line, `key: ratio`, which the suite reads."""
    import transformers

    result = dict(threads=args.threads, quick=args.quick, torch=torch.__version__,
                  transformers=transformers.__version__, peak_gflops={k: v / 1e9 for k, v in peaks.items()},
                  **extra, rows=rows, headline=dict(workload=headline["workload"], dtype=headline["dtype"],
                                                    speedup_vs_transformers=headline["speedup"]))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}; headline = {headline['workload']} {headline['dtype']}{what}")
    print(f"{key}: {headline['speedup']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
