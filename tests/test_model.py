"""Model parity: our Qwen2/Qwen3/Llama forward against `transformers`, fp32, on random tiny configs.

Every parameter is re-randomised after construction: HF init zeroes biases and sets RMSNorm
weights to 1, which would hide a missing bias, a bias on the wrong projection, or a norm applied in
the wrong place.
"""
import pytest
import torch
import torch.nn.functional as F


import nanogrpo.model as M  # noqa: E402
from nanogrpo.model import Qwen2  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, hidden_act="silu")

# name -> (HF config class name, overrides). GQA everywhere (2 kv heads for 4 query heads).
CASES = {
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_rope_linear": ("Qwen2Config", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0})),
    # head_dim 32 != 64 / 4: catches code that derives head_dim from hidden_size.
    "qwen3_head_dim": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3 with attention_bias puts a bias on o_proj as well (unlike Qwen2).
    "qwen3_bias_tied": ("Qwen3Config", dict(head_dim=24, attention_bias=True, tie_word_embeddings=True)),
    "llama_rope3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1)),
}


def randomise_(model: torch.nn.Module, seed: int):
    """Every parameter random: norms around 1, biases non-zero, matrices small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.3 * r)
            else:
                p.copy_(0.15 * r)
    return model


def make_hf(case: str, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cls_name, over = CASES[case]
    cfg = getattr(transformers, cls_name)(**{**BASE, **over})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return randomise_(hf.float().eval(), seed)


def hf_checkpoint(tmp_path, case: str, seed: int = 0):
    hf = make_hf(case, seed)
    hf.save_pretrained(tmp_path / case)
    return hf, Qwen2.from_pretrained(tmp_path / case).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    """Guards against wrong GQA head mapping, a missing/extra bias (o_proj on Qwen3 vs Qwen2),
    norm weights applied wrongly, head_dim derived from hidden_size, RoPE scaling maths, and tied
    embeddings not shared after loading."""
    hf, ours = hf_checkpoint(tmp_path, case)
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, BASE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert ref.abs().max() > 1.0  # logits not trivially small, so atol is meaningful
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(M._onednn_linear is None, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("case", ["qwen3_bias_tied", "llama_bias"])
def test_onednn_inference_linears_match_transformers(tmp_path, monkeypatch, case):
    """fp32 CPU inference on large weights runs on oneDNN, not F.linear. The threshold is lowered so
    these tiny models take that path: logits (biases on every projection) must still match HF, a
    1-row call and anything under autograd must keep F.linear, and gradients must still flow."""
    calls = []
    real = M._onednn_linear
    monkeypatch.setattr(M, "ONEDNN_MIN_WEIGHT", 0)
    monkeypatch.setattr(M, "_onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    hf, ours = hf_checkpoint(tmp_path, case)
    ids = torch.randint(0, BASE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
        assert len(calls) == 7 * BASE["num_hidden_layers"] + 1  # q k v o gate up down per layer, lm_head
        calls.clear()
        one = ours(ids[:1, :1])
    assert not calls  # 1 row: MKL's path
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one[0, 0], ref[0, 0], atol=1e-4, rtol=1e-4)
    ours(ids).logsumexp(-1).mean().backward()
    assert not calls
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize("case", ["qwen2_untied", "qwen3_head_dim", "llama_rope3"])
def test_left_padded_batch_matches_unpadded_rows(tmp_path, case):
    """Guards against positions counting padding (RoPE shifted by the pad length) and pad keys
    leaking into attention: each row of a left-padded batch must equal that row run alone in HF."""
    hf, ours = hf_checkpoint(tmp_path, case)
    g = torch.Generator().manual_seed(2)
    lens = [17, 5, 11, 1]
    T = max(lens)
    ids = torch.full((len(lens), T), 3, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    rows = []
    for i, n in enumerate(lens):
        row = torch.randint(0, BASE["vocab_size"], (n,), generator=g)
        ids[i, T - n:], mask[i, T - n:] = row, 1
        rows.append(row)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        assert torch.isfinite(got).all()  # padding queries must not produce NaN (empty softmax)
        for i, row in enumerate(rows):
            ref = hf(row[None]).logits[0]
            torch.testing.assert_close(got[i, T - len(row):], ref, atol=1e-4, rtol=1e-4)
        # Right padding through the same mask path.
        ids_r = torch.stack([F.pad(r, (0, T - len(r)), value=3) for r in rows])
        mask_r = torch.stack([F.pad(torch.ones(len(r), dtype=torch.long), (0, T - len(r))) for r in rows])
        got_r = ours(ids_r, attention_mask=mask_r)
        for i, row in enumerate(rows):
            torch.testing.assert_close(got_r[i, :len(row)], got[i, T - len(row):], atol=1e-4, rtol=1e-4)


def test_cached_prefill_and_decode_match_full_forward(tmp_path):
    """Guards against KV-cache write positions / per-row lengths: ragged prefill then one-token
    decode steps through the cache must give the logits of a plain full forward."""
    from nanogrpo.cache import KVCache

    _, ours = hf_checkpoint(tmp_path, "qwen2_untied")
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([9, 4, 13])
    seqs = [torch.randint(0, BASE["vocab_size"], (int(n) + 5,), generator=g) for n in lens]
    ids = torch.zeros(3, int(lens.max()), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = seqs[i][:n]
    cache = KVCache(ours.config, 3, 32)
    with torch.no_grad():
        last = ours(ids, cache=cache, input_lengths=lens, logits_at=lens - 1)  # (3, V)
        steps = [last]
        for t in range(5):
            nxt = torch.stack([s[int(n) + t] for s, n in zip(seqs, lens)])
            steps.append(ours(nxt[:, None], cache=cache)[:, -1])
        for i, n in enumerate(lens):
            full = ours(seqs[i][None])[0]  # (T, V)
            for t in range(6):
                torch.testing.assert_close(steps[t][i], full[int(n) - 1 + t], atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == (lens + 5).tolist()


def test_gradient_checkpointing_same_loss_and_grads():
    """Guards against checkpointing dropping the mask/rope inputs or changing the maths: loss and
    every gradient must equal the plain backward."""
    from nanogrpo.config import ModelConfig

    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    model = randomise_(Qwen2.from_config(cfg, seed=0), seed=4).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row

    def loss_and_grads(ckpt: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = ckpt
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1), reduction="none")
        loss = (loss * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    l0, g0 = loss_and_grads(False)
    l1, g1 = loss_and_grads(True)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert set(g0) == set(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(v.abs().sum() > 0 for k, v in g0.items() if k.endswith("q_proj.bias"))


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_prompt_forward_matches_each_row_alone(ckpt, packed):
    """Guards against the learner's shared-prompt forward (each prompt run once for its G
    completions) attending to another row's prompt, to prompt padding, or to later completion
    tokens, placing RoPE positions wrongly, or losing the gradient through the shared keys: hidden
    states and every gradient must equal running each prompt + completion row on its own. Packed:
    given the real lengths, projections and MLPs skip padding (a wrong token placement fails)."""
    import random

    from nanogrpo.config import ModelConfig

    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(n)] for n in (1, 7, 4)]
    comps = [[rng.randrange(97) for _ in range(rng.randint(1, 6))] for _ in range(12)]
    index = [r // 4 for r in range(12)]  # 4 completions per prompt
    P = torch.zeros(3, 7, dtype=torch.long)
    for j, p in enumerate(prompts):
        P[j, :len(p)] = torch.tensor(p)
    C = torch.zeros(12, 6, dtype=torch.long)
    for r, c in enumerate(comps):
        C[r, :len(c)] = torch.tensor(c)
    shared = randomise_(Qwen2.from_config(cfg, seed=0), seed=4).train()
    alone = randomise_(Qwen2.from_config(cfg, seed=0), seed=4).train()
    shared.gradient_checkpointing = ckpt
    lens = torch.tensor([len(c) for c in comps]) if packed else None
    h = shared.completion_hidden(P, torch.tensor([len(p) for p in prompts]), C, torch.tensor(index), lens)
    assert h.shape == (12, 6, 64)
    if packed:  # padding positions hold zeros
        assert all(float(h[r, len(c):].detach().abs().sum()) == 0.0 for r, c in enumerate(comps))
    loss_shared, loss_alone = 0.0, 0.0
    for r, c in enumerate(comps):
        p = prompts[index[r]]
        ref = alone(torch.tensor([p + c]), return_hidden=True)[0, len(p) - 1: len(p) - 1 + len(c)]
        torch.testing.assert_close(h[r, :len(c)], ref, atol=1e-5, rtol=1e-5)
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(r))
        loss_shared = loss_shared + (h[r, :len(c)] * w).sum()
        loss_alone = loss_alone + (ref * w).sum()
    loss_shared.backward()
    loss_alone.backward()
    for (name, a), (_, b) in zip(shared.named_parameters(), alone.named_parameters()):
        if b.grad is None:  # the untied lm_head: hidden states do not reach it
            assert a.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * float(b.grad.abs().max()), rtol=1e-4, msg=name)


def test_training_after_generation_on_the_same_model():
    """Guards against tensors cached during generate (under inference_mode: RoPE tables) being
    inference tensors, which a later training forward cannot save for backward."""
    from nanogrpo.config import ModelConfig
    from nanogrpo.generate import generate

    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2.from_config(cfg, seed=0)
    generate(model.eval(), [[1, 2, 3]], n=2, max_new_tokens=4)
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    model(ids).logsumexp(-1).mean().backward()
    model(ids, attention_mask=torch.ones_like(ids)).logsumexp(-1).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_bf16_cached_decode_matches_full_forward(tmp_path):
    """Guards against the bf16 decode attention (grouped-query SDPA, a different path from fp32's
    matmuls and from the full forward's) mis-grouping query heads onto kv heads or dropping the
    mask: bf16 decode logits through the cache must match a bf16 full forward to bf16 precision."""
    from nanogrpo.cache import KVCache

    _, ours = hf_checkpoint(tmp_path, "qwen2_untied")
    ours = ours.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([6, 11])
    seqs = [torch.randint(0, BASE["vocab_size"], (int(n) + 4,), generator=g) for n in lens]
    ids = torch.zeros(2, int(lens.max()), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = seqs[i][:n]
    cache = KVCache(ours.config, 2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ours(ids, cache=cache, input_lengths=lens, logits_at=lens - 1)
        for t in range(4):
            nxt = torch.stack([s[int(n) + t] for s, n in zip(seqs, lens)])
            got = ours(nxt[:, None], cache=cache)[:, -1].float()  # (2, V)
            for i, n in enumerate(lens):
                full = ours(seqs[i][None, : int(n) + t + 1])[0, -1].float()
                torch.testing.assert_close(got[i], full, atol=3e-2, rtol=3e-2)


def test_bf16_inference_linear_follows_weight_updates():
    """Guards against the bf16 inference path's reordered weight copy going stale: after an in-place
    update (a weight sync's copy_), a load_state_dict or a swapped-in parameter, a no-grad forward
    must give F.linear's output on the current weight, and a grad-enabled one must too."""
    import torch.nn.functional as F

    from nanogrpo.model import Linear

    g = torch.Generator().manual_seed(0)
    lin = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)

    check()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g))
    check()
    lin.load_state_dict({"weight": torch.randn(96, 64, generator=g), "bias": torch.randn(96, generator=g)})
    check()
    lin.weight = torch.nn.Parameter(torch.randn(96, 64, generator=g).to(torch.bfloat16))
    check()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))  # training path
