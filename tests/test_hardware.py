"""--dtype resolution: bf16 only where this machine multiplies it natively."""
import pytest
import torch

from nanogrpo import hardware


@pytest.fixture(autouse=True)
def fresh_cache():
    hardware.cpu_bf16_is_fast.cache_clear()
    yield
    hardware.cpu_bf16_is_fast.cache_clear()


def test_auto_picks_fp32_on_a_cpu_without_fast_bf16(monkeypatch):
    """Guards against `--dtype auto` choosing bf16 on an AVX2-only CPU (AMD EPYC, most laptops),
    where PyTorch emulates bf16 and every matmul runs several times slower than in fp32."""
    avx2 = "fpu sse sse2 avx avx2 fma f16c bmi2".split()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(avx2))
    assert hardware.resolve_dtype("auto", "cpu") == torch.float32
    hardware.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(avx2) | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    assert hardware.resolve_dtype("auto", "cpu") == torch.bfloat16
    hardware.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)  # AMX present, oneDNN capped below it
    assert hardware.resolve_dtype("auto", "cpu") == torch.float32


def test_auto_measures_where_the_flags_cannot_be_read(monkeypatch):
    """Guards against a machine without /proc/cpuinfo (macOS, some containers) getting bf16 by
    default: the choice must then follow a measured bf16-vs-fp32 matmul rate."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    rates = {torch.float32: 100.0, torch.bfloat16: 25.0}  # emulated bf16: 4x slower
    monkeypatch.setattr(hardware, "_matmul_rate", lambda dtype, *a, **k: rates[dtype])
    assert hardware.resolve_dtype("auto", "cpu") == torch.float32
    hardware.cpu_bf16_is_fast.cache_clear()
    rates[torch.bfloat16] = 400.0
    assert hardware.resolve_dtype("auto", "cpu") == torch.bfloat16


def test_explicit_dtypes_and_a_bad_name():
    """Guards against an explicit --dtype being overridden by the machine check, and against a
    typo passing silently instead of naming the flag."""
    assert hardware.resolve_dtype("fp32", "cpu") == torch.float32
    assert hardware.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        hardware.resolve_dtype("float16", "cpu")


def test_oneDNN_capped_at_avx2_still_runs_both_dtypes():
    """Guards against a kernel that only AVX-512 / AMX machines have (oneDNN's bf16 weight reorder
    raises on AVX2) breaking an AVX2-only CPU: with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA, in a
    fresh process), `auto` picks fp32, and a bf16 model forced by --dtype bf16 still decodes and
    matches its grad-enabled forward."""
    import os
    import subprocess
    import sys
    code = """
import torch
from nanogrpo import hardware
from nanogrpo.generate import generate
from nanogrpo.model import Qwen2
assert not hardware.onednn_bf16()
assert hardware.resolve_dtype("auto", "cpu") == torch.float32
cfg = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
for dtype in (torch.float32, torch.bfloat16):
    m = Qwen2.from_config(cfg, seed=0, dtype=dtype).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        inf = m(ids)
    torch.testing.assert_close(inf, m(ids).detach(), atol=0, rtol=0)
    assert len(generate(m, [[3, 5, 7]], n=2, max_new_tokens=4)) == 2
print("ok")
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
