"""Shared pytest fixtures: the ../shared data directory and one thread per torch process; tests
marked `gpu` are skipped (not failed, not silently passed) where torch sees no CUDA device."""
from pathlib import Path

import pytest
import torch

# CI and developers have ../shared beside the checkout; a user's plain clone may not.
SHARED = Path(__file__).resolve().parents[2] / "shared"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (fixtures and data ship only beside the CI checkout)")
    return SHARED


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_dir) -> Path:
    d = shared_dir / "fixtures" / "qwen2.5-tokenizer"
    if not (d / "tokenizer.json").is_file():
        pytest.skip(f"{d}/tokenizer.json is absent")
    return d
