"""GRPO maths against per-element loop references, micro-batch invariance and gradchecks."""
import math

import pytest
import torch

from nanogrpo.grpo import KL_ESTIMATORS, LOSS_AGGS, LossConfig, group_advantages, grpo_loss, token_logprobs

LENGTHS = [7, 3, 5, 1, 6]  # varied completion lengths -> padded (5, 7) batch


def _batch(seed=0, dtype=torch.float64):
    """Random (B, T) tensors with realistic spreads; padding holds garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)  # ratios around 1, some clipped
    prox = old + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    ent = torch.rand(B, T, generator=g, dtype=dtype) * 2
    adv = torch.randn(B, generator=g, dtype=dtype)
    lp = torch.where(mask, lp, -30.0)  # garbage at padding
    old = torch.where(mask, old, 0.0)
    return dict(lp=lp, old=old, prox=prox, ref=ref, ent=ent, adv=adv, mask=mask)


def _loop_reference(d, *, agg, kl_est, kl_coef, clip_low, clip_high, decoupled, tis_cap, ent_coef, norm_len,
                    clip_c=math.inf):
    """Straight transcription of the formulas, one Python float at a time."""
    lp, old, prox, ref, ent = (d[k].tolist() for k in ("lp", "old", "prox", "ref", "ent"))
    adv, mask = d["adv"].tolist(), d["mask"].tolist()
    B, T = len(lp), len(lp[0])
    L = [[0.0] * T for _ in range(B)]
    pg_tok = [[0.0] * T for _ in range(B)]
    stats = dict(n=0, clipped=0, ratio=[], kl=0.0, ent=0.0, w=0.0)
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            base = prox[b][t] if decoupled else old[b][t]
            r = math.exp(lp[b][t] - base)
            A = adv[b]
            rc = min(max(r, 1 - clip_low), 1 + clip_high)
            pg = -min(r * A, rc * A)
            if A < 0:
                pg = min(pg, -clip_c * A)
            if decoupled:
                w = math.exp(prox[b][t] - old[b][t])
                w = w if tis_cap is None else min(w, tis_cap)
                pg *= w
                stats["w"] += w
            dd = ref[b][t] - lp[b][t]
            kl = {"k1": -dd, "k2": 0.5 * dd * dd, "k3": math.exp(dd) - dd - 1}[kl_est]
            pg_tok[b][t] = pg
            L[b][t] = pg + kl_coef * kl - ent_coef * ent[b][t]
            stats["n"] += 1
            stats["clipped"] += -rc * A > -r * A
            stats["ratio"].append(r)
            stats["kl"] += kl
            stats["ent"] += ent[b][t]

    def aggregate(X):
        if agg == "token-mean":
            return sum(map(sum, X)) / stats["n"]
        if agg == "seq-mean-token-mean":
            return sum(sum(X[b]) / sum(mask[b]) for b in range(B)) / B
        return sum(map(sum, X)) / (B * norm_len)

    n = stats["n"]
    metrics = dict(loss=aggregate(L), pg_loss=aggregate(pg_tok), kl=stats["kl"] / n, entropy=stats["ent"] / n,
                   clip_frac=stats["clipped"] / n, ratio_mean=sum(stats["ratio"]) / n,
                   ratio_max=max(stats["ratio"]), ratio_min=min(stats["ratio"]))
    if decoupled:
        metrics["tis_weight_mean"] = stats["w"] / n
    return metrics


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_est", KL_ESTIMATORS)
@pytest.mark.parametrize("decoupled,tis_cap", [(False, None), (True, None), (True, 1.1)])
def test_loss_matches_loop_reference(agg, kl_est, decoupled, tis_cap):
    """Guards sign/branch errors in the clipped surrogate (clip-higher with clip_low != clip_high),
    the KL estimators, the TIS weight, the entropy bonus, each aggregation and padding leaking in."""
    d = _batch()
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, ent_coef=0.01, norm_len=9)
    want = _loop_reference(d, agg=agg, kl_est=kl_est, decoupled=decoupled, tis_cap=tis_cap, **kw)
    cfg = LossConfig(tis_cap=tis_cap, clip_low=0.2, clip_high=0.28, clip_ratio_c=math.inf, kl_coef=0.1,
                     kl_estimator=kl_est, loss_agg=agg, entropy_coef=0.01, norm_len=9)
    loss, m = grpo_loss(d["lp"], d["old"], d["adv"], d["mask"], cfg, ref_logprobs=d["ref"],
                        prox_logprobs=d["prox"] if decoupled else None, entropy=d["ent"])
    torch.testing.assert_close(loss.item(), want["loss"], rtol=1e-12, atol=1e-12)
    assert 0 < want["clip_frac"] < 1, "test data must exercise both branches"
    for k, v in want.items():
        torch.testing.assert_close(m[k].item(), v, rtol=1e-6, atol=1e-6, msg=f"metric {k}")
    assert all(t.dim() == 0 and not t.requires_grad and t.dtype == torch.float32 for t in m.values())
    adv = d["adv"].float()
    torch.testing.assert_close(m["adv_mean"], adv.mean())
    torch.testing.assert_close(m["adv_std"], adv.std(correction=0))


def test_kl_off_by_default_and_metric_zero_without_ref():
    """Guards a KL term leaking into the loss when kl_coef=0, and a missing `kl` metric without ref."""
    d = _batch()
    base, m0 = grpo_loss(d["lp"], d["old"], d["adv"], d["mask"])
    with_ref, m1 = grpo_loss(d["lp"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"])  # kl_coef 0
    torch.testing.assert_close(base, with_ref)
    assert m0["kl"].item() == 0.0 and m1["kl"].item() > 0.0
    assert "tis_weight_mean" not in m0 and "entropy" not in m0


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_microbatch_sum_equals_full_batch(agg):
    """Guards the learner's gradient accumulation: micro-batch losses with the whole batch's
    denominators must sum to the full-batch loss, with identical gradients."""
    d = _batch(seed=1)
    lp = d["lp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    cfg = LossConfig(kl_coef=0.05, entropy_coef=0.02, loss_agg=agg, norm_len=8, clip_high=0.3)
    full, _ = grpo_loss(lp, d["old"], d["adv"], d["mask"], cfg, entropy=ent, ref_logprobs=d["ref"])
    g_full = torch.autograd.grad(full, (lp, ent))
    total, tok_den, seq_den = 0.0, d["mask"].sum(), len(LENGTHS)
    for sl in (slice(0, 2), slice(2, 3), slice(3, 5)):
        part, _ = grpo_loss(lp[sl], d["old"][sl], d["adv"][sl], d["mask"][sl], cfg, entropy=ent[sl],
                            ref_logprobs=d["ref"][sl], token_denominator=tok_den, seq_denominator=seq_den)
        total = total + part
    g_micro = torch.autograd.grad(total, (lp, ent))
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_micro, g_full)


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_grpo_loss_gradcheck(agg):
    """Guards a wrong hand-derived path (torch.where masking, clamp, maximum) by finite differences."""
    d = _batch(seed=2)
    lp = d["lp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()

    def f(lp, ent):
        cfg = LossConfig(tis_cap=2.0, kl_coef=0.1, entropy_coef=0.03, loss_agg=agg, norm_len=7, clip_high=0.28,
                         clip_ratio_c=1.5)  # a low c so the dual clip's branch is crossed too
        return grpo_loss(lp, d["old"], d["adv"], d["mask"], cfg, ref_logprobs=d["ref"], prox_logprobs=d["prox"],
                         entropy=ent)[0]

    assert torch.autograd.gradcheck(f, (lp, ent))


def test_token_logprobs_gradcheck():
    """Guards the hand-written chunked backward of token_logprobs (both outputs, temperature)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    f = lambda x: token_logprobs(x, targets, 0.7, with_entropy=True, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, 1.3, chunk_size=2), (logits,))


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_ratio_one_gradient_is_policy_gradient(agg):
    """Guards the on-policy identity: at ratio 1 with no KL the loss gradient w.r.t. the logits is
    -sum A * grad log pi / denominator (catches a stray factor from clipping, ties or masking)."""
    g = torch.Generator().manual_seed(4)
    B, T, V = len(LENGTHS), max(LENGTHS), 11
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lp = token_logprobs(logits, targets, chunk_size=5)
    loss, m = grpo_loss(lp, lp.detach(), adv, mask, LossConfig(loss_agg=agg, norm_len=10))
    (grad,) = torch.autograd.grad(loss, logits)
    assert m["clip_frac"].item() == 0.0 and m["ratio_mean"].item() == 1.0
    ref_lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    if agg == "token-mean":
        weight = mask / mask.sum()
    elif agg == "seq-mean-token-mean":
        weight = mask / mask.sum(-1, keepdim=True) / B
    else:
        weight = mask / (B * 10)
    (want,) = torch.autograd.grad(-(adv[:, None] * ref_lp * weight).sum(), logits)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 8, 13, 21, 100, None])
def test_token_logprobs_matches_log_softmax(chunk_size):
    """Guards chunk-boundary bugs (sizes not dividing B*T, chunks inside one row) and the entropy
    formula, in values and in gradients of both outputs."""
    g = torch.Generator().manual_seed(5)
    B, T, V, tau = 3, 7, 19, 0.7
    logits = (3 * torch.randn(B, T, V, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    lp, ent = token_logprobs(logits, targets, tau, with_entropy=True, chunk_size=chunk_size)
    logp_all = torch.log_softmax(logits / tau, -1)
    want_lp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    u, w = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    got = torch.autograd.grad((lp * u + ent * w).sum(), logits)
    want = torch.autograd.grad((want_lp * u + want_ent * w).sum(), logits)
    torch.testing.assert_close(got, want)


def test_token_logprobs_bf16_noncontiguous_slice():
    """Guards silent low-precision maths and copies of sliced logits: bf16 logits are evaluated in
    fp32, the grad keeps the logits' dtype, and a [:, 1:-1] slice works without flattening."""
    g = torch.Generator().manual_seed(6)
    full = torch.randn(2, 9, 13, generator=g).bfloat16().requires_grad_()
    logits = full[:, 1:-1]  # (2, 7, 13) non-contiguous view
    targets = torch.randint(0, 13, (2, 7), generator=g)
    lp = token_logprobs(logits, targets, chunk_size=3)
    assert lp.dtype == torch.float32
    want = torch.log_softmax(logits.detach().float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, want)
    lp.sum().backward()
    assert full.grad.dtype == torch.bfloat16 and full.grad[:, 0].abs().sum() == 0


def test_padding_garbage_never_nans():
    """Guards NaN gradients from -inf/NaN log-probs at padded positions (where(mask) after exp)."""
    d = _batch(seed=7)
    pad = ~d["mask"]
    lp = torch.where(pad, torch.nan, d["lp"]).requires_grad_()
    old = torch.where(pad, -torch.inf, d["old"])
    prox = torch.where(pad, torch.inf, d["prox"])
    loss, m = grpo_loss(lp, old, d["adv"], d["mask"], LossConfig(kl_coef=0.1), ref_logprobs=old, prox_logprobs=prox)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[pad] == 0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_group_advantages_matches_loop():
    """Guards group boundaries (contiguous groups), the sample std, the Dr. GRPO variant and the
    zero-variance flag (exact zeros, not rounding residue)."""
    g = torch.Generator().manual_seed(8)
    G = 4
    rewards = torch.randint(0, 3, (5 * G,), generator=g).double() * 0.1
    rewards[4:8] = 0.1  # a zero-variance group whose mean is inexact in binary
    for scale_std in (True, False):
        adv, zero_var = group_advantages(rewards, G, scale_std=scale_std, eps=1e-6)
        r = rewards.tolist()
        for k in range(5):
            grp = r[k * G:(k + 1) * G]
            mu = sum(grp) / G
            sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (G - 1))
            assert bool(zero_var[k]) == (max(grp) == min(grp))
            for j, x in enumerate(grp):
                want = 0.0 if max(grp) == min(grp) else ((x - mu) / (sd + 1e-6) if scale_std else x - mu)
                assert abs(adv[k * G + j].item() - want) < 1e-9
    assert (adv[4:8] == 0).all() and zero_var.tolist() == [max(r[i:i + 4]) == min(r[i:i + 4]) for i in range(0, 20, 4)]
    adv1, zv1 = group_advantages(torch.tensor([1.0, 0.0]), 1)
    assert (adv1 == 0).all() and zv1.all()
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(4), 3)


def test_bad_options_raise_clear_errors():
    """Guards silently falling back to a default on a typo in the config."""
    d = _batch()
    args = (d["lp"], d["old"], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="--loss-agg: 'seq-mean'.*token-mean"):
        LossConfig(loss_agg="seq-mean")
    with pytest.raises(ValueError, match="--kl-estimator: 'k4'.*k1"):
        LossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="--max-new-tokens"):
        LossConfig(loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="--clip-ratio-c must be > 1"):
        LossConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(*args, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(d["lp"], d["old"], d["adv"][:2], d["mask"])
