"""Moving a policy's weights between processes (no Ray here; learner/broadcast.py uses it).

Two transports behind one packed format:
  * object store (default): the learner keeps its parameters as views into one flat buffer per
    dtype (`flatten_parameters`), so packing a version costs nothing on a CPU learner and one
    device-to-host copy on a GPU; `ray.put` then makes the only copy, into shared memory. Workers
    receive the ObjectRef and read the buffers zero-copy (numpy arrays are not copied on
    deserialisation). A CPU worker whose dtypes match points its parameters straight at those
    read-only shared buffers (`unpack_into(..., share=True)`): loading a version is free and all
    workers on a node share one copy of the weights. Other workers (GPU, other dtype) do one copy.
    One object per version, not one per tensor.
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
_TORCH_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32,
               torch.float64: torch.float64}


@dataclass
class PackedWeights:
    version: int
    layout: list[tuple[str, str, tuple, int]]  # (name, dtype name, shape, offset into its dtype buffer)
    buffers: dict[str, np.ndarray]            # dtype name -> flat array (bf16 carried as int16)


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # state_dict would list a tied lm_head twice; parameters() sees shared storage once.
    return [(n, p.detach()) for n, p in model.named_parameters()]


def _by_dtype(model: torch.nn.Module) -> dict[torch.dtype, list[tuple[str, torch.Tensor]]]:
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _named_tensors(model):
        groups.setdefault(t.dtype, []).append((name, t))
    return groups


def _spans(items):
    """(name, tensor, offset, numel) of each tensor laid end to end in one flat buffer."""
    off = 0
    for name, t in items:
        yield name, t, off, t.numel()
        off += t.numel()


def _fill(flat: torch.Tensor, items) -> torch.Tensor:
    """Copy `items` end to end into `flat` (which may live on another device)."""
    for _, t, off, n in _spans(items):
        flat[off: off + n].copy_(t.reshape(-1))
    return flat


def flatten_parameters(model: torch.nn.Module) -> dict[torch.dtype, torch.Tensor]:
    """Move every parameter into one contiguous buffer per dtype (on its device) and make the
    parameter a view of it, in `named_parameters` order: the layout `pack` writes. Call it after
    the model has its final device and dtype and before an optimizer captures the parameters;
    in-place updates then land in the flat buffers, which `pack` can ship without a copy."""
    params = dict(model.named_parameters())
    flats = {}
    with torch.no_grad():
        for dtype, items in _by_dtype(model).items():
            devices = {t.device for _, t in items}
            if len(devices) != 1:
                raise ValueError(f"flatten_parameters: {dtype} parameters live on several devices {devices}")
            flat = _fill(torch.empty(sum(t.numel() for _, t in items), dtype=dtype, device=devices.pop()), items)
            for name, t, off, n in _spans(items):
                params[name].data = flat[off: off + n].view(t.shape)
            flats[dtype] = flat
    model._flat_params = flats
    return flats


def _flat_of(model: torch.nn.Module, dtype: torch.dtype, items) -> torch.Tensor | None:
    """The model's flat buffer for `dtype` if every parameter still sits where `flatten_parameters`
    put it (a later `.to()` or `.data =` would have moved them), else None."""
    flat = getattr(model, "_flat_params", {}).get(dtype)
    if flat is None or sum(t.numel() for _, t in items) != flat.numel():
        return None
    base, size = flat.data_ptr(), flat.element_size()
    for _, t, off, _ in _spans(items):
        if t.device != flat.device or t.data_ptr() != base + off * size or not t.is_contiguous():
            return None
    return flat


def pack(model: torch.nn.Module, version: int, copy: bool = True) -> PackedWeights:
    """All parameters as one contiguous CPU buffer per dtype. With copy=False a flattened CPU
    model's own buffers are returned (aliasing the live weights): only for a consumer that copies
    at once, such as `ray.put`."""
    layout, buffers = [], {}
    for dtype, items in _by_dtype(model).items():
        key = str(dtype).removeprefix("torch.")
        src = _flat_of(model, dtype, items)
        if not copy and src is not None and src.device.type == "cpu":
            flat = src
        else:
            flat = torch.empty(sum(t.numel() for _, t in items), dtype=dtype)  # GPU tensors copy straight in
            if src is not None:
                flat.copy_(src)  # one (device-to-host) copy of the whole buffer
            else:
                _fill(flat, items)
        layout += [(name, key, tuple(t.shape), off) for name, t, off, _ in _spans(items)]
        buffers[key] = flat.view(_TORCH_VIEW[dtype]).numpy()
    return PackedWeights(version, layout, buffers)


def unpack_into(model: torch.nn.Module, packed: PackedWeights, share: bool = False):
    """Load a packed version into `model`'s parameters (same names; dtypes cast if they differ).

    share=True: CPU parameters of the packed dtype become views of the packed buffers instead of
    copies (zero-copy when those buffers are Ray shared memory). The buffers are read-only, so
    only do this for a model that is never trained or written to (a rollout worker)."""
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
            src = flats[key][off: off + n].view(shape)
            if share and p.device.type == "cpu" and p.dtype == src.dtype:
                p.data = src
            else:
                p.copy_(src, non_blocking=True)
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
        with torch.no_grad():
            for dtype, items in _by_dtype(model).items():
                # A flattened model sends / receives straight from / into its own buffer.
                own = _flat_of(model, dtype, items)
                if own is not None and own.device == dev:
                    flat = own
                elif self.rank == 0:
                    flat = torch.cat([t.reshape(-1).to(dev) for _, t in items])
                else:
                    flat = torch.empty(sum(t.numel() for _, t in items), dtype=dtype, device=dev)
                dist.broadcast(flat, src=0)
                if self.rank != 0 and flat is not own:
                    for _, t, off, n in _spans(items):  # t is a detached view of the parameter
                        t.copy_(flat[off: off + n].view_as(t))
        return int(v.item())

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
