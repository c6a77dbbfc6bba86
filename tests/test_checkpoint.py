"""Checkpoint I/O: our save_pretrained is a directory `transformers` loads (and vice versa), and
every kind of broken directory fails with one clear message naming the file or tensor."""
import json

import pytest
import torch


from nanogrpo.config import ModelConfig  # noqa: E402
from nanogrpo.model import Qwen2  # noqa: E402

VOCAB = 97


def random_model(model_type="qwen2", tie=False, seed=0, **over) -> Qwen2:
    """A tiny model with every parameter random (biases and norms included)."""
    cfg = ModelConfig(model_type=model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tie, max_position_embeddings=256, **over)
    model = Qwen2.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * r if "norm" in name else 0.15 * r)
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))

SAVE_CASES = {
    "qwen2_untied": dict(model_type="qwen2"),
    "qwen2_tied": dict(model_type="qwen2", tie=True),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie=True),
    "llama_rope3": dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_loads_in_transformers_with_identical_logits(tmp_path, case):
    """Guards against config.json fields transformers reads differently (tie flag, head_dim, RoPE
    scaling, bias) and tensor names it does not recognise (it would re-init them silently)."""
    transformers = pytest.importorskip("transformers")
    ours = random_model(**SAVE_CASES[case])
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                 "llama": "LlamaForCausalLM"}[ours.config.model_type]
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours(IDS), atol=1e-4, rtol=1e-4)
        # ... and our own loader reads back the exact tensors.
        back = Qwen2.from_pretrained(tmp_path)
        for k, v in ours.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        torch.testing.assert_close(back(IDS), ours(IDS), atol=0, rtol=0)


def test_sharded_save_loads_in_ours_and_transformers(tmp_path):
    """Guards against an index whose weight_map misses tensors or names the wrong shard."""
    transformers = pytest.importorskip("transformers")
    ours = random_model(tie=False)
    ours.save_pretrained(tmp_path, max_shard_bytes=60_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict())
    with torch.no_grad():
        expect = ours(IDS)
        torch.testing.assert_close(Qwen2.from_pretrained(tmp_path)(IDS), expect, atol=0, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        torch.testing.assert_close(hf(IDS).logits, expect, atol=1e-4, rtol=1e-4)
    # Re-saving unsharded removes the stale shards, which would otherwise shadow nothing but waste
    # disk and confuse readers that glob for shards.
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("model-*-of-*"))


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    """Guards against a save that upcasts to fp32 or a load that defaults to fp32."""
    ours = random_model(tie=True).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = Qwen2.from_pretrained(tmp_path)
    assert back.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_dtype_cast_on_load(tmp_path):
    """Guards against dtype= being ignored (or only applied to some tensors) on load."""
    ours = random_model()
    ours.save_pretrained(tmp_path)
    back = Qwen2.from_pretrained(tmp_path, dtype="bf16")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(back.model.norm.weight, ours.model.norm.weight.to(torch.bfloat16))
    assert Qwen2.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------- broken directories
@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "ckpt"
    random_model().save_pretrained(d)
    return d


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        Qwen2.from_pretrained(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pickle"):
        Qwen2.from_pretrained(saved)


def test_missing_tensor_is_named(saved):
    _rewrite_safetensors(saved / "model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        Qwen2.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    def edit(s):
        s["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    _rewrite_safetensors(saved / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        Qwen2.from_pretrained(saved)


def test_unknown_model_type_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*'mistral'"):
        Qwen2.from_pretrained(saved)


def test_truncated_safetensors_names_the_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        Qwen2.from_pretrained(saved)


def test_missing_shard_is_named(tmp_path):
    random_model().save_pretrained(tmp_path, max_shard_bytes=60_000)
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Qwen2.from_pretrained(tmp_path)


def test_unsupported_dtype_string(saved):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        Qwen2.from_pretrained(saved, dtype="int8")


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window=true.*4096.*not implemented"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
])
def test_unsupported_config_is_refused_by_name(change, match):
    """Guards against loading a model whose architecture we would compute differently (sliding
    windows, other activations or RoPE variants) and training on silently wrong logits."""
    from nanogrpo.config import ModelConfig
    from nanogrpo.tiny import TINY_MODEL_CONFIG
    ModelConfig.from_dict(dict(TINY_MODEL_CONFIG, use_sliding_window=False))  # the shipped default loads
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**TINY_MODEL_CONFIG, **change})
