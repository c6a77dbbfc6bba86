"""Batched sampling for RL rollouts: prompts x n samples, each prompt prefilled once.

The shape of the work is what GRPO needs, not what a chat UI needs:
  * each prompt is prefilled once and its KV rows copied into the n rows of its group
    (`KVCache.copy_rows`), instead of prefilling n identical copies;
  * the batch stays full: when a call has more rows than max_batch_rows, a waiting prompt's group
    is admitted into the rows finished ones leave (continuous refill), so completion lengths that
    spread from tens to hundreds of tokens do not leave the batch shrinking to a long tail;
  * once nothing waits, rows that hit a stop token stop costing compute: the batch is compacted
    (finished rows are dropped from the cache) once enough of them have finished;
  * sampling is a handful of batched tensor ops per step (temperature, top-k, top-p, an
    inverse-CDF draw from a seeded generator); nothing loops over the vocabulary in Python;
  * every completion comes back with the log-prob of each sampled token under the distribution it
    was actually drawn from (after temperature / top-k / top-p), which the learner uses as the
    behaviour policy in its importance ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache
from .model import Qwen2


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
             max_batch_rows: int = 512, compact_fraction: float = 0.125, refill: bool = True) -> list[Completion]:
    """Sample n completions for every prompt; returns len(prompts) * n Completions, prompt-major.

    prompts: token id lists of any (non-zero) lengths. stop_token_ids: finishing on any of them.
    seed: results are deterministic for a fixed seed, model, prompts and batch settings.
    max_batch_rows: at most this many rows (prompts * n) decode together.
    refill: when there are more rows than that, admit a waiting prompt's group into the rows that
        finished ones leave (continuous batching), in prompt order; False: run the prompts in
        chunks that each decode until their last row finishes.
    compact_fraction: once no prompt waits, compact the cache when this fraction of its rows finished.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    device = model.device
    bias = None
    if logit_bias:
        bias = torch.zeros(model.config.vocab_size, device=device)
        bias[torch.tensor(list(logit_bias), device=device)] = torch.tensor(list(logit_bias.values()), device=device)
    sampler = Sampler(temperature, top_k, top_p, bias, torch.Generator(device=device).manual_seed(seed),
                      torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device), max_new_tokens)
    rows = max(n, max_batch_rows // n * n)  # whole groups, at least one
    step = max(1, len(prompts)) if refill else rows // n
    out: list[Completion] = []
    for start in range(0, len(prompts), step):
        out += Rollout(model, prompts[start:start + step], n, rows, sampler, compact_fraction).run(start)
    return out


@dataclass
class Sampler:
    """The sampling settings of one generate() call and its random stream."""
    temperature: float
    top_k: int
    top_p: float
    bias: torch.Tensor | None  # (V,) added to the logits, or None
    gen: torch.Generator
    stops: torch.Tensor  # (s,) stop token ids
    max_new: int

    def __call__(self, logits):
        return next_tokens(logits, self.temperature, self.top_k, self.top_p, self.bias, self.gen)


class Rollout:
    """One batch of cache rows decoding the samples of a list of prompts, refilled as rows finish.

    Slot i (cache row i, i < B) produces completion rows[i] = prompt * n + sample. Finished slots
    are holes: they keep decoding (cheaper than masking every write) without growing their cache
    length, until a waiting prompt's group is admitted into them (prefilled once, its cache copied
    into the n slots) or, once no prompt waits, compaction drops them.
    """

    def __init__(self, model, prompts, n, max_rows, sampler: Sampler, compact_fraction):
        self.model, self.prompts, self.n, self.sampler = model, prompts, n, sampler
        self.compact_fraction = compact_fraction
        dev, R, W = model.device, len(prompts) * n, sampler.max_new + 1  # a trash column for holes
        self.tokens = torch.zeros(R, W, dtype=torch.long, device=dev)  # (R, max_new + 1)
        self.logp = torch.zeros(R, W, dtype=torch.float32, device=dev)
        self.gen_len = torch.zeros(R, dtype=torch.long, device=dev)  # (R,)
        self.stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        T = max(len(p) for p in prompts)
        self.cache = KVCache(model.config, min(max_rows, R), T + sampler.max_new, dtype=model.dtype, device=dev)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        # Per slot: its completion row, the token it feeds next, tokens made so far, finished?
        self.rows, self.tok, self.made = empty, empty, empty  # (B,) each
        self.done = torch.zeros(0, dtype=torch.bool, device=dev)
        self.waiting = list(range(len(prompts)))[::-1]  # a stack: pop() takes the next prompt

    def run(self, offset: int) -> list[Completion]:
        self.admit()
        while not (self.done.all() and not self.waiting):
            if not self.waiting:
                self.compact()
            live = (~self.done).long()  # (B,): a hole's length stays put
            logits = self.model(self.tok[:, None], cache=self.cache, input_lengths=live)[:, -1]  # (B, V)
            self.tok, self.done, self.made = self.record(logits, self.rows, self.made, self.done)
            if self.waiting:
                self.admit()
        return self.completions(offset)

    def record(self, logits, rows, made, done):
        """Sample each slot's next token, store it, mark the slots that finished -> tok, done, made."""
        s = self.sampler
        tok, tok_logp = s(logits)  # (B,), (B,)
        col = made.clamp(max=s.max_new)  # holes write into the trash column
        self.tokens[rows, col], self.logp[rows, col] = tok, tok_logp
        made = made + 1
        stop = (tok[:, None] == s.stops).any(-1) & ~done if s.stops.numel() else torch.zeros_like(done)
        fin = (stop | (made >= s.max_new)) & ~done  # (B,)
        self.gen_len[rows[fin]] = made[fin]
        self.stopped[rows[stop]] = True
        return tok, done | fin, made

    def admit(self):
        """Prefill as many waiting prompts as there are free groups of n slots, in order, each
        once, and copy its cache into the n slots of its group: holes first, then new slots.
        Admits only once a quarter of the batch is free, or when every waiting prompt fits."""
        n, B, cache = self.n, self.done.numel(), self.cache
        holes = self.done.nonzero().squeeze(-1)  # (h,)
        room = holes.numel() + cache.batch_size - B  # free slots
        k = min(len(self.waiting), room // n)
        # Wait until a quarter of the batch is free (or every waiting prompt fits): one prefill
        # forward then admits several prompts instead of one each time n rows finish.
        if k == 0 or (k < len(self.waiting) and room < cache.batch_size // 4):
            return
        idx = [self.waiting.pop() for _ in range(k)]
        dev = self.tokens.device
        lens = torch.tensor([len(self.prompts[i]) for i in idx], device=dev)  # (k,)
        ids = torch.zeros(k, int(lens.max()), dtype=torch.long, device=dev)  # right-padded (k, T)
        for j, i in enumerate(idx):
            ids[j, : len(self.prompts[i])] = torch.tensor(self.prompts[i], dtype=torch.long)
        side = KVCache(self.model.config, k, ids.shape[1], dtype=cache.k[0].dtype, device=dev)
        logits = self.model(ids, cache=side, input_lengths=lens, logits_at=lens - 1)  # (k, V)
        extra = max(0, k * n - holes.numel())
        slots = torch.cat((holes[: k * n], torch.arange(B, B + extra, device=dev)))  # (k * n,)
        cache.copy_rows(side, torch.arange(k, device=dev).repeat_interleave(n), slots)
        rows = (torch.tensor(idx, device=dev).repeat_interleave(n) * n + torch.arange(n, device=dev).repeat(k))
        tok, done, made = self.record(logits.repeat_interleave(n, 0), rows, torch.zeros_like(rows),
                                      torch.zeros_like(rows, dtype=torch.bool))
        grow = torch.zeros(extra, dtype=torch.long, device=dev)
        self.rows, self.tok, self.made = (torch.cat((a, grow)) for a in (self.rows, self.tok, self.made))
        self.done = torch.cat((self.done, grow.bool()))
        self.rows[slots], self.tok[slots], self.made[slots], self.done[slots] = rows, tok, made, done
        cache.tighten(self.done.numel())

    def compact(self):
        """Drop finished slots once enough have finished, moving live slots past the new size
        into holes before it: copies at most that many cache rows instead of gathering all."""
        B, n_done = self.done.numel(), int(self.done.sum())
        # Large batches shrink in multiples of 8 (a few finished rows ride along): each new batch
        # size costs a oneDNN kernel JIT per matmul shape in bf16 on CPU (~1 ms each), which is a
        # step's worth of a small model. Below 64 rows a spare row costs more than that.
        gran = 8 if B >= 64 else 1
        keep = min(B, -(-(B - n_done) // gran) * gran)
        if not n_done or n_done < self.compact_fraction * B or keep >= B:
            return
        donors = (~self.done[keep:]).nonzero().squeeze(-1) + keep  # (d,) live slots to move
        holes = self.done[:keep].nonzero().squeeze(-1)[: donors.numel()]  # (d,) finished slots
        self.cache.move_rows(donors, holes)
        for name in ("rows", "tok", "made", "done"):
            a = getattr(self, name)
            a[holes] = a[donors]
            setattr(self, name, a[:keep])
        self.cache.tighten(keep)

    def completions(self, offset: int) -> list[Completion]:
        n = self.n
        lengths, reasons = self.gen_len.tolist(), self.stopped.tolist()
        toks, logps = self.tokens.tolist(), self.logp.tolist()
        return [Completion(prompt_index=offset + r // n, sample_index=r % n, token_ids=toks[r][: lengths[r]],
                           logprobs=logps[r][: lengths[r]], finish_reason="stop" if reasons[r] else "length")
                for r in range(len(lengths))]
