"""Continuous refill: a generate() call with more rows than max_batch_rows admits waiting prompts
into the rows that finished ones leave. Compared against the plain engine (every row in one batch)
and against a full forward for the log-probs."""
import torch

from nanogrpo.generate import generate
from test_generate import full_logits, pick_stop_token, random_model

VOCAB = 61


def long_tailed_prompts(k=9, seed=12):
    g = torch.Generator().manual_seed(seed)
    lens = [1 + int(x) for x in torch.randint(0, 14, (k,), generator=g)]
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


def decode_batch_sizes(model, fn):
    """(rows, tokens, is a prefill) of every cached forward made while fn() runs."""
    sizes = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: sizes.append((*args[0].shape, "logits_at" in kwargs)) if "cache" in kwargs else None,
        with_kwargs=True)
    try:
        out = fn()
    finally:
        hook.remove()
    return out, sizes


def test_refill_greedy_equals_one_batch():
    """Guards against refill writing an admitted prompt's tokens to the wrong completion, copying
    its prefill into the wrong cache rows, or leaving a finished row's stale keys visible to the
    row that takes its place: greedy completions must equal those of one batch holding every row."""
    model = random_model()
    prompts = long_tailed_prompts()
    stop = pick_stop_token(model, prompts, 16)
    n = 3
    plain = generate(model, prompts, n=n, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop],
                     max_batch_rows=len(prompts) * n)
    refilled, shapes = decode_batch_sizes(model, lambda: generate(
        model, prompts, n=n, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop], max_batch_rows=2 * n))
    assert [(c.prompt_index, c.sample_index) for c in refilled] == [(c.prompt_index, c.sample_index) for c in plain]
    assert [c.token_ids for c in refilled] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in refilled] == [c.finish_reason for c in plain]
    assert {c.finish_reason for c in plain} == {"stop", "length"}
    for x, y in zip(refilled, plain):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    prefills = [s for s in shapes if s[2]]
    decodes = [s[0] for s in shapes if not s[2]]
    # Each prompt prefilled once, one row per prompt, and the batch never above its limit.
    assert sum(s[0] for s in prefills) == len(prompts) and max(decodes) <= 2 * n


def test_refill_keeps_the_batch_full_and_beats_chunks_on_steps():
    """Guards against refill degenerating into chunking (waiting for a whole chunk to finish
    before admitting more): with long-tailed lengths it must need fewer decode steps than chunks."""
    model = random_model()
    prompts = long_tailed_prompts()
    stop = pick_stop_token(model, prompts, 16)
    kw = dict(n=3, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop], max_batch_rows=6)
    refilled, s_refill = decode_batch_sizes(model, lambda: generate(model, prompts, refill=True, **kw))
    chunked, s_chunk = decode_batch_sizes(model, lambda: generate(model, prompts, refill=False, **kw))
    assert [c.token_ids for c in refilled] == [c.token_ids for c in chunked]
    steps = lambda shapes: sum(1 for s in shapes if not s[2])  # noqa: E731
    assert steps(s_refill) < steps(s_chunk), (steps(s_refill), steps(s_chunk))


def test_refill_sampled_logprobs_are_exact_and_deterministic():
    """Guards against refill breaking the behaviour-policy log-probs (an admitted row sampled from
    another row's logits, or from a cache that still holds a finished row's keys) and against
    non-determinism for a fixed seed and admission order."""
    model = random_model()
    prompts = long_tailed_prompts()
    stop = pick_stop_token(model, prompts, 12)
    kw = dict(n=4, max_new_tokens=12, temperature=0.8, top_k=7, stop_token_ids=[stop], max_batch_rows=8, seed=4)
    outs = generate(model, prompts, **kw)
    again = generate(model, prompts, **kw)
    assert [c.token_ids for c in outs] == [c.token_ids for c in again]
    assert [c.logprobs for c in outs] == [c.logprobs for c in again]
    assert any(c.finish_reason == "stop" for c in outs)
    for c in outs:
        logits = full_logits(model, prompts[c.prompt_index], c.token_ids) / 0.8  # (L, V)
        kth = logits.topk(7, dim=-1).values[:, -1:]
        ref = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
        ref = ref.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == stop)
        assert c.finish_reason == "stop" or len(c.token_ids) == 12
