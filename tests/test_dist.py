"""Data-parallel learner pieces (nanogrpo/dist.py) against the one-process update, over gloo.

The ranks run as threads of this process, each with its own model copy and its own gloo group
member: the same collectives as separate processes, without a process start per test.
"""
import copy
import threading

import pytest
import torch

from learner.sync import free_port
from nanogrpo.dist import DPGroup, GradReducer, ShardedOffloadAdamW, balance_groups, shard_bounds
from nanogrpo.grpo import token_logprobs
from nanogrpo.model import Qwen2
from nanogrpo.optim import CPUOffloadAdamW, clip_grad_norm_, param_groups
from nanogrpo.weights import flatten_parameters

CFG = dict(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False)
LR, WD, MAX_NORM = 3e-3, 0.1, 0.05  # a small max norm keeps clipping active on every step



def _data(steps: int, seqs: int = 6, T: int = 10):
    """Per step: (ids (S, T), per-sequence loss weights (S,)) with uneven weights and lengths."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, CFG["vocab_size"], (seqs, T), generator=g)
        lens = torch.randint(3, T, (seqs,), generator=g)
        w = torch.randn(seqs, generator=g)  # advantage-like signed weights
        out.append((ids, lens, w))
    return out


def _partial_loss(model, ids, lens, w, rows, den):
    """sum over `rows` of w_i * sum_t logp_it / den: one rank's share of the global loss."""
    if not rows:
        return None
    ids, lens, w = ids[rows], lens[rows], w[rows]
    logp = token_logprobs(model(ids)[:, :-1], ids[:, 1:])  # (b, T-1)
    mask = torch.arange(ids.shape[1] - 1)[None] < (lens - 1)[:, None]
    return -(w[:, None] * logp * mask).sum() / den


def _reference(model, data):
    """One process, plain CPUOffloadAdamW: the update the ranks must reproduce. -> (model, per-step
    pre-clip gradient norms, the first step's gradients)."""
    opt = CPUOffloadAdamW(param_groups(model, WD), lr=LR, weight_decay=WD)
    norms, grads = [], None
    for ids, lens, w in data:
        den = float((lens - 1).sum())
        _partial_loss(model, ids, lens, w, list(range(len(ids))), den).backward()
        grads = grads or [p.grad.clone() for p in model.parameters()]
        norms.append(float(clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, norms, grads


def _rank(rank, world, port, model, data, out, micro=2, state=None):
    group = DPGroup("127.0.0.1", port, rank, world, timeout_s=60)
    flatten_parameters(model)
    opt = ShardedOffloadAdamW(model, group, lr=LR, weight_decay=WD)
    if state is not None:
        opt.load_state_dict(state)
    reducer = GradReducer([p for p in model.parameters()], group, bucket_bytes=20000)  # several params per bucket
    for ids, lens, w in data:
        den = float((lens - 1).sum())  # global, the same on every rank
        mine = balance_groups((lens - 1).tolist(), world)[rank]
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        for j, rows in enumerate(chunks):
            if j == len(chunks) - 1:
                reducer.arm()
            _partial_loss(model, ids, lens, w, rows, den).backward()
        reducer.finish()
        if "grads" not in out.setdefault(rank, {}):
            out[rank]["grads"] = [p.grad.clone() for p in model.parameters()]
        out.setdefault("norms", {}).setdefault(rank, []).append(float(clip_grad_norm_(opt.params, MAX_NORM)))
        opt.step()
        opt.zero_grad()
    out[rank].update(model=model, opt=opt)
    out.setdefault("state", {})[rank] = opt.state_dict()


def run_ranks(world: int, fn) -> list:
    """fn(rank, port) in `world` threads, one gloo rank each. -> their results, in rank order."""
    port, out, errors = free_port(), [None] * world, []

    def target(r):
        try:
            out[r] = fn(r, port)
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert not errors, errors
    return out


def _run_ranks(world, model, data, state=None):
    out = {}
    run_ranks(world, lambda r, port: _rank(r, world, port, copy.deepcopy(model), data, out, state=state))
    return out


@pytest.fixture(scope="module")
def base():
    return Qwen2.from_config(CFG, seed=3)


def test_balance_groups_whole_groups_by_tokens():
    """Guards against a split that drops or duplicates a group, or ignores token counts (one rank
    with all the long groups)."""
    tokens = [100, 90, 10, 10, 10, 5, 80, 1]
    shares = balance_groups(tokens, 3)
    assert sorted(g for s in shares for g in s) == list(range(len(tokens)))
    loads = [sum(tokens[g] for g in s) for s in shares]
    assert max(loads) - min(loads) <= max(tokens) and max(loads) <= 110
    assert balance_groups(tokens, 1) == [list(range(len(tokens)))]


def test_shard_bounds_are_contiguous_and_balanced():
    """Guards against shards that overlap, skip a parameter, or give one rank nearly everything."""
    numels = [50, 10, 10, 40, 5, 5, 30, 50]
    for n in (1, 2, 3, 4):
        b = shard_bounds(numels, n)
        assert b[0][0] == 0 and b[-1][1] == len(numels)
        assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
        sizes = [sum(numels[lo:hi]) for lo, hi in b]
        assert max(sizes) <= sum(numels) / n + max(numels)


def assert_adam_close(q, p, steps: int, msg: str):
    """Weights after `steps` AdamW steps from gradients equal to ~1e-6: nearly every entry within
    1e-6, and the few whose gradient is ~0 (where Adam's m / sqrt(v) turns a rounding difference
    into a +-lr step; seen with AVX2 kernels) within 2 lr a step. A shard never stepped or never
    broadcast is off by ~lr in most of its entries and still fails."""
    d = (q.detach() - p.detach()).abs()
    assert float((d > 1e-6).float().mean()) <= 1e-3, f"{msg}: {int((d > 1e-6).sum())} of {d.numel()} entries differ"
    assert float(d.max()) <= 2 * LR * steps + 1e-6, f"{msg}: max difference {float(d.max()):.3g}"


@pytest.mark.parametrize("world,seqs", [(2, 6), (3, 6), (3, 2)])
def test_data_parallel_step_equals_one_process(base, world, seqs):
    """N ranks (gloo), each with its token-balanced share of the sequences and micro-batches (with
    3 ranks and 2 sequences one rank has no data), give the same summed gradients, the same global
    norm and the same weights as one process after 3 clipped AdamW steps. Guards against averaging
    instead of summing the gradients (1/N scale; Adam and clipping alone would hide it), a bucket
    reduced before backward finished writing it, a rank without data skipping the collectives (a
    hang), a shard not broadcast after its step, or a norm clipped per rank."""
    data = _data(3, seqs=seqs)
    ref, norms, grads = _reference(copy.deepcopy(base), data)
    out = _run_ranks(world, base, data)
    for r in range(world):
        torch.testing.assert_close(torch.tensor(out["norms"][r]), torch.tensor(norms), atol=1e-6, rtol=1e-5)
        for (name, p), q, g, h in zip(ref.named_parameters(), out[r]["model"].parameters(), grads, out[r]["grads"]):
            torch.testing.assert_close(h, g, atol=1e-6, rtol=1e-5, msg=f"rank {r} grad {name}")
            assert_adam_close(q, p, steps=3, msg=f"rank {r} {name}")


def test_optimizer_state_is_sharded_and_round_trips(base):
    """Each of 2 ranks holds about half of the fp32 moments; the unsharded state dict gathered on
    rank 0 loads into a one-process optimizer and into 2 fresh ranks, and the next step matches the
    uninterrupted run. Guards against every rank keeping the full state (no memory saved) and
    against a checkpoint that only resumes with the same number of ranks."""
    data = _data(3)
    out = _run_ranks(2, base, data[:2])
    total = sum(p.numel() for p in base.parameters()) * 2  # exp_avg + exp_avg_sq, fp32 params
    held = [out[r]["opt"].state_numel() for r in range(2)]
    assert sum(held) == total and all(0.3 * total <= h <= 0.7 * total for h in held)
    full = out["state"][0]
    assert out["state"][1] is None and len(full["state"]) == len(list(base.parameters()))

    ref_model, _, _ = _reference(copy.deepcopy(base), data)  # uninterrupted: 3 steps
    # Resume with N=1 from the N=2 checkpoint: plain CPUOffloadAdamW reads the same dict.
    one = copy.deepcopy(out[0]["model"])
    opt = CPUOffloadAdamW(param_groups(one, WD), lr=LR, weight_decay=WD)
    opt.load_state_dict(full)
    ids, lens, w = data[2]
    _partial_loss(one, ids, lens, w, list(range(len(ids))), float((lens - 1).sum())).backward()
    clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], MAX_NORM)
    opt.step()
    # Resume with N=2 from the same dict.
    again = _run_ranks(2, out[0]["model"], data[2:], state=full)
    for (name, p), q, r in zip(ref_model.named_parameters(), one.parameters(), again[1]["model"].parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=f"N=1 resume {name}")
        torch.testing.assert_close(r, p, atol=1e-6, rtol=0, msg=f"N=2 resume {name}")
