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
    assert hardware.resolve_dtype("auto", "cpu") == torch.bfloat16


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
