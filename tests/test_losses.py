"""The safety terms of the GRPO loss, each against a per-element reference written here: the dual
clip, the log-ratio clamp, DAPO's overlong penalty, and the micro-batch metric reduction."""
import math

import pytest
import torch

from nanogrpo.grpo import LOG_RATIO_CLAMP, LossConfig, grpo_loss, overlong_penalty, reduce_loss_metrics

# Log-ratios from harmless to absurd: inside the clip range, past it, past the dual clip c = 3
# (log 3 = 1.1), and past the +-20 clamp in both directions.
LOG_RATIOS = [0.0, 0.1, -0.1, 0.5, -0.5, 1.5, -1.5, 3.0, 25.0, -25.0, 60.0, -60.0]


def _reference(log_ratio: float, A: float, lo: float, hi: float, c: float) -> tuple[float, float, bool]:
    """(pg, d pg / d logp, dual clip active) for one token, transcribed from the formulas."""
    d = min(max(log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    r = math.exp(d)
    unclipped, clipped = -r * A, -min(max(r, 1 - lo), 1 + hi) * A
    # Inside the clip range the two branches tie and carry the same gradient -r A.
    pg, grad = (unclipped, -r * A) if unclipped >= clipped else (clipped, 0.0)
    dual = A < 0 and pg > -c * A
    if dual:
        pg, grad = -c * A, 0.0
    if abs(log_ratio) > LOG_RATIO_CLAMP:
        grad = 0.0  # the clamp cuts the gradient through exp
    return pg, grad, dual


@pytest.mark.parametrize("clip_c", [3.0, 1.5, math.inf])
def test_dual_clip_and_clamp_match_per_element_reference(clip_c):
    """Guards the dual clip (a negative-advantage token's loss bounded by c|A|, none for A > 0, off
    at c = inf) and the log-ratio clamp: before it, one token with log-ratio 60 gave a ratio of
    1e26 and an overflowing loss/gradient."""
    B = 2 * len(LOG_RATIOS)
    old = torch.full((B, 1), -2.0, dtype=torch.float64)
    lr = torch.tensor(LOG_RATIOS * 2, dtype=torch.float64)[:, None]  # (B, 1)
    lp = (old + lr).requires_grad_()
    adv = torch.tensor([1.3] * len(LOG_RATIOS) + [-0.7] * len(LOG_RATIOS), dtype=torch.float64)
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_c)
    loss, m = grpo_loss(lp, old, adv, torch.ones(B, 1), cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    ref = [_reference(x, a, 0.2, 0.28, clip_c) for x, a in zip(lr[:, 0].tolist(), adv.tolist())]
    torch.testing.assert_close(loss.item(), sum(p for p, _, _ in ref) / B, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[:, 0].tolist(), [g / B for _, g, _ in ref], rtol=1e-12, atol=0)
    assert m["dual_clip_frac"].item() == pytest.approx(sum(d for _, _, d in ref) / B)
    assert m["ratio_max"].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP))
    assert m["ratio_min"].item() == pytest.approx(math.exp(-LOG_RATIO_CLAMP))
    if clip_c < math.inf:
        assert m["dual_clip_frac"].item() > 0, "the data must exercise the dual clip"
        assert all(p <= clip_c * 0.7 + 1e-12 for p, _, _ in ref[len(LOG_RATIOS):])


def test_clamp_keeps_kl_and_importance_weight_finite():
    """Guards exp overflow in the k3 KL term and the decoupled importance weight: a reference or
    sampler log-prob 100 nats away made them inf and the loss NaN."""
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    far = torch.tensor([[99.0, -102.0]], dtype=torch.float64)  # ref - lp = +100, -100
    cfg = LossConfig(kl_coef=0.1, tis_cap=None)
    loss, m = grpo_loss(lp, lp.detach() - 100.0, torch.tensor([0.5], dtype=torch.float64), torch.ones(1, 2), cfg,
                        ref_logprobs=far, prox_logprobs=lp.detach())
    (grad,) = torch.autograd.grad(loss, lp)
    c = LOG_RATIO_CLAMP
    k3 = [math.exp(c) - c - 1, math.exp(-c) + c - 1]  # d clamped to +-20
    w = math.exp(c)  # prox - old = 100, clamped
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    torch.testing.assert_close(m["kl"].item(), sum(k3) / 2, rtol=1e-6, atol=0)  # metrics are float32
    torch.testing.assert_close(m["tis_weight_mean"].item(), w, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.item(), (-0.5 * w * 2 + 0.1 * sum(k3)) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("max_len,buffer,penalty", [(16, 4, 1.0), (16, 16, 0.5), (10, 1, 2.0), (8, 0, 1.0)])
def test_overlong_penalty_matches_dapo(max_len, buffer, penalty):
    """Guards DAPO's soft overlong punishment: 0 until the last `buffer` tokens of the budget, then
    linear down to -penalty at the budget (an off-by-one would punish the first free length or
    miss the last one)."""
    lengths = torch.arange(0, max_len + 1)
    got = overlong_penalty(lengths, max_len, buffer, penalty)
    for n, v in zip(lengths.tolist(), got.tolist()):
        free = max_len - buffer
        want = 0.0 if buffer == 0 or n <= free else penalty * (free - n) / buffer
        assert v == pytest.approx(want, abs=1e-7), n
    if buffer:
        assert got[-1].item() == pytest.approx(-penalty) and got[max_len - buffer].item() == 0.0


def test_overlong_buffer_longer_than_budget_names_the_flags():
    """Guards a silently wrong penalty (> penalty at every length) when the buffer exceeds the budget."""
    with pytest.raises(ValueError, match="--overlong-buffer 9 .*--max-new-tokens 8"):
        overlong_penalty(torch.tensor([3]), 8, 9, 1.0)


def test_reduce_loss_metrics_over_split_equals_whole():
    """Guards the metrics bug: micro-batch loss/pg_loss are partial sums over the whole step's
    denominators, so they must be added, not token-averaged (that logged 1.97x the true loss with
    2 micro-batches and 0.45x with 3), and ratio extremes must be max/min'd, not averaged."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lens = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = torch.arange(T)[None] < lens[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cfg = LossConfig(clip_high=0.28)
    _, whole = grpo_loss(lp, old, adv, mask, cfg, entropy=ent)
    for cuts in ([0, 6], [0, 3, 6], [0, 1, 4, 6]):
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            _, m = grpo_loss(lp[a:b], old[a:b], adv[a:b], mask[a:b], cfg, entropy=ent[a:b],
                             token_denominator=float(mask.sum()), seq_denominator=float(B))
            parts.append((m, int(mask[a:b].sum())))
        got = reduce_loss_metrics(parts)
        for k in ("loss", "pg_loss", "ratio_max", "ratio_min", "ratio_mean", "clip_frac", "entropy", "kl"):
            assert got[k] == pytest.approx(whole[k].item(), abs=1e-6), (k, len(cuts) - 1)
        assert "adv_mean" not in got
