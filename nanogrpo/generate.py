"""Batched sampling for RL rollouts: prompts x n samples, each prompt prefilled once.

The shape of the work is what GRPO needs, not what a chat UI needs:
  * each prompt is prefilled once and its KV rows copied into the n rows of its group
    (`KVCache.reorder`), instead of prefilling n identical copies;
  * rows that hit a stop token stop costing compute: the batch is compacted (finished rows are
    dropped from the cache) once enough of them have finished;
  * sampling is a handful of batched tensor ops per step (temperature, top-k, top-p, an
    inverse-CDF draw from a seeded generator); nothing loops over the vocabulary in Python;
  * every completion comes back with the log-prob of each sampled token under the distribution it
    was actually drawn from (after temperature / top-k / top-p), which the learner uses as the
    behaviour policy in its importance ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import KVCache, Qwen2


@dataclass
class Completion:
    prompt_index: int        # which prompt of the batch
    sample_index: int        # which of its n samples
    token_ids: list[int]     # generated ids, including the stop token when finish_reason == "stop"
    logprobs: list[float]    # log-prob of each generated id under the sampling distribution
    finish_reason: str       # "stop" (a stop id was sampled) or "length" (max_new_tokens reached)


def process_logits(logits, temperature: float, top_k: int, top_p: float, logit_bias=None):
    """logits (B, V) -> log-probs (B, V) of the distribution actually sampled from (fp32).

    temperature == 0 means greedy; its log-probs are those of the untempered model (T = 1).
    """
    logits = logits.float()
    if logit_bias is not None:
        logits = logits + logit_bias
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if temperature > 0 and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature > 0 and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token
        # always survives.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.log_softmax(logits, dim=-1)


def sample(logprobs, temperature: float, generator):
    """logprobs (B, V) -> token ids (B,) and their log-probs (B,)."""
    if temperature == 0:
        tokens = logprobs.argmax(-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    return draw(logprobs, generator)


BLOCK = 128  # vocabulary block of the two-level inverse-CDF draw; divides 151936 and 128256


def draw(x, generator):
    """Sample from softmax(x) (B, V) fp32 (-inf allowed) -> ids (B,), their log-probs (B,).

    Inverse CDF with one uniform per row, in two levels: pick a block of BLOCK tokens from the
    block masses, then a token inside it. torch.multinomial instead draws one exponential per
    vocabulary entry (B x 152k per step for Qwen), which cost more than the rest of a decode step
    on CPU. A flat fp32 cumsum over 152k entries would be cheap but skews the distribution by up
    to ~1e-3 in total variation through rounding; per-block sums and an fp64 cumsum within the
    chosen block keep every token's probability exact to ~1e-7 of its block's mass (the
    clamps below absorb the rounding difference between a block's sum and its inner cumsum).
    """
    B, V = x.shape
    m = x.amax(-1, keepdim=True)  # (B, 1)
    e = (x - m).exp_()  # (B, V) unnormalised probabilities, max 1
    nb = -(-V // BLOCK)
    if nb * BLOCK != V:
        e = torch.nn.functional.pad(e, (0, nb * BLOCK - V))
    e = e.view(B, nb, BLOCK)
    block_cdf = e.sum(-1).double().cumsum_(-1)  # (B, nb); fp32 sums of 128: ~1e-7 relative error
    total = block_cdf[:, -1:]  # (B, 1)
    u = torch.rand(B, 1, dtype=torch.float64, device=x.device, generator=generator) * total
    # u < total strictly, so the search never runs off the end; an index whose cdf does not rise
    # (a zero-probability block or token) can never be the first one above u.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    blk = torch.searchsorted(block_cdf, u, right=True).clamp_(max=nb - 1)  # (B, 1)
    below = torch.where(blk > 0, block_cdf.gather(-1, (blk - 1).clamp_(min=0)), 0.0)  # (B, 1)
    inner = e.gather(1, blk[:, :, None].expand(B, 1, BLOCK)).squeeze(1).cumsum(-1, dtype=torch.float64)  # (B, BLOCK)
    rem = torch.minimum(u - below, torch.nextafter(inner[:, -1:], torch.zeros_like(total)))
    tok = (blk * BLOCK + torch.searchsorted(inner, rem, right=True).clamp_(max=BLOCK - 1)).squeeze(-1)  # (B,)
    logp = x.gather(-1, tok[:, None]).squeeze(-1) - m.squeeze(-1) - total.squeeze(-1).log().float()
    return tok, logp


def next_tokens(logits, temperature: float, top_k: int, top_p: float, bias, generator):
    """logits (B, V) -> ids (B,), log-probs (B,) under the distribution sampled from.

    Same distribution as process_logits + sample, without materialising the full log-softmax
    (a decode step needs the log-prob of one token per row, not of all 152k). fp32 logits are
    modified in place: pass a tensor nobody else reads (generate passes the model's output).
    """
    if top_p < 1.0 and temperature > 0:
        return sample(process_logits(logits, temperature, top_k, top_p, bias), temperature, generator)
    x = logits.float()  # (B, V); a fresh tensor from the model, so in-place ops below are safe
    if bias is not None:
        x.add_(bias)
    if temperature == 0:
        tok = x.argmax(-1)
        return tok, x.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
    if temperature != 1.0:
        x.div_(temperature)
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # (B, 1)
        x.masked_fill_(x < kth, float("-inf"))
    return draw(x, generator)


@torch.inference_mode()
def generate(model: Qwen2, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_token_ids=(), seed: int = 0, logit_bias: dict[int, float] | None = None,
             max_batch_rows: int = 512, compact_fraction: float = 0.125) -> list[Completion]:
    """Sample n completions for every prompt; returns len(prompts) * n Completions, prompt-major.

    prompts: token id lists of any (non-zero) lengths. stop_token_ids: finishing on any of them.
    seed: results are deterministic for a fixed seed, model and batch.
    max_batch_rows: prompts are processed in chunks of at most this many rows (prompts * n).
    compact_fraction: compact the cache once this fraction of the live rows has finished.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    bias = None
    if logit_bias:
        bias = torch.zeros(model.config.vocab_size, device=device)
        bias[torch.tensor(list(logit_bias), device=device)] = torch.tensor(list(logit_bias.values()), device=device)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    per_chunk = max(1, max_batch_rows // n)
    out: list[Completion] = []
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start:start + per_chunk]
        out += _generate_chunk(model, chunk, start, n, max_new_tokens, temperature, top_k, top_p,
                               stops, gen, bias, compact_fraction)
    return out


def _generate_chunk(model, prompts, offset, n, max_new, temperature, top_k, top_p, stops, gen, bias,
                    compact_fraction):
    device, P = model.device, len(prompts)
    R = P * n
    lens = torch.tensor([len(p) for p in prompts], device=device)  # (P,)
    T = int(max(len(p) for p in prompts))
    ids = torch.zeros(P, T, dtype=torch.long, device=device)  # right-padded prompts (P, T)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    cache = KVCache(model.config, R, T + max_new, dtype=model.dtype, device=device)

    # Prefill each prompt once, then copy its cache rows into the n rows of its group.
    logits = model(ids, cache=cache, input_lengths=lens, logits_at=lens - 1)  # (P, V)
    group = torch.arange(P, device=device).repeat_interleave(n)  # (R,)
    cache.reorder(group)
    logits = logits[group]  # (R, V)

    tokens_out = torch.zeros(R, max_new, dtype=torch.long, device=device)
    logp_out = torch.zeros(R, max_new, dtype=torch.float32, device=device)
    gen_len = torch.full((R,), max_new, dtype=torch.long, device=device)  # (R,)
    stopped = torch.zeros(R, dtype=torch.bool, device=device)
    rows = torch.arange(R, device=device)  # original row id of each live cache row
    done = torch.zeros(R, dtype=torch.bool, device=device)  # finished rows still in the cache
    n_done = 0
    for step in range(max_new):
        tok, tok_logp = next_tokens(logits, temperature, top_k, top_p, bias, gen)  # (B,), (B,)
        # Finished rows not yet compacted away keep decoding; what they write lands past their
        # gen_len and is cut off below, which is cheaper than masking every write.
        tokens_out[rows, step] = tok
        logp_out[rows, step] = tok_logp
        if stops.numel():
            hit = (tok[:, None] == stops).any(-1) & ~done  # (B,)
            if hit.any():
                gen_len[rows[hit]] = step + 1
                stopped[rows[hit]] = True
                done |= hit
                n_done = int(done.sum())
        if step == max_new - 1 or n_done == done.numel():
            break
        B = done.numel()
        # Large batches shrink in multiples of 8 (a few finished rows ride along): each new batch
        # size costs a oneDNN kernel JIT per matmul shape in bf16 on CPU (~1 ms each), which is a
        # step's worth of a small model. Below 64 rows a spare row costs more than that.
        gran = 8 if B >= 64 else 1
        keep = min(B, -(-(B - n_done) // gran) * gran)
        if n_done and n_done >= compact_fraction * B and keep < B:
            # Drop finished rows by moving the live rows past `keep` into finished slots before
            # it: copies at most n_done cache rows instead of gathering all of them.
            donors = (~done[keep:]).nonzero().squeeze(-1) + keep  # (d,) live rows to move
            holes = done[:keep].nonzero().squeeze(-1)[: donors.numel()]  # (d,) finished slots
            cache.move_rows(donors, holes)
            rows[holes], tok[holes], done[holes] = rows[donors], tok[donors], False
            rows, tok, done = rows[:keep], tok[:keep], done[:keep]
            n_done = keep - (B - n_done)
        logits = model(tok[:, None], cache=cache)[:, -1]  # (B, V)

    lengths, reasons = gen_len.tolist(), stopped.tolist()
    toks, logps = tokens_out.tolist(), logp_out.tolist()
    return [Completion(prompt_index=offset + r // n, sample_index=r % n, token_ids=toks[r][: lengths[r]],
                       logprobs=logps[r][: lengths[r]], finish_reason="stop" if reasons[r] else "length")
            for r in range(R)]
