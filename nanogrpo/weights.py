"""Moving a policy's weights between processes (no Ray here; learner/broadcast.py uses it).

Two transports behind one packed format:
  * object store (default): the learner packs every tensor of one dtype into one flat buffer and
    `ray.put`s the packed version once; workers receive the ObjectRef and read the buffers
    zero-copy from shared memory (numpy arrays are not copied on deserialisation), then do a
    single copy into their parameters. One object per version, not one per tensor.
  * collective: a `torch.distributed` group (NCCL on GPUs, gloo on CPU) in which the learner is
    rank 0 and broadcasts the same flat buffers. Every collective has a timeout, so a worker that
    never answers makes the sync raise instead of hanging the run.
"""
from __future__ import annotations

import datetime
import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# numpy has no bfloat16: carry it as int16 bits.
_TORCH_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}


@dataclass
class PackedWeights:
    version: int
    layout: list[tuple[str, str, tuple, int]]  # (name, dtype name, shape, offset into its dtype buffer)
    buffers: dict[str, np.ndarray]            # dtype name -> flat array (bf16 carried as int16)


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # state_dict would list a tied lm_head twice; parameters() sees shared storage once.
    return [(n, p.detach()) for n, p in model.named_parameters()]


def pack(model: torch.nn.Module, version: int) -> PackedWeights:
    """Flatten all parameters into one contiguous CPU buffer per dtype."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _named_tensors(model):
        groups.setdefault(t.dtype, []).append((name, t))
    layout, buffers = [], {}
    for dtype, items in groups.items():
        key = str(dtype).removeprefix("torch.")
        total = sum(t.numel() for _, t in items)
        flat = torch.empty(total, dtype=dtype)  # one host buffer; GPU tensors copy straight into it
        off = 0
        for name, t in items:
            flat[off: off + t.numel()].copy_(t.reshape(-1))
            layout.append((name, key, tuple(t.shape), off))
            off += t.numel()
        buffers[key] = flat.view(_TORCH_VIEW[dtype]).numpy()
    return PackedWeights(version, layout, buffers)


def unpack_into(model: torch.nn.Module, packed: PackedWeights):
    """Copy a packed version into `model`'s parameters (same names; dtypes cast if they differ)."""
    params = dict(model.named_parameters())
    if set(params) != {name for name, *_ in packed.layout}:
        missing = sorted(set(params) - {n for n, *_ in packed.layout})
        raise ValueError(f"packed weights v{packed.version} do not match the model: missing {missing[:5]}")
    with warnings.catch_warnings():
        # Arrays read from the object store are read-only; we only ever read them.
        warnings.simplefilter("ignore", UserWarning)
        flats = {k: torch.from_numpy(v).view(getattr(torch, k)) for k, v in packed.buffers.items()}
    with torch.no_grad():
        for name, key, shape, off in packed.layout:
            p = params[name]
            n = int(np.prod(shape)) if shape else 1
            p.copy_(flats[key][off: off + n].view(shape), non_blocking=True)
    if any(p.is_cuda for p in params.values()):
        torch.cuda.synchronize()


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes in name order: equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(_named_tensors(model), key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CollectiveGroup:
    """A torch.distributed group for weight broadcast; rank 0 is the learner."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float, backend: str | None = None):
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        # Workers may also run their own torch.distributed code; a private group keeps us apart
        # only when the default group is ours, so refuse to clobber an existing one.
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process")
        dist.init_process_group(self.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))

    def broadcast(self, model: torch.nn.Module, version: int) -> int:
        """Rank 0 sends its parameters (and version); every other rank receives into its model."""
        dev = torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")
        v = torch.tensor([version], dtype=torch.long, device=dev)
        dist.broadcast(v, src=0)
        groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for _, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            groups.setdefault(p.dtype, []).append(p)
        with torch.no_grad():
            for dtype, params in groups.items():
                flat = torch.cat([p.detach().reshape(-1).to(dev) for p in params]) if self.rank == 0 else \
                    torch.empty(sum(p.numel() for p in params), dtype=dtype, device=dev)
                dist.broadcast(flat, src=0)
                if self.rank != 0:
                    off = 0
                    for p in params:
                        p.copy_(flat[off: off + p.numel()].view_as(p))
                        off += p.numel()
        return int(v.item())

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
