"""The sampler's distribution, checked exactly rather than by frequencies.

* top-p / top-k / temperature: `process_logits` on small hand-built distributions whose kept sets
  and renormalised log-probs are worked out by hand;
* the two-level inverse-CDF draw: `draw` uses one float64 uniform per row from the generator it is
  given, so a replica of that generator gives the same uniforms and the token each must map to
  under the exact (float64) CDF. Every draw is compared, not a histogram with a z-score bound;
* greedy log-probs: their values against log_softmax of a plain full forward.
"""
import math

import pytest
import torch

from nanogrpo.config import ModelConfig
from nanogrpo.generate import BLOCK, draw, generate, next_tokens, process_logits
from nanogrpo.model import Qwen2

P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
LOGITS = P.log().float()[None]  # (1, 4)


def kept(logprobs: torch.Tensor) -> list[int]:
    return torch.isfinite(logprobs[0]).nonzero().squeeze(-1).tolist()


@pytest.mark.parametrize("top_p,expect", [
    (0.5, [0]),            # mass before token 1 is 0.5: reaches top_p, so token 1 goes (>=, not >)
    (0.50001, [0, 1]),
    (0.7, [0, 1]),         # an inclusive cumsum (0.5, 0.8 >= 0.7) would keep only token 0
    (0.9, [0, 1, 2]),
    (0.96, [0, 1, 2, 3]),
    (1e-9, [0]),
])
def test_top_p_keeps_exactly_the_nucleus(top_p, expect):
    """Guards against the top-p boundary moving: `cumsum >= top_p` (inclusive) instead of the mass
    strictly before a token, `>` instead of `>=`, and against the kept set not being renormalised."""
    lp = process_logits(LOGITS.clone(), 1.0, 0, top_p)
    assert kept(lp) == expect
    mass = P[expect].sum()
    torch.testing.assert_close(lp[0, expect].double(), (P[expect] / mass).log(), atol=1e-6, rtol=0)


def test_top_p_always_keeps_the_top_token():
    """Guards against deleting `drop[:, 0] = False`: at top_p = 0 (the greedy limit) nothing reaches
    the threshold first, and the row would be all -inf (NaN log-probs, an undefined draw)."""
    for logits in (LOGITS, torch.tensor([[0.0, 3.0, -1.0, 3.0 - 1e-3]])):
        lp = process_logits(logits.clone(), 1.0, 0, 0.0)
        top = int(logits.argmax())
        assert kept(lp) == [top] and lp[0, top] == 0.0


def test_top_p_applies_to_the_tempered_distribution_after_top_k():
    """Guards against top-p computed on the untempered probabilities, or before top-k: at T = 2
    the probabilities flatten to ~(0.37, 0.29, 0.2, 0.12) (normalised sqrt(P)), so top_p = 0.7
    keeps three tokens, not two; with top_k = 2 first, only tokens 0 and 1 remain."""
    q = P.sqrt() / P.sqrt().sum()
    lp = process_logits(LOGITS.clone(), 2.0, 0, 0.7)
    assert kept(lp) == [0, 1, 2]
    torch.testing.assert_close(lp[0, :3].double(), (q[:3] / q[:3].sum()).log(), atol=1e-6, rtol=0)
    lp = process_logits(LOGITS.clone(), 2.0, 2, 0.95)
    assert kept(lp) == [0, 1]
    torch.testing.assert_close(lp[0, :2].double(), (q[:2] / q[:2].sum()).log(), atol=1e-6, rtol=0)


def test_greedy_process_logits_are_the_untempered_model_log_probs():
    """Guards against greedy log-probs that are raw logits, or tempered, or top-k/top-p truncated:
    temperature 0 reports log_softmax of the model's own logits."""
    x = torch.tensor([[1.0, 2.0, -0.5, 0.25]])
    lp = process_logits(x.clone(), 0.0, 2, 0.5)
    torch.testing.assert_close(lp, torch.log_softmax(x, -1))
    tok, tlp = next_tokens(x.clone(), 0.0, 0, 1.0, None, torch.Generator())
    assert tok.tolist() == [1]
    torch.testing.assert_close(tlp, torch.log_softmax(x, -1)[:, 1])


def test_greedy_generation_log_probs_equal_log_softmax_of_the_model(tmp_path):
    """Guards against dropping `- logsumexp` in the greedy branch (the reported log-probs would be
    raw logits; only their count was checked) and against cache drift in them: each greedy token's
    log-prob equals log_softmax of a full uncached forward at that position."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    model = Qwen2.from_config(cfg, seed=4).eval()
    prompts = [[1, 5, 9], [3], [7, 7, 2, 30, 11]]
    outs = generate(model, prompts, n=1, max_new_tokens=8, temperature=0.0)
    for c in outs:
        p = prompts[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].float()  # (L, V)
        assert c.token_ids == logits.argmax(-1).tolist()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
        assert all(lp <= 0 for lp in c.logprobs)


# --------------------------------------------------------------------------- the inverse-CDF draw

def exact_tokens(x: torch.Tensor, seed: int):
    """The tokens `draw(x, Generator(seed))` must return: the same float64 uniforms mapped through
    the float64 CDF of softmax(x). -> (tokens (B,), each uniform's distance to the nearest CDF
    boundary as a fraction of the total mass (B,))."""
    u = torch.rand(x.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x64 = x.double()
    cdf = (x64 - x64.amax(-1, keepdim=True)).exp().cumsum(-1)  # (B, V)
    t = u * cdf[:, -1:]
    tok = torch.searchsorted(cdf, t, right=True).squeeze(-1)
    hi = cdf.gather(-1, tok[:, None])
    lo = torch.where(tok[:, None] > 0, cdf.gather(-1, (tok[:, None] - 1).clamp(min=0)), 0.0)
    return tok, (torch.minimum(t - lo, hi - t) / cdf[:, -1:]).squeeze(-1)


def test_draw_is_the_exact_inverse_cdf_on_a_small_vocabulary():
    """Guards against an off-by-one in either level of the inverse CDF (a token's interval given to
    its neighbour), a block boundary or the padded tail mis-handled, zero-probability tokens ever
    drawn, and log-probs not of the drawn token: every one of 20,000 draws over three blocks (the
    last one padded, -inf at block edges) is the token the exact CDF gives its uniform."""
    V = 2 * BLOCK + 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(V, generator=g) * 2
    x[[0, BLOCK - 1, BLOCK, V - 1]] = float("-inf")
    x[BLOCK + 1] = 4.0
    rows = x.expand(20_000, V).contiguous()
    for seed in (1, 2):
        tok, logp = draw(rows.clone(), torch.Generator().manual_seed(seed))
        want, margin = exact_tokens(rows, seed)
        clear = margin > 1e-9  # a uniform this close to a boundary may round either way
        assert int((~clear).sum()) <= 2
        assert torch.equal(tok[clear], want[clear])
        assert not torch.isinf(x[tok]).any()
        torch.testing.assert_close(logp, torch.log_softmax(x, -1)[tok], atol=1e-5, rtol=0)


def test_draw_is_exact_over_a_qwen_sized_vocabulary():
    """Guards against replacing the two-level draw by a flat float32 cumsum over the vocabulary:
    its rounding (~6e-8 of the total mass at every boundary, ~1e-3 total variation over 152k
    tokens) moves some uniforms into a neighbouring token. Uniform logits have the closed form
    token = floor(u * V); random logits are compared with the float64 CDF. Every draw must match."""
    V, B = 151_936, 256
    ones = torch.zeros(B, V)
    for seed in range(3):
        tok, logp = draw(ones.clone(), torch.Generator().manual_seed(seed))
        u = torch.rand(B, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(tok, (u * V).floor().long())
        torch.testing.assert_close(logp, torch.full((B,), -math.log(V)), atol=1e-5, rtol=0)
    for seed in range(3):
        x = torch.randn(B, V, generator=torch.Generator().manual_seed(100 + seed))
        tok, _ = draw(x.clone(), torch.Generator().manual_seed(seed))
        want, margin = exact_tokens(x, seed)
        clear = margin > 1e-10
        assert int((~clear).sum()) <= 2 and torch.equal(tok[clear], want[clear])


def test_top_p_generation_samples_inside_the_nucleus_with_its_log_probs():
    """Guards against generation with top_p < 1 (the only path through `sample` with T > 0)
    turning greedy (`temperature == 0` test inverted), drawing outside the nucleus, or reporting
    log-probs of the untruncated distribution: each token lies in the top-p set of a full
    uncached forward, its log-prob is the renormalised one, and a group's samples differ."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    model = Qwen2.from_config(cfg, seed=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # a peaked distribution, so top-p = 0.8 drops most of the vocabulary
    prompts = [[1, 5, 9], [3]]
    outs = generate(model, prompts, n=6, max_new_tokens=6, temperature=0.9, top_p=0.8, seed=2)
    greedy = 0
    for c in outs:
        p = prompts[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].float()  # (L, V)
        ref = process_logits(logits, 0.9, 0, 0.8)  # the nucleus, renormalised (tested exactly above)
        got = ref.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.isfinite(got).all()  # never outside the nucleus
        torch.testing.assert_close(torch.tensor(c.logprobs), got, atol=1e-4, rtol=0)
        greedy += c.token_ids == logits.argmax(-1).tolist()
    assert torch.isfinite(ref).sum(-1).max() < cfg.vocab_size  # the nucleus really truncates
    assert greedy < len(outs)
    assert len({tuple(c.token_ids) for c in outs[:6]}) > 1
