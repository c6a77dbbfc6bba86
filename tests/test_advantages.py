"""group_advantages against hand-computed values (defaults, group size 2, integer rewards), and
token_logprobs refusing T = 0.

Written after a mutation run (bench/mutation.py) showed these mutants surviving the suite: the
`scale_std` / `eps` defaults changed, the std skipped for groups of two, rewards not promoted to a
float dtype."""
import math

import pytest
import torch

from nanogrpo.grpo import group_advantages


def hand(rewards: list[float], G: int, scale_std: bool, eps: float = 1e-6) -> list[float]:
    out = []
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        out += [0.0] * G if max(r) == min(r) else [(x - mean) / (std + eps) if scale_std else x - mean for x in r]
    return out


def test_defaults_scale_by_the_unbiased_std_with_a_small_eps():
    """Guards against the defaults changing under callers that rely on them (`scale_std=False`, a
    large eps): GRPO's advantage is (r - mean) / (std + 1e-6), std unbiased."""
    r = [0.0, 1.0, 3.0, 0.5, 2.0, 2.0, 2.0, 2.0]
    adv, zero_var = group_advantages(torch.tensor(r), 4)
    torch.testing.assert_close(adv.double(), torch.tensor(hand(r, 4, True), dtype=torch.float64), rtol=1e-6, atol=0)
    assert zero_var.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor(r), 4, scale_std=False)
    torch.testing.assert_close(adv.double(), torch.tensor(hand(r, 4, False), dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("G", [2, 3])
def test_small_groups_are_scaled_too(G):
    """Guards against the std being skipped (advantages divided by eps alone: ~1e6) for small
    groups, e.g. a `group_size > 2` test where `> 1` is meant."""
    r = [0.0, 1.0, 5.0, 2.0, 2.0, 7.0][: 2 * G]
    adv, _ = group_advantages(torch.tensor(r), G)
    torch.testing.assert_close(adv.double(), torch.tensor(hand(r, G, True), dtype=torch.float64), rtol=1e-6, atol=0)
    assert adv.abs().max() < 2


def test_integer_and_half_precision_rewards_are_promoted():
    """Guards against computing in the rewards' own dtype: integer rewards cannot be averaged, and
    bf16 rewards would round the advantages to 3 significant digits."""
    adv, _ = group_advantages(torch.tensor([1, 0, 0, 0, 3, 1, 2, 2]), 4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), torch.tensor(hand([1, 0, 0, 0, 3, 1, 2, 2], 4, True),
                                                          dtype=torch.float64), rtol=1e-6, atol=0)
    r = [0.1, 0.7, 0.3, 0.9]
    adv, _ = group_advantages(torch.tensor(r, dtype=torch.bfloat16), 4)
    assert adv.dtype == torch.float32
    exact = hand([float(x) for x in torch.tensor(r, dtype=torch.bfloat16).float()], 4, True)
    torch.testing.assert_close(adv.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)


def test_token_logprobs_refuses_a_zero_temperature():
    """Guards against `temperature <= 0` loosened to `< 0`: T = 0 would then die in a division
    (ZeroDivisionError, no message about the setting) instead of a clear ValueError."""
    from nanogrpo.grpo import token_logprobs
    x = torch.zeros(1, 2, 5)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            token_logprobs(x, torch.zeros(1, 2, dtype=torch.long), t)
