"""Data-parallel learner pieces (no Ray here): a rank group, token-balanced group shares, bucketed
gradient all-reduce overlapped with backward, and a ZeRO-1 style sharded, CPU-offloaded AdamW.

One GRPO step over N learner ranks:
  every rank gets the whole step's table (advantages and loss denominators are global, so each
  rank's loss is its *partial sum* of the one global loss) -> `balance_groups` gives rank r its
  whole groups, balanced by tokens -> forward/backward on its micro-batches; `GradReducer` sums
  the gradients across ranks in buckets as backward produces them -> every rank clips with the
  same global norm -> `ShardedOffloadAdamW` steps only this rank's parameter shard (fp32 masters
  and moments for ~1/N of the parameters, in CPU memory) -> each shard's new working weights are
  broadcast by its owner, so every rank ends the step with identical weights.

Sums, not means: the denominators are already global, so averaging the ranks' gradients would
divide by N twice. The collectives use a process group of their own (a `TCPStore` and the backend's
ProcessGroup), so a learner rank can also sit in the default group of the weight broadcast.
"""
from __future__ import annotations

import datetime
import heapq
import json

import torch
import torch.distributed as dist

from .optim import CPUOffloadAdamW

_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")


class DPGroup:
    """The learner ranks' own process group (gloo on CPU, NCCL on GPUs), every call with a timeout."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                 backend: str | None = None):
        self.rank, self.world_size = rank, world_size
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=timeout)
        store = dist.PrefixStore("nanogrpo-dp", self.store)
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else \
            torch.device("cpu")

        self._round = 0

    def exchange(self, obj) -> list:
        """Every rank's JSON-able `obj` in rank order, through the store (small things: a step's
        metrics). A rank deletes its key of two rounds ago: every rank has read it by then, since
        each one wrote its last-round key only after reading all of that round's before."""
        self._round += 1
        self.store.set(f"x{self._round}/{self.rank}", json.dumps(obj))
        if self._round > 2:
            self.store.delete_key(f"x{self._round - 2}/{self.rank}")
        return [json.loads(self.store.get(f"x{self._round}/{r}")) for r in range(self.world_size)]

    def all_reduce_async(self, t: torch.Tensor):
        return self.pg.allreduce([t])  # SUM

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.all_reduce_async(t).wait()
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([t], opts).wait()
        return t

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of Python floats (step metrics), in fp64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce_(t).tolist()

    def max_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([t], opts).wait()
        return t.tolist()


def balance_groups(tokens: list[int], n: int) -> list[list[int]]:
    """Whole groups -> n shares of about equal tokens: largest first onto the lightest share
    (LPT), ties to the lower rank, so every rank computes the same split. Each share sorted."""
    shares: list[list[int]] = [[] for _ in range(n)]
    heap = [(0, r) for r in range(n)]  # (tokens so far, rank)
    for g in sorted(range(len(tokens)), key=lambda g: (-tokens[g], g)):
        load, r = heapq.heappop(heap)
        shares[r].append(g)
        heapq.heappush(heap, (load + tokens[g], r))
    return [sorted(s) for s in shares]


def shard_bounds(numels: list[int], n: int) -> list[tuple[int, int]]:
    """Contiguous runs of whole parameters, one per rank, cut where the running size first reaches
    r/n of the total. Contiguous in `named_parameters` order, so a flattened model's shard is one
    slice of its flat buffer (one broadcast per dtype, no packing copy)."""
    total, bounds, start, acc = sum(numels), [], 0, 0
    for r in range(1, n):
        end = start
        while end < len(numels) and acc + numels[end] / 2 < total * r / n:
            acc += numels[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, len(numels)))
    return bounds


class GradReducer:
    """Sums gradients over the ranks in buckets; with `arm()` before the last backward of a step,
    each bucket's all-reduce starts as soon as backward has written all of its gradients.

    Buckets are launched in one fixed order on every rank (collectives must match across ranks
    whatever order autograd happens to finish parameters in); a bucket that is ready early waits
    for those before it. Params that got no gradient contribute zeros."""

    def __init__(self, params: list[torch.nn.Parameter], group: DPGroup, bucket_bytes: int = 16 * 2**20):
        self.group = group
        self.buckets: list[list[torch.nn.Parameter]] = []
        cur, size = [], 0
        for p in reversed(params):  # roughly the order backward produces them
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self._reset()

    def _reset(self):
        self._pending = [len(b) for b in self.buckets]
        self._next = 0  # next bucket to launch
        self._works: list = []  # (work, flat, bucket)

    def arm(self):
        """The next backward is this step's last: reduce as it goes."""
        self._armed = True

    def _on_grad(self, p):
        if not self._armed:
            return
        self._pending[self._bucket_of[p]] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] <= 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int):
        ps = self.buckets[i]
        dtype = ps[0].dtype
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                          for p in ps])  # (sum numel,)
        self._works.append((self.group.all_reduce_async(flat), flat, ps))

    def finish(self):
        """Wait for every bucket (launching any not yet started, e.g. on a rank with no data);
        afterwards each p.grad holds the sum over ranks."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for work, flat, ps in self._works:
            work.wait()
            off = 0
            for p in ps:
                n = p.numel()
                p.grad = flat[off:off + n].view_as(p).to(p.dtype)
                off += n
        self._armed = False
        self._reset()

    def remove(self):
        for h in self._handles:
            h.remove()


def _groups_for(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """nanogrpo.optim.param_groups' rule (decay >= 2-D weights only) on a list of params."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class ShardedOffloadAdamW:
    """CPUOffloadAdamW over this rank's contiguous shard of the trainable parameters; after each
    step every shard's owner broadcasts its new weights. With one rank it is CPUOffloadAdamW.

    `state_dict()` is the unsharded optimizer's (torch's format, params numbered as
    `nanogrpo.optim.param_groups(model, wd)` lists them), gathered on rank 0, so a checkpoint
    written with N ranks loads with any other N: `load_state_dict` keeps this rank's entries."""

    def __init__(self, model: torch.nn.Module, group: DPGroup | None, lr: float, weight_decay: float = 0.0,
                 **adam_kw):
        from .optim import param_groups
        self.model, self.group = model, group
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        n, rank = (group.world_size, group.rank) if group else (1, 0)
        self.bounds = shard_bounds([p.numel() for p in self.params], n)
        lo, hi = self.bounds[rank]
        self.mine = self.params[lo:hi]
        self.global_index = {p: i for i, p in enumerate(p for g in param_groups(model, weight_decay)
                                                         for p in g["params"])}
        if not self.mine:
            raise ValueError(f"{n} learner ranks for {len(self.params)} trainable tensors: some rank would "
                             "hold no optimizer shard; use fewer --num-learners")
        self.opt = CPUOffloadAdamW(_groups_for(self.mine, weight_decay), lr=lr,
                                   weight_decay=weight_decay, **adam_kw)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.opt.step()
        if self.group is not None and self.group.world_size > 1:
            self._broadcast_shards()

    @torch.no_grad()
    def _broadcast_shards(self):
        for r, (lo, hi) in enumerate(self.bounds):
            ps = self.params[lo:hi]
            if not ps:
                continue
            for dtype in sorted({p.dtype for p in ps}, key=str):
                part = [p for p in ps if p.dtype == dtype]
                flat = self._contiguous_span(part)
                if flat is None:  # not one slice of a flat buffer: pack, send, unpack
                    flat = torch.cat([p.detach().reshape(-1) for p in part])
                    self.group.broadcast_(flat.to(self.group.device), r)
                    off = 0
                    for p in part:
                        p.copy_(flat[off:off + p.numel()].view_as(p))
                        off += p.numel()
                else:
                    self.group.broadcast_(flat, r)

    def _contiguous_span(self, part: list[torch.Tensor]) -> torch.Tensor | None:
        """One tensor aliasing all of `part` when they lie end to end in memory (flatten_parameters)."""
        base = getattr(self.model, "_flat_params", {}).get(part[0].dtype)
        if base is None or base.device != self.group.device:
            return None
        size = base.element_size()
        start = (part[0].data_ptr() - base.data_ptr()) // size
        pos = start
        for p in part:
            if not p.is_contiguous() or p.data_ptr() != base.data_ptr() + pos * size:
                return None
            pos += p.numel()
        return base[start:pos] if 0 <= start and pos <= base.numel() else None

    # ---- checkpoints ------------------------------------------------------------------------
    def _local_to_global(self) -> dict[int, int]:
        local = [p for g in self.opt.param_groups for p in g["params"]]
        return {i: self.global_index[p] for i, p in enumerate(local)}

    def state_dict(self) -> dict | None:
        """The unsharded state dict on rank 0 (None on other ranks)."""
        sd = self.opt.state_dict()
        to_global = self._local_to_global()
        state = {to_global[i]: st for i, st in sd["state"].items()}
        if self.group is not None and self.group.world_size > 1:
            state = self._gather_state(state)
            if self.group.rank != 0:
                return None
        hyper = {k: v for k, v in self.opt.param_groups[0].items() if k not in ("params", "weight_decay")}
        return {"state": state, "param_groups": self._full_groups(hyper)}

    def _full_groups(self, hyper: dict) -> list[dict]:
        from .optim import param_groups
        groups, start = [], 0
        for g in param_groups(self.model, self.opt.defaults["weight_decay"]):
            groups.append({**hyper, "weight_decay": g["weight_decay"],
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return groups

    def _gather_state(self, state: dict) -> dict:
        """Every rank's entries to rank 0. The layout of each rank's entries (keys, shapes) is known
        to all ranks (params are shared knowledge; the keys present are sent first), so the
        tensors travel as one flat fp32 buffer per rank."""
        full = dict(state) if self.group.rank == 0 else {}
        for r, (lo, hi) in enumerate(self.bounds):
            if r == 0 or lo == hi:
                continue
            owned = sorted(self.global_index[p] for p in self.params[lo:hi])
            keys = self._keys_of(state if self.group.rank == r else None, owned, r)
            if not keys:  # that rank has not stepped yet: nothing to gather
                continue
            shapes = {self.global_index[p]: p.shape for p in self.params[lo:hi]}
            n = sum(shapes[i].numel() * len(keys) + 1 for i in owned)  # +1: the step count
            flat = torch.empty(n, dtype=torch.float32)
            if self.group.rank == r:
                flat = torch.cat([t for i in owned for t in
                                  [state[i][k].reshape(-1) for k in keys] + [state[i]["step"].reshape(1)]])
            self.group.broadcast_(flat, r)  # (gloo's gather wants equal sizes from every rank)
            if self.group.rank == 0:
                off = 0
                for i in owned:
                    m = shapes[i].numel()
                    entry = {}
                    for k in keys:
                        entry[k] = flat[off:off + m].view(shapes[i]).clone()
                        off += m
                    entry["step"] = flat[off].clone()
                    off += 1
                    full[i] = entry
        return full

    def _keys_of(self, state: dict | None, owned: list[int], owner: int) -> list[str]:
        """The state tensors (besides the step) that `owner`'s entries hold, told to every rank."""
        flags = torch.zeros(len(_STATE_TENSORS), dtype=torch.float64)
        if state is not None and owned and owned[0] in state:
            flags = torch.tensor([float(k in state[owned[0]]) for k in _STATE_TENSORS], dtype=torch.float64)
        self.group.broadcast_(flags, owner)
        return [k for k, f in zip(_STATE_TENSORS, flags.tolist()) if f]

    def load_state_dict(self, sd: dict):
        """Load an unsharded state dict (from any number of ranks): keep this rank's entries."""
        to_global = self._local_to_global()
        local_sd = {"state": {i: sd["state"][g] for i, g in to_global.items() if g in sd["state"]},
                    "param_groups": [{**sd["param_groups"][0], "weight_decay": g["weight_decay"],
                                      "params": list(range(s, s + len(g["params"])))}
                                     for g, s in zip(self.opt.param_groups, self._starts())]}
        self.opt.load_state_dict(local_sd)

    def _starts(self) -> list[int]:
        out, s = [], 0
        for g in self.opt.param_groups:
            out.append(s)
            s += len(g["params"])
        return out

    def state_numel(self) -> int:
        """fp32 numbers this rank's optimizer holds (moments and masters): ~1/N of the whole."""
        return sum(t.numel() for st in self.opt.state.values() for k, t in st.items() if k != "step")
