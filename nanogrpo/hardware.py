"""What this machine computes fast, decided once per process.

bf16 halves memory traffic, but on a CPU it only pays where the hardware multiplies bf16 natively
(Intel AMX; Sapphire Rapids and later). On AVX2-only CPUs (many AMD EPYC / laptop parts) PyTorch
emulates bf16 and a matmul runs several times slower than in fp32, so `auto` must not pick it there.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp32", "bf16")


def cpu_flags() -> set[str] | None:
    """The CPU feature flags Linux reports, or None where /proc/cpuinfo is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def _matmul_rate(dtype: torch.dtype, n: int = 384, reps: int = 8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first call picks kernels
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps / max(time.perf_counter() - t0, 1e-9)


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels here (AVX-512 / AMX / AVX-NE-CONVERT, and not capped by
    ONEDNN_MAX_CPU_ISA); on an AVX2-only CPU its bf16 calls raise instead."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU: read from the AMX flag on Linux (and oneDNN
    must be allowed to use it: ONEDNN_MAX_CPU_ISA=AVX2 turns its bf16 kernels off), else measured."""
    flags = cpu_flags()
    if flags is not None:
        return "amx_bf16" in flags and onednn_bf16()
    return _matmul_rate(torch.bfloat16) > 1.2 * _matmul_rate(torch.float32)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' | 'fp32' | 'bf16' -> the compute dtype for a model on `device`.

    auto: bf16 on a CUDA device that supports it, and on a CPU with native bf16 (AMX); else fp32."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype: expected one of {DTYPE_CHOICES}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
