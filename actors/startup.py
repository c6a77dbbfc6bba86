"""What every actor that holds a model does first, in one place (rollout workers and the learner).

Threads before any tensor exists (torch sizes its pool once), the heap thresholds fixed (see
nanogrpo/heap.py), the model files fetched when this node cannot read the driver's directory, and
the device and compute dtype decided once for this process from the run's `--dtype`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from nanogrpo.checkpoint import local_model_dir
from nanogrpo.hardware import resolve_dtype
from nanogrpo.heap import keep_heap


@dataclass(frozen=True)
class ActorEnv:
    model_dir: str        # a directory this process can read
    device: torch.device
    dtype: torch.dtype    # compute dtype of the model's working weights


def start_actor(threads: int, model_dir: str, model_files: list | None, dtype: str,
                trains: bool = False) -> ActorEnv:
    """threads: torch CPU threads; model_files: [ObjectRef of the model directory's files] or
    [None] (shipped only when an actor may land off the driver's node); dtype: auto | fp32 | bf16.
    trains: the learner. Its `auto` on a CPU is fp32: bf16 working weights round a small step of
    a small model away (the fp32 masters move, the weights the next forward sees may not), so bf16
    training on a CPU is asked for with --dtype bf16, not picked."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that start their own OpenMP pool later
    keep_heap()  # no page-fault storms from the same tensors freed and reallocated every batch
    if not (Path(model_dir) / "config.json").is_file() and model_files and model_files[0] is not None:
        model_dir = local_model_dir(model_dir, ray.get(model_files[0]))  # node without the driver's files
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if trains and dtype == "auto" and device.type == "cpu":
        return ActorEnv(model_dir, device, torch.float32)
    return ActorEnv(model_dir, device, resolve_dtype(dtype, device))
