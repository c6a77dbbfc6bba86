"""Generation: the KV-cached, compacting, group-prefilled sampler against plain full forwards and
against `transformers.generate`, plus the log-probs it reports for the learner."""
import pytest
import torch

from nanogrpo.config import ModelConfig
from nanogrpo.generate import generate
from nanogrpo.model import Qwen2

VOCAB = 61
PROMPT_LENS = [7, 3, 12, 1, 9]


def random_model(seed=0) -> Qwen2:
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rope_theta=10000.0)
    model = Qwen2.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * r if "norm" in name else 0.3 * r)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def greedy_reference(model, prompt, max_new, stops):
    """No cache, no batching: a full forward over the whole sequence for every new token."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stops:
            break
    return out


def pick_stop_token(model, prompts, max_new):
    """A token that some rows emit early and at least one row never emits, so both finish reasons
    and several different stop steps occur."""
    free = [greedy_reference(model, p, max_new, ()) for p in prompts]
    for tok in sorted({t for row in free for t in row[: max_new // 2]}):
        firsts = [row.index(tok) for row in free if tok in row]
        if 2 <= len(firsts) < len(free) and len(set(firsts)) >= 2:
            return tok
    pytest.fail("no suitable stop token for this random model; change the seed")


@torch.no_grad()
def full_logits(model, prompt, completion):
    """(len(completion), V) logits that predicted each completion token, from one full forward."""
    ids = torch.tensor([prompt + completion])
    return model(ids)[0, len(prompt) - 1: len(prompt) - 1 + len(completion)].float()


def test_greedy_cache_equals_no_cache_equals_transformers(model, prompts, tmp_path):
    """Guards against KV-cache position/length bugs in ragged batches, a stop token dropped from
    the output or decoded past, and wrong finish_reason; transformers is the outside reference."""
    transformers = pytest.importorskip("transformers")
    max_new = 16
    stop = pick_stop_token(model, prompts, max_new)
    ours = generate(model, prompts, n=1, max_new_tokens=max_new, temperature=0.0, stop_token_ids=[stop])
    refs = [greedy_reference(model, p, max_new, {stop}) for p in prompts]
    assert [c.token_ids for c in ours] == refs
    reasons = {c.finish_reason for c in ours}
    assert reasons == {"stop", "length"}
    for c in ours:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == stop and stop not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == max_new and stop not in c.token_ids
        assert len(c.logprobs) == len(c.token_ids)

    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    T = max(PROMPT_LENS)
    pad = (stop + 1) % VOCAB
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                          eos_token_id=stop, pad_token_id=pad, use_cache=True)[:, T:]
    for c, row in zip(ours, out.tolist()):
        expect = row[: row.index(stop) + 1] if stop in row else row
        assert c.token_ids == expect


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.0, 5), (0.7, 5)])
def test_sampled_logprobs_match_full_forward(model, prompts, temperature, top_k):
    """Guards against log-probs taken before temperature / top-k (or not renormalised over the
    kept set), and against cache drift: the learner's importance ratio depends on these numbers."""
    outs = generate(model, prompts, n=3, max_new_tokens=10, temperature=temperature, top_k=top_k, seed=3)
    assert len(outs) == 3 * len(prompts)
    for c in outs:
        prompt = prompts[c.prompt_index]
        logits = full_logits(model, prompt, c.token_ids) / temperature  # (L, V)
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            assert (logits.gather(-1, torch.tensor(c.token_ids)[:, None]) >= kth).all()  # sampled in the kept set
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_groups_share_one_prefill_and_seed_is_deterministic(model, prompts):
    """Guards against prefilling every sample separately (n x the prompt compute), decode steps
    feeding more than one token, and sampling that ignores (or only partly uses) the seed."""
    shapes = []
    hook = model.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    try:
        a = generate(model, prompts, n=4, max_new_tokens=8, temperature=1.0, seed=5)
    finally:
        hook.remove()
    assert shapes[0] == (len(prompts), max(PROMPT_LENS))  # one prefill row per prompt, not per sample
    assert all(s[1] == 1 and s[0] <= 4 * len(prompts) for s in shapes[1:])
    assert [(c.prompt_index, c.sample_index) for c in a] == [(p, s) for p in range(len(prompts)) for s in range(4)]
    b = generate(model, prompts, n=4, max_new_tokens=8, temperature=1.0, seed=5)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    c = generate(model, prompts, n=4, max_new_tokens=8, temperature=1.0, seed=6)
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Samples of one group really are different draws from the same prompt.
    assert len({tuple(x.token_ids) for x in a[:4]}) > 1


def test_compaction_gives_the_same_greedy_result(model, prompts):
    """Guards against compaction mixing up rows (outputs written to the wrong completion, cache
    rows gathered wrongly): dropping finished rows must not change any row's tokens."""
    max_new = 16
    stop = pick_stop_token(model, prompts, max_new)
    sizes = []
    hook = model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        compacted = generate(model, prompts, n=14, max_new_tokens=max_new, temperature=0.0,
                             stop_token_ids=[stop], compact_fraction=0.01)
    finally:
        hook.remove()
    decode_sizes = sizes[1:]
    # Compacted at several steps; batches of 64+ rows shrink in multiples of 8, smaller ones exactly.
    assert decode_sizes[0] == 14 * len(prompts) and len(set(decode_sizes)) >= 3, decode_sizes
    shrinks = [(a, b) for a, b in zip(decode_sizes, decode_sizes[1:]) if b < a]
    assert any(a >= 64 for a, _ in shrinks) and any(a < 64 for a, _ in shrinks), decode_sizes
    assert all(b % 8 == 0 for a, b in shrinks if a >= 64), decode_sizes
    never = generate(model, prompts, n=14, max_new_tokens=max_new, temperature=0.0,
                     stop_token_ids=[stop], compact_fraction=1.1)
    assert [c.token_ids for c in compacted] == [c.token_ids for c in never]
    assert [c.finish_reason for c in compacted] == [c.finish_reason for c in never]
    for x, y in zip(compacted, never):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    # Chunking the prompts (max_batch_rows) must not change results either.
    chunked = generate(model, prompts, n=14, max_new_tokens=max_new, temperature=0.0,
                       stop_token_ids=[stop], max_batch_rows=28)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in never]
    assert [c.prompt_index for c in chunked] == [c.prompt_index for c in never]


def test_logit_bias_and_bad_arguments(model, prompts):
    """Guards against logit_bias not reaching the sampler and against silent acceptance of
    nonsense settings."""
    outs = generate(model, prompts, n=2, max_new_tokens=6, temperature=1.0, logit_bias={5: 100.0},
                    stop_token_ids=[5])
    assert all(c.token_ids == [5] and c.finish_reason == "stop" for c in outs)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, top_p=0.0)


def test_draw_matches_softmax_frequencies():
    """Guards against a biased sampler (off-by-one in the two-level inverse CDF, a block boundary,
    the padded tail) and against ever drawing a token whose probability is zero."""
    from nanogrpo.generate import BLOCK, draw

    V = 2 * BLOCK + 37  # three blocks, the last one padded
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 2
    logits[[0, BLOCK - 1, BLOCK, V - 1]] = float("-inf")  # zero-probability tokens at block edges
    logits[BLOCK + 1] = 4.0  # one heavy token right after a boundary
    probs = logits.softmax(-1)
    counts = torch.zeros(V)
    rows, reps = 4000, 25
    for _ in range(reps):
        tok, logp = draw(logits.expand(rows, V).clone(), g)
        counts += torch.bincount(tok, minlength=V)
        torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[tok], atol=1e-5, rtol=0)
    n = rows * reps
    assert counts[logits == float("-inf")].sum() == 0
    sigma = (probs * (1 - probs) / n).sqrt()
    z = (counts / n - probs).abs() / sigma.clamp(min=1e-12)
    assert z.max() < 5.5, f"frequency off by {z.max():.1f} sigma at token {int(z.argmax())}"
