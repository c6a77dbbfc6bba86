"""GRPO maths: group-normalised advantages, chunked token log-probs, the clipped policy loss.

Formulas (per completion token t of sequence i, mask m_it, group g(i) of G samples of one prompt):

  advantage   A_i = (r_i - mean_g r) / (std_g r + eps)          DeepSeekMath GRPO (Shao et al. 2024)
              A_i =  r_i - mean_g r                             Dr. GRPO, `scale_std=False` (Liu et al. 2025)
              std_g is the *sample* (unbiased, /(G-1)) std, as DeepSeekMath and TRL use.
  ratio       rho_it = exp(logp_it - base_it)                   base = old (behaviour) log-probs, or
                                                                prox log-probs in decoupled mode
  policy term pg_it = -min(rho A_i, clip(rho, 1-clip_low, 1+clip_high) A_i)
                                                                clip-higher: DAPO (Yu et al. 2025)
  decoupled   pg_it *= w_it = min(exp(prox_it - old_it), tis_cap)   decoupled PPO (Hilton et al. 2022,
              "Batch size-invariance for policy optimization"); w truncated as in TIS / IMPALA
  KL          d = ref - logp;  k1 = -d,  k2 = d^2/2,  k3 = exp(d) - d - 1   (Schulman, "Approximating
              KL divergence", 2020); per-token KL penalty as in DeepSeekMath (k3)
  per token   L_it = pg_it + kl_coef * kl_it - entropy_coef * H_it
  aggregate   token-mean              sum(L m) / sum(m)                       DAPO token-level loss
              seq-mean-token-mean     mean_i [ sum_t(L m) / sum_t(m) ]        original GRPO
              seq-mean-token-sum-norm sum(L m) / (num_seqs * norm_len)        Dr. GRPO (constant norm)

Simplifications: one policy step per batch is the common case, so `old_logprobs` are the sampler's
own log-probs (no learner recomputation) unless the caller supplies `prox_logprobs`; the TIS weight
multiplies only the policy term (the KL/entropy terms are regularisers, not estimates that need
correcting); k3 is not clamped (verl clamps to [-10, 10]; with a sane kl_coef it never matters).
Padding positions may hold garbage (0, -inf, stale values): every difference is masked to 0 *before*
exp so neither the loss nor its gradient can turn into NaN there.
"""
from __future__ import annotations

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# One chunk's float32 working copy of the logits: ~256 MiB on a GPU (441 rows at Qwen2's 151,936
# vocab; few kernel launches), ~8 MiB on a CPU, where each chunk's handful of passes then runs from
# cache instead of DRAM (measured on 2 cores, 32k vocab: fwd+bwd ~1.6x faster than 256 MiB chunks).
_CHUNK_BYTES = 256 * 2**20
_CPU_CHUNK_BYTES = 8 * 2**20


def group_advantages(
    rewards: torch.Tensor,  # (N,) N = num_groups * group_size, each group's samples contiguous
    group_size: int,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages (N,) and a (num_groups,) bool flag for zero-variance groups.

    A group whose rewards are all equal carries no learning signal; its advantages are exactly 0
    (not a float-rounding residue of r - mean) and it is flagged so the caller can drop or resample it.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape "
            f"{tuple(rewards.shape)}"
        )
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # (G_n, G)
    zero_var = r.amax(dim=1) == r.amin(dim=1)  # (G_n,)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        # The unbiased std is undefined for group_size 1; such groups are zero-variance (zeroed below).
        std = r.std(dim=1, keepdim=True, correction=1) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    adv = torch.where(zero_var[:, None], torch.zeros_like(adv), adv)
    return adv.view(-1), zero_var


def _chunks(B: int, T: int, rows: int):
    """Yield (batch slice, time slice) covering (B, T) with at most `rows` positions each.

    Slicing both dims (rather than flattening to (B*T, V)) keeps every chunk a view even when the
    logits are a non-contiguous slice such as full_logits[:, P-1:-1], so no copy is ever made.
    """
    if rows >= T:
        nb = rows // T
        for b0 in range(0, B, nb):
            yield slice(b0, min(b0 + nb, B)), slice(0, T)
    else:
        for b in range(B):
            for t0 in range(0, T, rows):
                yield slice(b, b + 1), slice(t0, min(t0 + rows, T))


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(x)[target] and entropy, x = logits / temperature, computed chunk by chunk.

    A hand-written backward instead of autograd over the chunks: autograd would keep every chunk's
    float32 copy alive for backward (a full B*T*V float32 tensor again). Here only the logits
    (which exist anyway), the per-row logsumexp and entropy are saved; the softmax is recomputed per
    chunk in backward and written straight into a gradient of the logits' own dtype.
    d logp_t / dx_j = 1[j=t] - p_j;  d H / dx_j = -p_j (log p_j + H).
    Every full-width (b, t, V) pass is memory-bound, so both directions keep the count low: forward
    uses the fused log_softmax kernel (one read-reduce-write) instead of logsumexp + subtract + exp;
    backward forms log p with one broadcasting add straight into the gradient's storage and never
    multiplies by a temperature of 1 (measured: ~30% less CPU time than the op-by-op version).
    """

    @staticmethod
    def forward(ctx, logits, targets, inv_temp: float, rows: int, with_entropy: bool):
        B, T, _ = logits.shape
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        logp = logits.new_empty((B, T), dtype=cdtype)
        lse = logits.new_empty((B, T), dtype=cdtype)
        ent = logits.new_empty((B, T) if with_entropy else (0,), dtype=cdtype)
        for sb, st in _chunks(B, T, rows):
            x = logits[sb, st]  # (b, t, V) a view
            if inv_temp != 1.0:
                x = x.to(cdtype) * inv_temp
            ls = torch.log_softmax(x, dim=-1, dtype=cdtype)  # (b, t, V) fused: one temporary, no exp copy
            logp[sb, st] = ls.gather(-1, targets[sb, st, None]).squeeze(-1)
            # logsumexp = max x - max log p (both at the argmax): exact, no second exp pass.
            lse[sb, st] = x.amax(-1).to(cdtype) - ls.amax(-1)
            if with_entropy:
                ent[sb, st] = -ls.exp().mul_(ls).sum(-1)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.inv_temp, ctx.rows, ctx.with_entropy = inv_temp, rows, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        if not ctx.with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        B, T, _ = logits.shape
        cdtype, inv = lse.dtype, ctx.inv_temp
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (B, T, V) logits' dtype
        direct = grad.dtype == cdtype  # build each chunk's gradient in place in `grad`
        for sb, st in _chunks(B, T, ctx.rows):
            # log p = x * inv - lse, in one pass from the logits (any dtype) to cdtype.
            out = grad[sb, st] if direct else None
            g = torch.add(lse[sb, st, None].neg(), logits[sb, st], alpha=inv, out=out)  # (b, t, V) log p
            # grad = -inv p (g_logp + g_ent (log p + H)) + inv g_logp 1[j = target]
            if g_ent is None:
                g.exp_().mul_(g_logp[sb, st, None].to(cdtype) * -inv)
            else:
                ge = g_ent[sb, st, None].to(cdtype)
                c = ge * ent[sb, st, None]  # (b, t, 1)
                if g_logp is not None:
                    c = c + g_logp[sb, st, None].to(cdtype)
                p = g.exp()
                g.mul_(ge * -inv).add_(c * -inv).mul_(p)
            if g_logp is not None:
                g.scatter_add_(-1, targets[sb, st, None], g_logp[sb, st, None].to(cdtype) * inv)
            if not direct:
                grad[sb, st] = g
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,  # (B, T, V) any float dtype; bf16 on GPU
    targets: torch.Tensor,  # (B, T) int64 token ids in [0, V)
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
):
    """Log-prob of `targets` under softmax(logits / temperature) -> (B, T) [, entropy (B, T)].

    Computed in float32 (float64 for float64 logits) `chunk_size` (b, t) positions at a time, so no
    extra full B*T*V float32 tensor exists in forward or backward. Differentiable w.r.t. logits for
    both outputs. `chunk_size=None` picks ~256 MiB of float32 per chunk on a GPU, ~8 MiB on a CPU.
    The temperature must be the sampler's so learner log-probs are comparable with the behaviour
    log-probs.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk_bytes = _CPU_CHUNK_BYTES if logits.device.type == "cpu" else _CHUNK_BYTES
    rows = chunk_size or max(1, chunk_bytes // (4 * logits.shape[-1]))
    logp, ent = _TokenLogprobs.apply(logits, targets.long(), 1.0 / temperature, rows, with_entropy)
    return (logp, ent) if with_entropy else logp


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T) over m (B, T) bool; 0 when nothing is masked in."""
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)


def _aggregate(
    x: torch.Tensor,  # (B, T) per-token loss, already finite everywhere
    m: torch.Tensor,  # (B, T) bool
    loss_agg: str,
    norm_len,
    token_denominator,
    seq_denominator,
) -> torch.Tensor:
    xm = torch.where(m, x, 0)
    num_seqs = x.shape[0] if seq_denominator is None else seq_denominator
    if loss_agg == "token-mean":
        den = m.sum().clamp(min=1) if token_denominator is None else token_denominator
        return xm.sum() / den
    if loss_agg == "seq-mean-token-mean":
        per_seq = xm.sum(-1) / m.sum(-1).clamp(min=1)  # (B,) a sequence's mean needs only its row
        return per_seq.sum() / num_seqs
    return xm.sum() / (num_seqs * norm_len)  # seq-mean-token-sum-norm


def grpo_loss(
    logprobs: torch.Tensor,  # (B, T) learner log-probs, requires grad
    old_logprobs: torch.Tensor,  # (B, T) behaviour (sampler) log-probs
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens that count, 0 on padding
    *,
    ref_logprobs: torch.Tensor | None = None,  # (B, T) reference policy, for the KL penalty
    prox_logprobs: torch.Tensor | None = None,  # (B, T) pre-step learner log-probs -> decoupled mode
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    tis_cap: float | None = None,
    entropy: torch.Tensor | None = None,  # (B, T) policy entropy, may require grad
    entropy_coef: float = 0.0,
    norm_len: int | None = None,
    token_denominator=None,
    seq_denominator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss (0-dim) and a dict of detached 0-dim float32 metrics (see module docstring).

    Decoupled mode (prox_logprobs given): the ratio is taken against prox and each token's policy
    term is weighted by min(exp(prox - old), tis_cap); tis_cap=None means no truncation; without
    prox_logprobs tis_cap is ignored, so a config can set it once.
    Micro-batching: pass the *whole batch's* mask sum as token_denominator (token-mean) and its
    number of sequences as seq_denominator (seq-mean-*); the micro-batch losses then sum to the
    full-batch loss. Metrics are always local to this call (token means over this call's mask).
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r} is not one of {LOSS_AGGS}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not one of {KL_ESTIMATORS}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs (the reference policy's log-probs)")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} != 0 needs the per-token entropy tensor")
    if loss_agg == "seq-mean-token-sum-norm" and not norm_len:
        raise ValueError("loss_agg='seq-mean-token-sum-norm' needs norm_len (e.g. max_new_tokens)")
    B = logprobs.shape[0]
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                    ("prox_logprobs", prox_logprobs), ("entropy", entropy)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}")
    if advantages.shape != (B,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({B},)")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.bool()  # (B, T)
    lp = logprobs.to(dtype)
    old = old_logprobs.detach().to(dtype)
    base = old if prox_logprobs is None else prox_logprobs.detach().to(dtype)
    ratio = torch.exp(torch.where(m, lp - base, 0))  # (B, T) exactly 1 on padding
    adv = advantages.detach().to(dtype)[:, None]  # (B, 1)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)  # -min(rA, clip(r)A); ties split the (equal) gradient
    metrics = {}
    if prox_logprobs is not None:
        w = torch.exp(torch.where(m, base - old, 0))  # (B, T) pi_prox / pi_behaviour, no grad
        if tis_cap is not None:
            w = w.clamp(max=tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = _masked_mean(w, m)

    per_token = pg
    kl = None
    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.detach().to(dtype) - lp, 0)  # (B, T)
        if kl_estimator == "k1":
            kl = -d
        elif kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.exp(d) - d - 1
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        ent = torch.where(m, entropy.to(dtype), 0)
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * ent

    agg = (loss_agg, norm_len, token_denominator, seq_denominator)
    loss = _aggregate(per_token, m, *agg)
    with torch.no_grad():
        metrics["loss"] = loss.detach()
        metrics["pg_loss"] = _aggregate(pg, m, *agg)
        metrics["kl"] = _masked_mean(kl, m) if kl is not None else loss.new_zeros(())
        if entropy is not None:
            metrics["entropy"] = _masked_mean(ent, m)
        metrics["clip_frac"] = _masked_mean((pg2 > pg1).to(dtype), m)
        metrics["ratio_mean"] = _masked_mean(ratio, m)
        metrics["ratio_max"] = torch.where(m, ratio, -torch.inf).amax()  # -inf if nothing is masked in
        metrics["ratio_min"] = torch.where(m, ratio, torch.inf).amin()
        metrics["adv_mean"] = adv.mean()
        metrics["adv_std"] = adv.std(correction=0)  # population std: defined for a 1-row micro-batch
    return loss, {k: v.detach().float() for k, v in metrics.items()}
