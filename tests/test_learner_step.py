"""LearnerCore.train_step against an independent full-batch reference written out in this file.

The reference is deliberately plain: one full forward per episode row over prompt + completion,
log_softmax of logits / T, per-row group advantages computed by hand, the clipped per-token loss
summed in a Python loop, one backward, then the global-norm clip. It shares no code with the
learner's micro-batching, its shared-prompt forward, its advantage indexing or `grpo_loss`.

What makes it sensitive (the old micro-batch test was blind to several bugs):
  * every group has its own reward pattern (one is zero-variance and must be dropped), so taking
    the wrong rows' advantages changes the gradient;
  * the token budget packs several groups, of different prompts, into each of several
    micro-batches, so a row trained against another group's prompt changes the gradient;
  * the gradient itself is compared (captured when the optimizer steps, i.e. after clipping),
    not the parameters after one Adam step (~lr * sign(g), blind to the gradient's scale); the
    clip norm is small so clipping is active, and the learning rate the optimizer is handed is
    checked too.
"""
import copy
import math
import random
import time

import pyarrow as pa
import pytest
import torch

from learner.learner import LearnerCore, micro_batches
from nanogrpo.episode import group_batch
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from nanogrpo.tiny import TINY_MODEL_CONFIG, write_tiny_model_dir

G = 4
V = TINY_MODEL_CONFIG["vocab_size"]
# One reward pattern per group; group 2 has no spread (zero advantage: dropped unless KL/entropy).
REWARDS = [[1, 0, 0, 0], [0, 1, 2, 3], [0.5, 0.5, 0.5, 0.5], [2, 0, 0, 1], [1, 1, 0, 0], [0, 0, 3, 0.5]]
BUDGET = 80  # tokens per micro-batch: 2-3 of these groups per micro-batch, several micro-batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    Qwen2.from_config(TINY_MODEL_CONFIG, seed=5).save_pretrained(d)
    return d


def make_shapes(seed: int):
    """(prompt, [completions]) per group: ragged prompts and completions."""
    rng = random.Random(seed)
    out = []
    for _ in REWARDS:
        prompt = [rng.randrange(3, V) for _ in range(rng.randint(2, 10))]
        out.append((prompt, [[rng.randrange(3, V) for _ in range(rng.randint(1, 7))] for _ in range(G)]))
    return out


@torch.no_grad()
def table_for(model: Qwen2, shapes, temperature: float, version: int, seed: int) -> pa.Table:
    """Episodes whose sampler log-probs are the model's at `temperature` plus noise, so the
    importance ratio is not 1 and both sides of the clip are exercised."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for gid, ((prompt, comps), rewards) in enumerate(zip(shapes, REWARDS)):
        rows = []
        for i, comp in enumerate(comps):
            lp = row_logprobs(model, prompt, comp, temperature)[0] + 0.3 * torch.randn(len(comp), generator=g)
            rows.append({"group_id": gid, "step": 0, "example_index": gid, "sample_index": i, "prompt_ids": prompt,
                         "completion_ids": comp, "logprobs": lp.tolist(), "response": "", "reward": float(rewards[i]),
                         "reward_format": float(i % 2), "reward_answer": float(rewards[i] == 1), "finish_reason": "stop",
                         "policy_version": version, "worker_id": 0, "gen_seconds": 0.0, "created_at": time.time()})
        batches.append(group_batch(rows))
    # Arrival order is not group order: the learner must sort.
    return pa.Table.from_batches(batches[::-1])


def row_logprobs(model, prompt, comp, temperature):
    """-> (log-probs of comp (L,), entropies (L,)) from one full forward over prompt + comp."""
    logits = model(torch.tensor([prompt + comp]))[0, len(prompt) - 1: len(prompt) - 1 + len(comp)]  # (L, V)
    ls = torch.log_softmax(logits.double() / temperature, -1)
    return ls.gather(-1, torch.tensor(comp)[:, None])[:, 0], -(ls.exp() * ls).sum(-1)


def hand_advantages(scale_std: bool) -> list[list[float]]:
    out = []
    for r in REWARDS:
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        if std == 0:
            out.append([0.0] * G)
        else:
            out.append([(x - mean) / (std + 1e-6) if scale_std else x - mean for x in r])
    return out


def reference_grads(cfg: RunConfig, policy: Qwen2, table: pa.Table, ref_model=None, decoupled=False):
    """The full-batch GRPO loss of `table` under `policy`, its gradient (clipped as the config asks)
    and its pre-clip global norm, computed row by row."""
    rows = sorted(table.to_pylist(), key=lambda r: (r["group_id"], r["sample_index"]))
    adv = hand_advantages(cfg.scale_std)
    keep_zero = not (cfg.drop_zero_var and cfg.kl_coef == 0 and cfg.entropy_coef == 0)
    kept = [r for r in rows if keep_zero or len(set(REWARDS[r["group_id"]])) > 1]
    n_tok = sum(len(r["completion_ids"]) for r in kept)  # trained tokens (the metrics' denominator)
    # The loss denominators count every row the step took, trained or not (--drop-zero-var leaves the
    # loss scale alone).
    den_tok, den_seq = sum(len(r["completion_ids"]) for r in rows), len(rows)
    policy.zero_grad(set_to_none=True)
    total = 0.0
    stats = {"gap": 0.0, "entropy": 0.0, "kl": 0.0, "tokens": n_tok}
    for r in kept:
        lp, ent = row_logprobs(policy, r["prompt_ids"], r["completion_ids"], cfg.temperature)
        old = torch.tensor(r["logprobs"], dtype=torch.float64)
        a = adv[r["group_id"]][r["sample_index"]]
        # pi_old: the learner's own detached log-probs for stale rows (decoupled PPO) and, with
        # --old-logprobs learner, for fresh ones too (ratio exactly 1); else the sampler's.
        own = decoupled or cfg.old_logprobs == "learner"
        base = lp.detach() if own else old
        ratio = torch.exp(lp - base)
        per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
        if a < 0:  # dual clip: a negative advantage's loss is bounded by c * |A|
            per_tok = torch.minimum(per_tok, torch.full_like(per_tok, -a * cfg.clip_ratio_c))
        if decoupled:
            per_tok = per_tok * torch.exp(base - old).clamp(max=cfg.tis_cap)
        if cfg.kl_coef:
            with torch.no_grad():
                ref_lp, _ = row_logprobs(ref_model, r["prompt_ids"], r["completion_ids"], cfg.temperature)
            d = ref_lp - lp
            per_tok = per_tok + cfg.kl_coef * (torch.exp(d) - d - 1)
            stats["kl"] += float((torch.exp(d) - d - 1).detach().sum()) / n_tok
        per_tok = per_tok - cfg.entropy_coef * ent
        stats["gap"] += float((lp.detach() - old).abs().sum()) / n_tok
        stats["entropy"] += float(ent.detach().sum()) / n_tok
        if cfg.loss_agg == "token-mean":
            loss = per_tok.sum() / den_tok
        elif cfg.loss_agg == "seq-mean-token-mean":
            loss = per_tok.mean() / den_seq
        else:  # seq-mean-token-sum-norm (Dr. GRPO): a constant length, not the row's
            loss = per_tok.sum() / (den_seq * cfg.max_new_tokens)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    if cfg.max_grad_norm > 0:
        coef = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
        grads = {n: g * coef for n, g in grads.items()}
    return grads, norm, stats


def spy_optimizer(core: LearnerCore) -> dict:
    """Record the gradients and learning rates the optimizer is handed at each step."""
    seen = {"grads": [], "lr": []}
    step = core.opt.step

    def spy(*a, **k):
        seen["grads"].append({n: p.grad.detach().clone() for n, p in core.model.named_parameters()})
        seen["lr"].append([g["lr"] for g in core.opt.param_groups])
        return step(*a, **k)
    core.opt.step = spy
    return seen


def assert_grads_match(ours: dict, ref: dict):
    scale = max(float(g.abs().max()) for g in ref.values())
    for name, g in ref.items():
        torch.testing.assert_close(ours[name].double(), g.double(), rtol=2e-4, atol=2e-6 * scale, msg=name)


def check_packing(cfg: RunConfig, shapes):
    """The test's own premise: several micro-batches, at least one holding more than one group."""
    kept = [g for g in range(len(REWARDS)) if cfg.kl_coef or cfg.entropy_coef or len(set(REWARDS[g])) > 1]
    mbs = micro_batches([len(shapes[g][0]) for g in kept], [max(map(len, shapes[g][1])) for g in kept], G, BUDGET)
    assert len(mbs) >= 2 and max(map(len, mbs)) >= 2, mbs


CASES = {
    # clip active (norm >> 0.02): guards against clip_grad_norm_ being dropped or mis-scaled
    "token-mean": dict(),
    "learner-pi-old": dict(old_logprobs="learner"),
    "dual-clip": dict(clip_ratio_c=1.05),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum-norm": dict(loss_agg="seq-mean-token-sum-norm", scale_std=False),
    "temperature": dict(temperature=0.7),
    "entropy-bonus": dict(entropy_coef=0.05),
    "no-clip": dict(max_grad_norm=0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_gradient_equals_full_batch_reference(model_dir, case):
    """Guards against (each fails this test when applied by hand): the micro-batch taking the first
    rows' advantages (`adv[:len(idx)]`) instead of its own rows'; every row trained against the
    micro-batch's first prompt (prompt index 0); `clip_grad_norm_` removed or its norm misreported;
    the learner scoring without the sampling temperature; `entropy_coef` not reaching the loss; the
    seq-mean-token-sum-norm denominator wrong; zero-variance groups kept in the denominators."""
    cfg = RunConfig(**{**dict(lr=1e-3, group_size=G, micro_batch_tokens=BUDGET, max_grad_norm=0.02, clip_low=0.2,
                             clip_high=0.28, max_new_tokens=16, old_logprobs="sampler"), **CASES[case]})
    shapes = make_shapes(seed=1)
    check_packing(cfg, shapes)
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)
    seen = spy_optimizer(core)
    policy = Qwen2.from_pretrained(model_dir)
    table = table_for(policy, shapes, cfg.temperature, version=0, seed=2)
    metrics, _ = core.train_step(table)
    ref, norm, stats = reference_grads(cfg, policy, table)
    assert metrics["skipped_step"] == 0.0 and len(seen["grads"]) == 1
    if cfg.max_grad_norm:
        assert norm > 10 * cfg.max_grad_norm  # the clip is active in this test
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_grads_match(seen["grads"][0], ref)
    assert seen["lr"][0] == [cfg.lr] * len(seen["lr"][0])
    check_metrics(metrics, table, stats, staleness=0)


def check_metrics(metrics: dict, table: pa.Table, stats: dict, staleness: int):
    """Guards against misreported step metrics (what the console, metrics.csv and the abort and
    staleness checks read): each against its definition, from the table and the reference."""
    rows = table.to_pylist()
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    expect = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "success_rate": sum(r["reward_answer"] == 1.0 for r in rows) / len(rows),
        "format_rate": sum(r["reward_format"] > 0 for r in rows) / len(rows),
        "response_len": sum(len(r["completion_ids"]) for r in rows) / len(rows),
        "zero_var_frac": sum(len(set(g)) == 1 for g in REWARDS) / len(REWARDS),
        "staleness_mean": float(staleness), "staleness_max": float(staleness),
        "train_tokens": float(stats["tokens"]), "logprob_gap": stats["gap"], "entropy": stats["entropy"],
        "skipped_step": 0.0, "skipped_in_a_row": 0,
    }
    if staleness == 0:
        expect["logprob_gap_onpolicy"] = stats["gap"]
    else:
        assert math.isnan(metrics["logprob_gap_onpolicy"])  # no on-policy token in this step
    if stats["kl"]:
        expect["kl"] = stats["kl"]
    for k, v in expect.items():
        assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k


def two_step(model_dir, cfg: RunConfig, second_version: int):
    """Step 1 on fresh episodes, then step 2 on episodes labelled `second_version`, sampled from the
    weights step 1 left. -> (core, seen, policy after step 1, step-2 table, step-2 metrics)."""
    shapes = make_shapes(seed=3)
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)
    init = Qwen2.from_pretrained(model_dir)
    core.train_step(table_for(init, shapes, cfg.temperature, version=0, seed=4))
    seen = spy_optimizer(core)
    policy = copy.deepcopy(init)
    policy.load_state_dict({k: v.detach().clone() for k, v in core.model.state_dict().items()})
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), init.parameters()))
    table = table_for(policy, make_shapes(seed=5), cfg.temperature, version=second_version, seed=6)
    metrics, _ = core.train_step(table)
    return core, seen, policy, table, metrics, init


def test_kl_penalty_to_the_initial_policy(model_dir):
    """Guards against the KL term to the frozen initial policy not reaching the gradient (at the
    first step policy == reference and the k3 gradient is 0, so this needs a second step), against
    the reference being the current policy instead of the initial one, and against zero-variance
    groups being dropped although their KL still trains."""
    cfg = RunConfig(lr=1e-2, group_size=G, micro_batch_tokens=BUDGET, max_grad_norm=0.0, kl_coef=0.5,
                    max_new_tokens=16, old_logprobs="sampler")
    _, seen, policy, table, metrics, init = two_step(model_dir, cfg, second_version=1)
    ref, _, stats = reference_grads(cfg, policy, table, ref_model=init)
    assert metrics["kl"] > 0 and metrics["version"] == 2
    assert_grads_match(seen["grads"][0], ref)
    check_metrics(metrics, table, stats, staleness=0)
    no_kl, _, _ = reference_grads(RunConfig(**{**vars(cfg), "kl_coef": 0.0, "drop_zero_var": False}), policy,
                                  table)
    diff = max(float((ref[n] - no_kl[n]).abs().max()) for n in ref)
    assert diff > 1e-3 * max(float(g.abs().max()) for g in ref.values())  # the KL term is not negligible here


def test_stale_episodes_use_decoupled_ppo(model_dir):
    """Guards against `prox = None` always (stale episodes trained with the ratio to the sampler
    instead of the pre-step learner, without the truncated importance weight): every episode of
    step 2 comes from policy version 0 while the learner is at version 1."""
    cfg = RunConfig(lr=1e-2, group_size=G, micro_batch_tokens=BUDGET, max_grad_norm=0.0, tis_cap=1.3,
                    max_new_tokens=16, old_logprobs="sampler")
    core, seen, policy, table, metrics, _ = two_step(model_dir, cfg, second_version=0)
    assert metrics["staleness_max"] == 1 and "tis_weight_mean" in metrics
    ref, _, stats = reference_grads(cfg, policy, table, decoupled=True)
    assert_grads_match(seen["grads"][0], ref)
    check_metrics(metrics, table, stats, staleness=1)
    coupled, _, _ = reference_grads(cfg, policy, table, decoupled=False)
    assert max(float((ref[n] - coupled[n]).abs().max()) for n in ref) > 1e-3 * max(
        float(g.abs().max()) for g in ref.values())


def test_warmup_learning_rate_reaches_the_optimizer(model_dir):
    """Guards against the warm-up schedule not being applied (or applied off by one step): the
    optimizer must be handed lr * (s + 1) / warmup at step s, then the full lr."""
    cfg = RunConfig(lr=1e-3, group_size=G, micro_batch_tokens=BUDGET, warmup_steps=3, max_new_tokens=16)
    core = LearnerCore(vars(cfg), str(model_dir), threads=1)
    seen = spy_optimizer(core)
    model = Qwen2.from_pretrained(model_dir)
    lrs = []
    for s in range(5):
        m, _ = core.train_step(table_for(model, make_shapes(seed=s), 1.0, version=s, seed=s))
        lrs.append(m["lr"])
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert [x[0] for x in seen["lr"]] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(x)) == 1 for x in seen["lr"])
