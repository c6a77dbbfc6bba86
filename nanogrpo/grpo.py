"""GRPO maths: group-normalised advantages, chunked token log-probs, the clipped policy loss.

Formulas (per completion token t of sequence i, mask m_it, group g(i) of G samples of one prompt):

  advantage   A_i = (r_i - mean_g r) / (std_g r + eps)          DeepSeekMath GRPO (Shao et al. 2024)
              A_i =  r_i - mean_g r                             Dr. GRPO, `scale_std=False` (Liu et al. 2025)
              std_g is the *sample* (unbiased, /(G-1)) std, as DeepSeekMath and TRL use.
  overlong    r_i += -p * max(0, |y_i| - (L_max - L_buf)) / L_buf    DAPO soft overlong punishment
              (optional, applied by the caller before the advantage; see `overlong_penalty`)
  ratio       rho_it = exp(clamp(logp_it - base_it, -20, 20))   base = old (behaviour) log-probs, or
                                                                prox log-probs in decoupled mode
  policy term pg_it = -min(rho A_i, clip(rho, 1-clip_low, 1+clip_high) A_i)
                                                                clip-higher: DAPO (Yu et al. 2025)
  dual clip   pg_it = min(pg_it, c |A_i|)  where A_i < 0       Ye et al. 2020 ("Mastering complex
              control in MOBA games"), c = clip_ratio_c as in veRL; bounds the loss of a token whose
              ratio blew up under a negative advantage
  decoupled   pg_it *= w_it = min(exp(clamp(prox_it - old_it)), tis_cap)   decoupled PPO (Hilton et
              al. 2022, "Batch size-invariance for policy optimization"); w truncated as in TIS / IMPALA
  KL          d = clamp(ref - logp);  k1 = -d,  k2 = d^2/2,  k3 = exp(d) - d - 1   (Schulman,
              "Approximating KL divergence", 2020); per-token KL penalty as in DeepSeekMath (k3)
  per token   L_it = pg_it + kl_coef * kl_it - entropy_coef * H_it
  aggregate   token-mean              sum(L m) / sum(m)                       DAPO token-level loss
              seq-mean-token-mean     mean_i [ sum_t(L m) / sum_t(m) ]        original GRPO
              seq-mean-token-sum-norm sum(L m) / (num_seqs * norm_len)        Dr. GRPO (constant norm)

Every clamp is at +-20 (LOG_RATIO_CLAMP) and past it the gradient through that exp is 0: for the
ratio that only touches tokens the clip range (or the dual clip) has long cut off, or whose term is
e^-20 small; for the KL it caps the penalty of a token 20 nats from the reference instead of letting
it reach e^100. The options live in one frozen `LossConfig`.
What is "old" is the caller's choice: the sampler's log-probs, or (the learner's default) the
learner's own pre-update log-probs, so top-p/top-k truncation of the sampled distribution does not
show up as a ratio < 1 on fresh tokens. The TIS weight multiplies only the policy term (the
KL/entropy terms are regularisers, not estimates that need correcting).
Padding positions may hold garbage (0, -inf, stale values): every difference is masked to 0 *before*
exp so neither the loss nor its gradient can turn into NaN there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Log-ratios are clamped to +-20 before exp (as veRL does): one bad token cannot give a ratio of 1e10
# and an inf/NaN gradient; e^20 is far past any clip range, so nothing else changes.
LOG_RATIO_CLAMP = 20.0
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


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025) per completion, (N,) <= 0.

    0 up to max_len - buffer tokens, then falling linearly to -penalty at the budget max_len; a
    completion cannot be longer than the budget here, so DAPO's -1 beyond it never applies.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    if buffer > max_len:
        raise ValueError(f"--overlong-buffer {buffer} is longer than the completion budget "
                         f"--max-new-tokens {max_len}")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)  # (N,) tokens into the buffer
    return -penalty * over / buffer


def shaped_advantages(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor, group_size: int,
                      max_len: int, cfg) -> dict[str, torch.Tensor]:
    """The advantages a step trains on, from rewards (N,), completion lengths (N,) and truncation
    flags (N,) of whole groups: the overlong penalty, group-normalised advantages of the shaped
    reward, and --mask-truncated's zeroing. cfg: a RunConfig (or anything with its field names).
    The learner and --dynamic-sampling's buffer filter both call this, so the filter drops exactly
    the groups the learner would find without signal. -> penalty, adv, zero_var (per group) and
    pg_masked (per row); `no_signal(adv, G)` says which groups' advantages are all 0."""
    penalty = overlong_penalty(lengths, max_len, cfg.overlong_buffer, cfg.overlong_penalty)  # (N,) <= 0
    adv, zero_var = group_advantages(rewards + penalty, group_size, scale_std=cfg.scale_std)
    # --mask-truncated: a truncated row keeps its place in its group's baseline but gets no
    # policy gradient of its own (advantage 0); its KL/entropy terms and tokens still count.
    pg_masked = truncated & cfg.mask_truncated
    return {"penalty": penalty, "adv": torch.where(pg_masked, 0.0, adv), "zero_var": zero_var,
            "pg_masked": pg_masked}


def no_signal(adv: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) advantages -> (groups,) True where every advantage of the group is 0 (no policy gradient)."""
    return (adv.view(-1, group_size) == 0).all(-1)


@dataclass(frozen=True)
class LossConfig:
    """The loss options of one run (the flags of the same names; see the module docstring)."""
    clip_low: float = 0.2        # ratio >= 1 - clip_low
    clip_high: float = 0.2       # ratio <= 1 + clip_high (DAPO clip-higher when > clip_low)
    clip_ratio_c: float = 3.0    # dual clip: a negative-advantage token's loss is at most c |A| (inf = off)
    kl_coef: float = 0.0         # KL penalty weight (needs ref_logprobs when > 0)
    kl_estimator: str = "k3"     # k1 | k2 | k3
    entropy_coef: float = 0.0    # entropy bonus weight (needs the entropy tensor when != 0)
    loss_agg: str = "token-mean"  # one of LOSS_AGGS
    norm_len: int | None = None  # seq-mean-token-sum-norm's constant length
    tis_cap: float | None = None  # truncation of the decoupled importance weight (None = none)

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"--loss-agg: {self.loss_agg!r} is not one of {LOSS_AGGS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"--kl-estimator: {self.kl_estimator!r} is not one of {KL_ESTIMATORS}")
        if self.loss_agg == "seq-mean-token-sum-norm" and not self.norm_len:
            raise ValueError("--loss-agg seq-mean-token-sum-norm needs a length to normalise by "
                             "(--max-new-tokens)")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"--clip-ratio-c must be > 1 (inf = off), got {self.clip_ratio_c}")

    @classmethod
    def from_run_config(cls, cfg, norm_len: int | None = None) -> "LossConfig":
        """From a RunConfig (or anything with its field names); tis_cap 0 there means "no
        decoupled mode", so no truncation is needed here."""
        return cls(clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c,
                   kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
                   loss_agg=cfg.loss_agg, norm_len=norm_len, tis_cap=cfg.tis_cap if cfg.tis_cap > 0 else None)


def _aggregate(x: torch.Tensor, m: torch.Tensor, cfg: LossConfig, token_den, seq_den) -> torch.Tensor:
    """x (B, T) per-token loss, already finite everywhere; m (B, T) bool -> the 0-dim loss."""
    xm = torch.where(m, x, 0)
    num_seqs = x.shape[0] if seq_den is None else seq_den
    if cfg.loss_agg == "token-mean":
        den = m.sum().clamp(min=1) if token_den is None else token_den
        return xm.sum() / den
    if cfg.loss_agg == "seq-mean-token-mean":
        per_seq = xm.sum(-1) / m.sum(-1).clamp(min=1)  # (B,) a sequence's mean needs only its row
        return per_seq.sum() / num_seqs
    return xm.sum() / (num_seqs * cfg.norm_len)  # seq-mean-token-sum-norm


def _exp_log_ratio(diff: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp of a masked, clamped log-ratio (B, T): 1 on padding, at most e^20 anywhere."""
    return torch.exp(torch.where(m, diff, 0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _policy_term(lp, old, base, adv, m, cfg: LossConfig, metrics: dict) -> torch.Tensor:
    """The per-token clipped, dual-clipped, importance-weighted policy term pg (B, T)."""
    ratio = _exp_log_ratio(lp - base, m)  # (B, T) exactly 1 on padding
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)  # -min(rA, clip(r)A); ties split the (equal) gradient
    pg3 = -adv * cfg.clip_ratio_c  # (B, 1) c |A| where A < 0
    dual = (adv < 0) & (pg > pg3)  # (B, T) the dual clip bites
    pg = torch.where(dual, pg3, pg)
    w = _exp_log_ratio(base - old, m)  # (B, T) pi_prox / pi_behaviour, no grad; 1 when base is old
    if cfg.tis_cap is not None:
        w = w.clamp(max=cfg.tis_cap)
    metrics.update(ratio=ratio, clip=pg2 > pg1, dual=dual, w=w)
    return pg * w


def _kl_term(lp, ref, m, cfg: LossConfig) -> torch.Tensor:
    d = torch.where(m, ref - lp, 0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    if cfg.kl_estimator == "k1":
        return -d
    if cfg.kl_estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def _check_shapes(logprobs, advantages, **others):
    for name, t in others.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({logprobs.shape[0]},)")


def grpo_loss(
    logprobs: torch.Tensor,  # (B, T) learner log-probs, requires grad
    old_logprobs: torch.Tensor,  # (B, T) behaviour log-probs (the sampler's, or the learner's pi_old)
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens that count, 0 on padding
    cfg: LossConfig = LossConfig(),
    *,
    ref_logprobs: torch.Tensor | None = None,  # (B, T) reference policy, for the KL penalty
    prox_logprobs: torch.Tensor | None = None,  # (B, T) pre-step learner log-probs -> decoupled mode
    entropy: torch.Tensor | None = None,  # (B, T) policy entropy, may require grad
    token_denominator=None,
    seq_denominator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss (0-dim) and a dict of detached 0-dim float32 metrics (see module docstring).

    Decoupled mode (prox_logprobs given): the ratio is taken against prox and each token's policy
    term is weighted by min(exp(prox - old), cfg.tis_cap); a row whose prox equals its old is an
    ordinary row (weight exactly 1), so one call can mix fresh and stale rows.
    Micro-batching: pass the *whole step's* mask sum as token_denominator (token-mean) and its
    number of sequences as seq_denominator (seq-mean-*); the micro-batch losses then sum to the
    full-batch loss. Metrics are local to this call; `reduce_loss_metrics` combines micro-batches.
    """
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"--kl-coef {cfg.kl_coef} > 0 needs ref_logprobs (the reference policy's log-probs)")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError(f"--entropy-coef {cfg.entropy_coef} != 0 needs the per-token entropy tensor")
    _check_shapes(logprobs, advantages, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs,
                  prox_logprobs=prox_logprobs, entropy=entropy)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m, lp = mask.bool(), logprobs.to(dtype)  # (B, T)
    old = old_logprobs.detach().to(dtype)
    base = old if prox_logprobs is None else prox_logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)[:, None]  # (B, 1)
    parts = {}
    pg = _policy_term(lp, old, base, adv, m, cfg, parts)
    per_token, kl = pg, None
    if ref_logprobs is not None:
        kl = _kl_term(lp, ref_logprobs.detach().to(dtype), m, cfg)
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl
    ent = None if entropy is None else torch.where(m, entropy.to(dtype), 0)
    if ent is not None and cfg.entropy_coef != 0:
        per_token = per_token - cfg.entropy_coef * ent
    loss = _aggregate(per_token, m, cfg, token_denominator, seq_denominator)
    with torch.no_grad():
        metrics = _loss_metrics(loss, _aggregate(pg, m, cfg, token_denominator, seq_denominator),
                                kl, ent, adv, m, parts, decoupled=prox_logprobs is not None)
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def _loss_metrics(loss, pg_loss, kl, ent, adv, m, parts, decoupled: bool) -> dict:
    ratio, f = parts["ratio"], parts["ratio"].dtype
    metrics = {"loss": loss.detach(), "pg_loss": pg_loss,
               "kl": _masked_mean(kl, m) if kl is not None else loss.new_zeros(()),
               "clip_frac": _masked_mean(parts["clip"].to(f), m),
               "dual_clip_frac": _masked_mean(parts["dual"].to(f), m),
               "ratio_mean": _masked_mean(ratio, m),
               "ratio_max": torch.where(m, ratio, -torch.inf).amax(),  # -inf if nothing is masked in
               "ratio_min": torch.where(m, ratio, torch.inf).amin(),
               "adv_mean": adv.mean(), "adv_std": adv.std(correction=0)}  # population std: 1 row is fine
    if ent is not None:
        metrics["entropy"] = _masked_mean(ent, m)
    if decoupled:
        metrics["tis_weight_mean"] = _masked_mean(parts["w"], m)
    return metrics


# How each loss metric of a micro-batch combines into the step's: loss and pg_loss are partial sums
# over the whole step's denominators (so they add up), the extremes are extremes, the rest are means
# over the call's tokens (so they are weighted by its token count).
_SUMMED = ("loss", "pg_loss")
_REDUCERS = {"ratio_max": max, "ratio_min": min}


def reduce_loss_metrics(parts: list[tuple[dict, int]]) -> dict[str, float]:
    """[(grpo_loss metrics of a micro-batch, its number of masked-in tokens)] -> the step's metrics,
    the same however the step was split. Per-row statistics (adv_mean, adv_std) are left out: the
    caller has the whole step's advantages."""
    n = sum(k for _, k in parts)
    out = {}
    for key in {k for m, _ in parts for k in m} - {"adv_mean", "adv_std"}:
        vals = [(float(m[key]), k) for m, k in parts if key in m]
        if key in _SUMMED:
            out[key] = sum(v for v, _ in vals)
        elif key in _REDUCERS:
            out[key] = _REDUCERS[key](v for v, _ in vals)
        else:
            out[key] = sum(v * k for v, k in vals) / max(n, 1)
    return out
