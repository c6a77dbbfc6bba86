"""The data-parallel learner step (LearnerCore.join_dp) against the one-rank step, over gloo.

Ranks run as threads of this process, each a full LearnerCore with its own model and optimizer
shard; they get the same tables, as the learner group hands every rank the whole step.
"""
import pytest
import torch

from learner.learner import LearnerCore
from test_dist import run_ranks
from test_learner import episodes, model_dir  # noqa: F401 - model_dir is a fixture

KEYS = ("loss", "pg_loss", "ratio_max", "ratio_min", "clip_frac", "entropy", "logprob_gap", "train_tokens",
        "grad_norm", "reward_mean")


def _cfg(**kw) -> dict:
    # A small lr: Adam moves each weight by about lr * g / (|g| + eps), and where |g| is near eps
    # (hundreds of entries here) summing the ranks' partial gradients in another order (fp32, ~1e-10)
    # changes that ratio by a fraction: at this lr such a change stays under the 1e-6 tolerance.
    return {"group_size": 4, "lr": 2e-5, "micro_batch_tokens": 120, "max_grad_norm": 0.5, "max_new_tokens": 16, **kw}


def _run(world: int, model_dir, tables: list, **kw) -> list[tuple[LearnerCore, list[dict]]]:
    def rank(r, port):
        core = LearnerCore(_cfg(**kw), str(model_dir), threads=1)
        if world > 1:
            core.join_dp("127.0.0.1", port, r, world, timeout_s=60)
        return core, [core.train_step(t)[0] for t in tables]
    return run_ranks(world, rank)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_ranks_equal_one_rank(model_dir, loss_agg):
    """Two learner ranks, each with about half of every step's groups, end two steps with the
    weights and the logged metrics of one rank (fp32, atol 1e-6). Guards against a rank's share
    using its own denominators, gradients averaged instead of summed, metrics logged from rank 0's
    share only, and optimizer shards that drift apart."""
    from nanogrpo.model import Qwen2
    base = Qwen2.from_pretrained(model_dir)
    tables = [episodes(base, 6, seed=s) for s in (11, 12)]
    (one, m1), = _run(1, model_dir, tables, loss_agg=loss_agg)
    two = _run(2, model_dir, tables, loss_agg=loss_agg)
    for core, m2 in two:
        for a, b in zip(m1, m2):
            for k in KEYS:
                if k in a:
                    assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-6, nan_ok=True), k
        for (name, p), q in zip(one.model.named_parameters(), core.model.parameters()):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    held = [core.opt.state_numel() for core, _ in two]
    total = 2 * sum(p.numel() for p in one.model.parameters())
    assert sum(held) == total and max(held) < 0.75 * total  # each rank: its shard's moments only
