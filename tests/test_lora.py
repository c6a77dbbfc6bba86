"""LoRA (nanogrpo/lora.py): parity with PEFT in both directions, merged export, adapters-off reference,
merge round trip, adapter-only training and adapter-only weight sync.

Tiny random Qwen2 bases are built with transformers and saved with save_pretrained where a test
compares against transformers/PEFT, so nanogrpo reads them through the path a released checkpoint
takes. Adapters are randomised (B != 0) wherever logits are compared: with PEFT's init (B = 0) every
adapter bug would still give the base's logits.
"""
import json

import pytest
import torch

from nanogrpo import lora as L
from nanogrpo.config import ModelConfig
from nanogrpo.model import Qwen2
from nanogrpo.optim import CPUOffloadAdamW, param_groups

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0)
IDS = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))


def randomise_(model: torch.nn.Module, seed: int, only_lora: bool = False):
    """Every parameter (or every adapter) random: HF init zeroes biases and B, which hides bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only_lora and ".lora_" not in name:
                continue
            r = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * r if "norm" in name else 0.15 * r)
    return model


def hf_base(tmp_path, tied: bool, seed: int = 0):
    """A random transformers Qwen2 saved to tmp_path/base -> (hf model, its directory)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomise_(hf.float().eval(), seed)
    hf.save_pretrained(tmp_path / "base")
    return hf, tmp_path / "base"


def ours_base(seed: int = 0, tied: bool = False) -> Qwen2:
    cfg = ModelConfig(model_type="qwen2", tie_word_embeddings=tied, **SHAPE)
    return randomise_(Qwen2.from_config(cfg), seed).eval()


def with_lora(model: Qwen2, cfg=None, seed: int = 3) -> Qwen2:
    return randomise_(L.add_lora(model, cfg or L.LoraConfig(r=4, alpha=8.0)), seed, only_lora=True)


@pytest.mark.parametrize("tied,targets", [(False, ("q_proj", "v_proj", "down_proj")), (True, L.DEFAULT_TARGETS)])
def test_peft_loads_our_adapters_with_the_same_logits(tmp_path, tied, targets):
    """Guards against PEFT-incompatible key names (an adapter name in the keys, a missing
    `base_model.model.` prefix: PEFT then leaves its adapters at init with only a warning), a wrong scaling
    (alpha/r), A/B transposed, or a config field PEFT reads differently."""
    peft = pytest.importorskip("peft")
    hf, base_dir = hf_base(tmp_path, tied)
    ours = with_lora(Qwen2.from_pretrained(base_dir).eval(), L.LoraConfig(r=4, alpha=12.0, targets=targets))
    L.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 12 and sorted(written["target_modules"]) == sorted(targets)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref, got = pm(IDS).logits, ours(IDS)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), pm.disable_adapter():
        base = pm(IDS).logits
    assert (base - ref).abs().max() > 1e-2  # the adapters PEFT loaded do change its logits


def test_we_load_a_peft_written_adapter_dir(tmp_path):
    """Guards against reading PEFT's own files wrongly: its key layout, its target_modules (a set
    saved as a list), its lora_alpha; nanogrpo's logits with a PEFT-saved adapter must equal PEFT's."""
    peft = pytest.importorskip("peft")
    hf, base_dir = hf_base(tmp_path, tied=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = L.load_adapter(Qwen2.from_pretrained(base_dir).eval(), tmp_path / "peft")
    assert sorted(ours.lora_config.targets) == ["k_proj", "q_proj", "up_proj"] and ours.lora_config.scale == 4.0
    with torch.no_grad():
        ref, got = pm(IDS).logits, ours(IDS)
        with pm.disable_adapter():
            assert (pm(IDS).logits - ref).abs().max() > 1e-2  # init_lora_weights=False: B != 0
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_merged_export_loads_in_transformers(tmp_path, tied):
    """Guards against an export that keeps adapter keys (transformers drops them: base logits),
    forgets to merge, writes a tied lm_head twice, or omits the tokenizer files."""
    transformers = pytest.importorskip("transformers")
    _, base_dir = hf_base(tmp_path, tied)
    ours = with_lora(Qwen2.from_pretrained(base_dir).eval())
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = L.export_merged(ours, tmp_path / "merged", tokenizer_dir=tok)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
        assert ("lm_head.weight" in f.keys()) == (not tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        got, ref = ours(IDS), hf(IDS).logits
        with L.adapters_off(ours):
            assert (ours(IDS) - got).abs().max() > 1e-2  # the export carries the adapters
    torch.testing.assert_close(ref, got, atol=1e-4, rtol=1e-4)
    assert not L.is_merged(ours)  # exporting leaves the training model as it was


def test_adapters_off_is_the_base_exactly():
    """Guards against a KL reference that still sees the adapters, or one that differs from the
    separately loaded base by rounding (adapter path added as +0.0 in another dtype, dropout on the
    base path): logits inside adapters_off must equal a second, adapter-free copy bit for bit."""
    base = ours_base(seed=5)
    ref = ours_base(seed=5)
    model = with_lora(base, L.LoraConfig(r=4, alpha=8.0, dropout=0.3))
    model.train()  # dropout active: it must touch the adapter input only
    with torch.no_grad():
        with L.adapters_off(model):
            off = model(IDS)
        on = model(IDS)
        expect = ref(IDS)
    assert torch.equal(off, expect)
    assert (on - expect).abs().max() > 1e-2
    assert not any(m.disabled for _, m in L.lora_modules(model))  # switched back on after the block
    L.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with L.adapters_off(model):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    """Guards against merge/unmerge by add-then-subtract (loses bits, drifts over versions: in bf16
    a few round trips move weights by whole ulps), a merge that forgets the scaling, and a merged
    forward that adds the adapters a second time."""
    model = with_lora(ours_base(seed=6).to(dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(IDS).float()
        eff = L.effective_weights(model)
        for _ in range(3):
            L.merge(model)
            assert L.is_merged(model)
            for name, m in L.lora_modules(model):
                assert torch.equal(m.weight, eff[f"{name}.weight"])
            merged = model(IDS).float()
            L.unmerge(model)
    tol = 1e-4 if dtype == torch.float32 else 0.15  # bf16: one rounding of the merged weight
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=tol)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_only_adapters_train():
    """Guards against base weights that still require grad (the optimizer would then hold state
    for, and update, the whole model) and adapters left out of the optimizer: two AdamW steps
    must change A and B only (B from zero at step 1, A once B is non-zero) and keep state for them only."""
    model = L.add_lora(ours_base(seed=7), L.LoraConfig(r=4, alpha=8.0))
    lora_names = {n for n, _ in L.lora_parameters(model)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names
    assert len(lora_names) == 2 * 7 * SHAPE["num_hidden_layers"]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in lora_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CPUOffloadAdamW(param_groups(model, 0.0), lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
    assert len(opt.state) == len(lora_names)
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in lora_names), n


def test_packed_adapters_are_adapter_bytes():
    """Guards against a LoRA weight sync that ships the whole model (or the base beside the
    adapters), or loses part of an adapter: the packed buffer is exactly the adapter bytes and
    unpacks to the same tensors, whose digest (the sync-integrity check) matches the learner's."""
    model = with_lora(ours_base(seed=8))
    packed = L.pack_adapters(model, version=3)
    adapter_bytes = sum(p.numel() * p.element_size() for _, p in L.lora_parameters(model))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert packed.nbytes == adapter_bytes < model_bytes / 4
    assert packed.version == 3
    other = L.add_lora(ours_base(seed=8), L.LoraConfig(r=4, alpha=8.0), seed=11)
    L.apply_adapters(other, packed)
    for (n, p), (m, q) in zip(L.lora_parameters(model), L.lora_parameters(other)):
        assert n == m and torch.equal(p, q)
    assert L.adapter_digest(L.merge_for_rollouts(other)) == L.adapter_digest(model)
    with torch.no_grad():
        next(p for _, p in L.lora_parameters(other)).view(-1)[0] += 1e-3
    assert L.adapter_digest(other) != L.adapter_digest(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["unmerged", "merged", "in_place"])
def test_worker_weights_equal_learner_base_plus_adapters(dtype, mode):
    """Guards against a worker that keeps a stale adapter, adds each version on top of the last
    (a merged worker that does not take the previous update out), or applies another scale: after
    every version the worker's effective weights equal the learner's base + adapters, its greedy
    generations match, and unmerging gives back the base."""
    from nanogrpo.generate import generate

    learner = with_lora(ours_base(seed=9).to(dtype))
    worker = L.add_lora(ours_base(seed=9).to(dtype), L.LoraConfig(r=4, alpha=8.0), seed=99)
    base = {k: v.clone() for k, v in worker.state_dict().items() if ".lora_" not in k}
    if mode == "in_place" and dtype != torch.float32:
        with pytest.raises(ValueError, match="fp32"):
            L.merge(worker, keep_base=False)
        return
    if mode == "merged":
        L.merge(worker)
    elif mode == "in_place":
        L.merge(worker, keep_base=False)
    if dtype != torch.float32:  # a bf16 worker keeps its base aside: in place would drift
        other = L.merge_for_rollouts(L.add_lora(ours_base(seed=9).to(dtype), L.LoraConfig(r=4, alpha=8.0)))
        assert all(m.pristine is not None and not m.in_place for _, m in L.lora_modules(other))
    for version in range(1, 4):
        randomise_(learner, seed=100 + version, only_lora=True)  # stands in for a training step
        L.apply_adapters(worker, L.pack_adapters(learner, version))
        got, want = L.effective_weights(worker), L.effective_weights(learner)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    prompts = [[1, 2, 3], [4, 5]]
    same = [c.token_ids for c in generate(learner, prompts, max_new_tokens=8, temperature=0.0)]
    assert [c.token_ids for c in generate(worker, prompts, max_new_tokens=8, temperature=0.0)] == same
    L.unmerge(worker)
    for k, v in worker.state_dict().items():
        if k in base:  # bitwise, except in place: add/subtract rounding, see the drift test
            torch.testing.assert_close(v, base[k], atol=1e-6 if mode == "in_place" else 0, rtol=0, msg=k)


def test_in_place_merge_drift_stays_bounded():
    """Guards against in-place merged workers drifting from the learner as versions accumulate
    (each version subtracts the old update and adds the new one in fp32): after 100 versions the
    worker's weights must still be the learner's base + adapters to 1e-6 (measured: 3.6e-7 at 100,
    1.1e-6 at 1000 versions, weights up to 0.9)."""
    learner = with_lora(ours_base(seed=9))
    worker = L.merge_for_rollouts(L.add_lora(ours_base(seed=9), L.LoraConfig(r=4, alpha=8.0), seed=99))
    assert all(m.in_place and m.pristine is None for _, m in L.lora_modules(worker))  # fp32: base held once
    for version in range(1, 101):
        randomise_(learner, seed=100 + version, only_lora=True)
        L.apply_adapters(worker, L.pack_adapters(learner, version))
    got, want = L.effective_weights(worker), L.effective_weights(learner)
    assert max((got[k] - want[k]).abs().max() for k in want) > 0  # in place really rounds; else pointless
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_sync_refuses_mismatched_adapters():
    """Guards against loading a version into workers built with another --lora-rank or
    --lora-alpha: silently wrong weights instead of an error naming the difference."""
    learner = with_lora(ours_base(), L.LoraConfig(r=4, alpha=8.0))
    packed = L.pack_adapters(learner, 1)
    with pytest.raises(ValueError, match="rank or targets"):
        L.apply_adapters(L.add_lora(ours_base(), L.LoraConfig(r=2, alpha=4.0)), packed)
    with pytest.raises(ValueError, match="--lora-alpha"):
        L.apply_adapters(L.add_lora(ours_base(), L.LoraConfig(r=4, alpha=16.0)), packed)


def test_bad_adapter_dirs_name_the_file_and_field(tmp_path):
    """Guards against a bad adapter directory loading partly or failing deep inside torch: each
    defect (missing file, wrong rank, unsupported PEFT option, regex targets, tensors that do not fit
    the config, corrupt safetensors) gives one error naming the file and the field."""
    d = L.save_adapter(with_lora(ours_base()), tmp_path / "a")
    cfg_file = d / "adapter_config.json"
    good = json.loads(cfg_file.read_text())

    def load_with(**changes):
        cfg_file.write_text(json.dumps({**good, **changes}))
        return L.load_adapter(ours_base(), d)

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        L.load_adapter(ours_base(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"adapter_config.json: field r=8 .* have 4"):
        cfg_file.write_text(json.dumps({**good, "r": 8}))
        L.load_adapter(with_lora(ours_base()), d)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not fit .*mis-shaped"):
        load_with(r=8)  # a fresh model takes the config's rank; the tensors are rank 4
    with pytest.raises(ValueError, match=r"does not fit .*unexpected \['base_model.model.model.layers.0.mlp"):
        load_with(target_modules=["q_proj"])  # the file holds all seven projections' adapters
    with pytest.raises(ValueError, match=r"adapter_config.json: field target_modules=\['q_proj'\] .* have"):
        cfg_file.write_text(json.dumps({**good, "target_modules": ["q_proj"]}))
        L.load_adapter(with_lora(ours_base()), d)
    for field, value in (("use_dora", True), ("bias", "all"), ("use_rslora", True), ("peft_type", "IA3")):
        with pytest.raises(ValueError, match=f"adapter_config.json: field {field}"):
            load_with(**{field: value})
    with pytest.raises(ValueError, match="field target_modules"):
        load_with(target_modules=".*q_proj")
    with pytest.raises(ValueError, match="field lora_alpha"):
        load_with(lora_alpha=0)
    cfg_file.write_text(json.dumps(good))
    (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="cannot read .*adapter_model.safetensors"):
        L.load_adapter(ours_base(), d)


def test_config_errors_name_the_flags():
    """Guards against a bad --lora-* value surfacing as a shape error deep in the model."""
    cases = ((dict(r=0), "--lora-rank"), (dict(alpha=0.0), "--lora-alpha"), (dict(dropout=1.0), "--lora-dropout"),
             (dict(targets="q_proj,embed_tokens"), "--lora-targets"))
    for kwargs, flag in cases:
        with pytest.raises(ValueError, match=flag):
            L.LoraConfig(**kwargs)
    assert L.LoraConfig(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")


def test_shared_prompt_training_forward_sees_the_adapters():
    """Guards against the learner's packed shared-prompt forward (PromptKV, gradient
    checkpointing) bypassing the adapters or their gradient: its hidden states and adapter
    gradients must equal the plain forward of each prompt + completion row."""
    model = with_lora(ours_base(seed=12)).train()
    model.gradient_checkpointing = True
    g = torch.Generator().manual_seed(13)
    prompts, comps = torch.randint(0, 97, (2, 6), generator=g), torch.randint(0, 97, (4, 5), generator=g)
    plens, index, clens = torch.tensor([6, 4]), torch.tensor([0, 0, 1, 1]), torch.tensor([5, 3, 5, 2])
    h = model.completion_hidden(prompts, plens, comps, index, clens)  # (4, 5, C)
    loss = sum(h[r, : clens[r]].pow(2).sum() for r in range(4))
    grads = torch.autograd.grad(loss, [p for _, p in L.lora_parameters(model)])
    ref_loss = 0
    for r in range(4):
        row = torch.cat((prompts[index[r], : plens[index[r]]], comps[r, : clens[r] - 1]))[None]  # (1, Tp + Tc - 1)
        hr = model(row, return_hidden=True)[0, plens[index[r]] - 1:]  # (Tc, C)
        torch.testing.assert_close(hr, h[r, : clens[r]], atol=1e-5, rtol=1e-5)
        ref_loss = ref_loss + hr.pow(2).sum()
    ref = torch.autograd.grad(ref_loss, [p for _, p in L.lora_parameters(model)])
    assert any(x.abs().sum() > 0 for x in grads)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
