"""The learner's GRPO step against a plain full-batch reference.

LearnerCore splits a step into micro-batches of whole groups under a token budget, runs each
group's prompt once for its G completions, runs the lm_head only where a completion token is
predicted, and scales every micro-batch by the whole batch's denominators. None of that may change the update: one step must leave the same weights as
a single full-batch loss over full logits followed by `torch.optim.AdamW`.
"""
import math
import random
import time

import pyarrow as pa
import pytest
import torch

from learner.learner import LearnerCore, micro_batches
from nanogrpo.episode import group_batch, group_tensors, to_tensors
from nanogrpo.grpo import LossConfig, group_advantages, grpo_loss, token_logprobs
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir

G = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    Qwen2.from_config(TINY_MODEL_CONFIG, seed=3).save_pretrained(d)
    return d


def episodes(model: Qwen2, n_groups: int, seed: int) -> pa.Table:
    """Groups with ragged prompts and completions, rewards that vary inside every group, and
    sampler log-probs near (not equal to) the model's, so the clipped ratio is exercised."""
    rng = random.Random(seed)
    V = TINY_MODEL_CONFIG["vocab_size"]
    batches = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, V) for _ in range(rng.randint(2, 12))]
        rows = []
        for i in range(G):
            comp = [rng.randrange(3, V) for _ in range(rng.randint(1, 9))]
            with torch.no_grad():
                lp = token_logprobs(model(torch.tensor([prompt + comp]))[:, :-1], torch.tensor([prompt + comp])[:, 1:])
            lp = lp[0, len(prompt) - 1:] + 0.3 * torch.randn(len(comp))
            rows.append({"group_id": g, "step": 0, "example_index": g, "sample_index": i, "prompt_ids": prompt,
                         "completion_ids": comp, "logprobs": lp.tolist(), "response": "", "reward": float(i % 3),
                         "reward_format": 1.0, "reward_answer": float(i == 0), "finish_reason": "stop",
                         "policy_version": 0, "worker_id": 0, "gen_seconds": 0.0, "created_at": time.time()})
        batches.append(group_batch(rows))
    return pa.Table.from_batches(batches)


@pytest.mark.parametrize("loss_agg,old_logprobs", [("token-mean", "sampler"), ("seq-mean-token-mean", "sampler"),
                                                 ("token-mean", "learner")])
def test_micro_batched_step_equals_full_batch_reference(model_dir, loss_agg, old_logprobs):
    """Guards against micro-batching, the completion-only lm_head window, or per-micro-batch
    denominators silently changing the GRPO update; with --old-logprobs learner, pi_old is the
    learner's own pre-update log-probs (a ratio of exactly 1)."""
    cfg = RunConfig(lr=1e-3, group_size=G, micro_batch_tokens=64, loss_agg=loss_agg, max_grad_norm=1.0,
                    clip_low=0.2, clip_high=0.28, max_new_tokens=16, old_logprobs=old_logprobs)
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)
    ref = Qwen2.from_pretrained(model_dir)
    table = episodes(ref, 6, seed=1)
    grads = {}
    apply = core._apply_grads

    def spy(lr):  # the accumulated gradient, before clipping and the optimizer step
        grads.update({n: p.grad.clone() for n, p in core.model.named_parameters()})
        return apply(lr)
    core._apply_grads = spy
    metrics, _ = core.train_step(table)
    assert metrics["skipped_step"] == 0.0

    b = to_tensors(table.sort_by("group_id"))
    adv, zero_var = group_advantages(b["rewards"], G, scale_std=True)
    assert not zero_var.any()
    logp = token_logprobs(ref(b["input_ids"])[:, :-1], b["input_ids"][:, 1:])
    mask = b["loss_mask"].float()
    old = b["old_logprobs"] if old_logprobs == "sampler" else logp.detach()
    loss, _ = grpo_loss(logp, old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.28, loss_agg=loss_agg, norm_len=16))
    loss.backward()
    for name, q in ref.named_parameters():
        torch.testing.assert_close(grads[name], q.grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    opt.step()
    # Adam's first step is ~lr * sign(grad): elements whose gradient is near eps may differ a little,
    # a wrong update would differ by ~2 * lr.
    for (name, p), (_, q) in zip(core.model.named_parameters(), ref.named_parameters()):
        if name.endswith("k_proj.bias"):
            continue  # softmax ignores a per-query constant: this gradient is 0 up to rounding
        torch.testing.assert_close(p, q, rtol=0, atol=5e-5, msg=name)


def test_a_step_without_reward_spread_trains_nothing_and_says_so(model_dir):
    """Groups whose rewards are all equal carry no advantage. With KL and entropy off they are left
    out: the weights stay as they were, the version still advances, and the metrics say that no
    token was trained (the log-prob gap is missing, not a perfect 0)."""
    core = LearnerCore(vars(RunConfig(lr=1e-3, group_size=G, max_new_tokens=16)), str(model_dir), threads=1)
    table = episodes(Qwen2.from_pretrained(model_dir), 3, seed=2)
    col = table.schema.get_field_index("reward")
    table = table.set_column(col, "reward", pa.array([0.5] * table.num_rows, table.schema.field(col).type))
    before = {n: p.detach().clone() for n, p in core.model.named_parameters()}
    metrics, _ = core.train_step(table)
    assert metrics["zero_var_frac"] == 1.0 and metrics["train_tokens"] == 0 and metrics["version"] == 1
    assert math.isnan(metrics["logprob_gap"]) and "entropy" not in metrics
    for n, p in core.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_micro_batches_cover_every_group_once_under_the_budget():
    """Guards against micro-batching that drops or repeats a group, or exceeds the token budget
    (groups x longest prompt + rows x longest completion) with more than one group."""
    rng = random.Random(0)
    p_lens = [rng.randint(1, 40) for _ in range(50)]
    c_lens = [rng.randint(1, 120) for _ in range(50)]
    for budget in (1, 300, 2000, 10**6):
        mbs = micro_batches(p_lens, c_lens, G, budget)
        assert sorted(g for mb in mbs for g in mb) == list(range(50))
        for mb in mbs:
            cost = len(mb) * (max(p_lens[g] for g in mb) + G * max(c_lens[g] for g in mb))
            assert len(mb) == 1 or cost <= budget
        if budget == 10**6:
            assert len(mbs) == 1


def test_group_tensors_share_one_prompt_per_group(model_dir):
    """Guards against a group whose rows carry different prompts being trained as if they shared
    the first row's prompt."""
    table = episodes(Qwen2.from_pretrained(model_dir), 3, seed=2)
    b = group_tensors(table)
    assert b["prompt_ids"].shape[0] == 3 and b["index"].tolist() == [g for g in range(3) for _ in range(G)]
    for r, (p, c) in enumerate(zip(table.column("prompt_ids").to_pylist(), table.column("completion_ids").to_pylist())):
        assert b["prompt_ids"][b["index"][r], :b["prompt_lens"][b["index"][r]]].tolist() == p
        assert b["completion_ids"][r, :b["completion_lens"][r]].tolist() == c
    rows = table.to_pylist()
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"] + [5]
    with pytest.raises(ValueError, match="group 0: rows carry different prompts"):
        group_tensors(pa.Table.from_pylist(rows, schema=table.schema))


def _budgets_for_splits(table, counts=(1, 2, 3)) -> dict[int, int]:
    """--micro-batch-tokens values that split this table's groups into exactly 1, 2 and 3 micro-batches."""
    b = group_tensors(table.sort_by("group_id"))
    p = b["prompt_lens"].tolist()
    c = b["completion_lens"].view(-1, G).max(-1).values.tolist()
    found = {}
    for budget in range(1, 4000):
        found.setdefault(len(micro_batches(p, c, G, budget)), budget)
    return {n: found[n] for n in counts}


def test_logged_metrics_do_not_depend_on_the_micro_batch_split(model_dir):
    """Guards the metrics bug: micro-batch loss/pg_loss (partial sums over the step's denominators)
    were averaged token-weighted, logging 1.97x the true loss with 2 micro-batches and 0.45x with 3,
    and ratio_max/ratio_min were averaged. The same step split into 1, 2 and 3 micro-batches must log
    the same values, and they must be the full-batch loss's."""
    ref = Qwen2.from_pretrained(model_dir)
    table = episodes(ref, 6, seed=4)
    rows = {}
    for n, budget in _budgets_for_splits(table).items():
        cfg = RunConfig(lr=1e-3, group_size=G, micro_batch_tokens=budget, max_new_tokens=16, old_logprobs="sampler",
                        kl_coef=0.05, entropy_coef=0.01)
        rows[n], _ = LearnerCore(vars(cfg), str(model_dir), threads=1).train_step(table)
    b = to_tensors(table.sort_by("group_id"))
    adv, _ = group_advantages(b["rewards"], G)
    with torch.no_grad():
        logp, ent = token_logprobs(ref(b["input_ids"])[:, :-1], b["input_ids"][:, 1:], with_entropy=True)
        _, want = grpo_loss(logp, b["old_logprobs"], adv, b["loss_mask"], LossConfig(clip_high=0.28, kl_coef=0.05,
                            entropy_coef=0.01), ref_logprobs=logp, entropy=ent)
    assert 0 < want["clip_frac"] < 1 and want["ratio_max"] > 1.28, "the data must exercise the clip"
    for k in ("loss", "pg_loss", "ratio_max", "ratio_min", "ratio_mean", "clip_frac", "entropy", "kl", "adv_mean",
              "adv_std"):
        for n in (1, 2, 3):
            assert rows[n][k] == pytest.approx(float(want[k]), abs=1e-6), (k, n)


def _sampled_table(model: Qwen2, n_groups: int, top_p: float, max_new: int) -> pa.Table:
    """Groups sampled by the model itself (fresh: policy version 0) with the sampler's log-probs."""
    from nanogrpo.generate import generate
    rng = random.Random(7)
    V = TINY_MODEL_CONFIG["vocab_size"]
    prompts = [[rng.randrange(3, V) for _ in range(rng.randint(2, 8))] for _ in range(n_groups)]
    outs = generate(model, prompts, n=G, max_new_tokens=max_new, temperature=1.0, top_p=top_p, stop_token_ids=[2],
                    seed=3)
    rows = [{"group_id": c.prompt_index, "step": 0, "example_index": c.prompt_index, "sample_index": c.sample_index,
             "prompt_ids": prompts[c.prompt_index], "completion_ids": c.token_ids, "logprobs": c.logprobs,
             "response": "", "reward": float(c.sample_index % 2), "reward_format": 1.0, "reward_answer": 0.0,
             "finish_reason": c.finish_reason, "policy_version": 0, "worker_id": 0, "gen_seconds": 0.0,
             "created_at": 0.0} for c in outs]
    return pa.Table.from_batches([group_batch(rows)])


def test_old_logprobs_learner_gives_ratio_exactly_one_under_top_p(model_dir):
    """Guards the top-p bias: the sampler's log-probs are those of the truncated (renormalised)
    distribution, so with identical weights the ratio to them is < 1 on fresh tokens and negative
    advantages get clipped. --old-logprobs learner must give a ratio of exactly 1 there."""
    model = Qwen2.from_pretrained(model_dir)
    table = _sampled_table(model, 4, top_p=0.7, max_new=12)
    got = {}
    for mode in ("learner", "sampler"):
        cfg = RunConfig(lr=1e-3, group_size=G, max_new_tokens=12, old_logprobs=mode, micro_batch_tokens=64)
        got[mode], _ = LearnerCore(vars(cfg), str(model_dir), threads=1).train_step(table)
    assert got["learner"]["ratio_max"] == 1.0 and got["learner"]["ratio_min"] == 1.0
    assert got["learner"]["clip_frac"] == 0.0 and got["learner"]["train_tokens"] > 0
    # The same weights sampled these tokens: the gap to the sampler is the top-p renormalisation.
    assert got["sampler"]["ratio_mean"] < 0.95 and got["sampler"]["ratio_max"] <= 1.0 + 1e-5
    assert got["sampler"]["logprob_gap"] == pytest.approx(got["learner"]["logprob_gap"])


def test_mask_truncated_zeroes_the_policy_gradient_of_truncated_rows(model_dir, monkeypatch):
    """Guards --mask-truncated: a completion that hit the length budget must get no policy-gradient
    loss (its log-probs' gradient exactly 0) while the other rows train, and the step must record
    how many rows were truncated and masked."""
    import learner.learner as L
    table = episodes(Qwen2.from_pretrained(model_dir), 3, seed=5)
    truncated = [i % 4 == 1 for i in range(table.num_rows)]
    col = table.schema.get_field_index("finish_reason")
    table = table.set_column(col, "finish_reason", pa.array(["length" if t else "stop" for t in truncated]))
    seen = []

    def spy(logprobs, *args, **kw):
        logprobs.retain_grad()
        seen.append(logprobs)
        return grpo_loss(logprobs, *args, **kw)
    monkeypatch.setattr(L, "grpo_loss", spy)
    for mask_truncated in (True, False):
        seen.clear()
        cfg = RunConfig(lr=1e-3, group_size=G, max_new_tokens=16, mask_truncated=mask_truncated)
        metrics, _ = LearnerCore(vars(cfg), str(model_dir), threads=1).train_step(table)
        (logp,) = seen  # one micro-batch: rows in table order (sorted by group)
        row_grad = logp.grad.abs().sum(-1)  # (N,)
        t = torch.tensor(truncated)
        assert (row_grad[~t] > 0).all()
        assert (row_grad[t] == 0).all() == mask_truncated
        assert metrics["truncated_frac"] == 0.25 and metrics["pg_masked_frac"] == (0.25 if mask_truncated else 0.0)


def test_drop_zero_var_never_changes_the_update(model_dir):
    """Guards the loss scale moving with --drop-zero-var: the kept groups' tokens used to be the
    denominator (1.5x in one measured case). Skipping the groups without signal must leave the same
    weights and the same logged loss as training on them."""
    table = episodes(Qwen2.from_pretrained(model_dir), 3, seed=6)
    col = table.schema.get_field_index("reward")
    rewards = table.column("reward").to_pylist()
    rewards[:G] = [0.5] * G  # group 0 has no spread
    table = table.set_column(col, "reward", pa.array(rewards, table.schema.field(col).type))
    out = {}
    for drop in (True, False):
        cfg = RunConfig(lr=1e-3, group_size=G, max_new_tokens=16, drop_zero_var=drop)
        core = LearnerCore(vars(cfg), str(model_dir), threads=1)
        grads, apply = {}, core._apply_grads

        def spy(lr, grads=grads, apply=apply):  # the accumulated gradient, before the optimizer step
            grads.update({n: p.grad.clone() for n, p in core.model.named_parameters()})
            return apply(lr)
        core._apply_grads = spy
        out[drop] = (core.train_step(table)[0], grads)
    assert out[True][0]["train_tokens"] < out[False][0]["train_tokens"]
    for k in ("loss", "pg_loss", "grad_norm", "adv_mean", "adv_std", "zero_var_frac"):
        assert out[True][0][k] == pytest.approx(out[False][0][k], rel=1e-5, abs=1e-7), k
    for n, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][n], rtol=1e-4, atol=1e-8, msg=n)


def test_overlong_penalty_shapes_advantages_and_is_logged(model_dir):
    """Guards --overlong-buffer/--overlong-penalty: rewards are lowered linearly in the budget's
    last tokens before the group advantage (a group of equal task rewards but different lengths
    gains spread), and the step logs the mean penalty."""
    table = episodes(Qwen2.from_pretrained(model_dir), 3, seed=2)
    col = table.schema.get_field_index("reward")
    table = table.set_column(col, "reward", pa.array([0.5] * table.num_rows, table.schema.field(col).type))
    lens = torch.tensor([len(c) for c in table.sort_by("group_id").column("completion_ids").to_pylist()])
    cfg = RunConfig(lr=1e-3, group_size=G, max_new_tokens=9, overlong_buffer=4, overlong_penalty=0.5)
    metrics, _ = LearnerCore(vars(cfg), str(model_dir), threads=1).train_step(table)
    want = (-0.5 * (lens - 5).clamp(min=0) / 4).float()  # budget 9, free up to 5 tokens
    assert want.min() < 0, "the data must reach into the buffer"
    assert metrics["overlong_penalty"] == pytest.approx(float(want.mean()))
    spread = (want.view(-1, G).amax(-1) > want.view(-1, G).amin(-1)).float().mean()
    assert metrics["zero_var_frac"] == pytest.approx(1 - float(spread)) and metrics["train_tokens"] > 0
