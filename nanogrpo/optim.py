"""CPU-offloaded AdamW (ZeRO-Offload style), foreach grad-norm clipping, weight-decay param groups.

ZeRO-Offload (Ren et al. 2021): the accelerator keeps only the low-precision working weights and
their grads; the fp32 master weights and both Adam moments (12-16 bytes/param) live in host memory
and the update runs on the CPU. Per step, per bucket of params:

  GPU grads --D2H (d2h stream, pinned staging, param dtype)--> CPU  [event: CPU waits for this bucket]
  CPU: grads -> fp32, AdamW on the fp32 masters (torch._foreach kernels), masters -> staging (cast)
  staging --H2D (h2d stream)--> GPU working params                 [overlaps the next bucket's update]

Transfers move the working dtype (bf16: half of fp32's bytes over PCIe) and the casts run on the CPU.
Only the staging buffers are pinned (one per bucket, reused for both directions); masters and moments
are never DMA'd, so pinning them would only lock host RAM. fp32 CPU params are updated in place
(the master *is* the param); other CPU params (bf16/fp16) keep an fp32 master and are cast back.

The arithmetic is torch.optim.AdamW's (non-capturable path) op for op: decoupled decay
p *= 1 - lr*wd, m.lerp_(g, 1-b1), v = b2 v + (1-b2) g^2, optional AMSGrad max, bias corrections
computed in Python floats, p.addcdiv_(m, sqrt(v)/sqrt(bc2) + eps, value=-lr/bc1).
state_dict() is torch's format plus a fp32 `master` entry for params whose master is a copy.
"""
from __future__ import annotations

import torch

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")


class _Bucket:
    """Params of one device and dtype whose grads travel together through one pinned buffer."""

    def __init__(self, params: list[torch.Tensor], pin: bool):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.staging = torch.empty(n, dtype=params[0].dtype, pin_memory=pin)  # (n,) flat host buffer
        self.views = {p: self.staging[o:o + p.numel()].view(p.shape) for p, o in zip(params, self.offsets)}
        self.d2h_done = torch.cuda.Event()


class CPUOffloadAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW whose fp32 masters and moments live on the CPU (see module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        pin_memory: bool | None = None,
        bucket_bytes: int = 64 * 2**20,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self.pin_memory = on_cuda if pin_memory is None else pin_memory
        self.bucket_bytes = bucket_bytes
        self._buckets: dict[int, list[_Bucket]] = {}  # group index -> CUDA buckets, built lazily
        self._streams: dict[torch.device, tuple] = {}  # device -> (d2h stream, h2d stream)

    # ---- state -------------------------------------------------------------------------------
    @staticmethod
    def _pipelined(p: torch.Tensor) -> bool:
        """Params that go through the bucketed CUDA stream pipeline; the rest copy synchronously."""
        return p.is_cuda

    @staticmethod
    def _in_place(p: torch.Tensor) -> bool:
        return p.device.type == "cpu" and p.dtype == torch.float32

    def _state_for(self, p: torch.Tensor, amsgrad: bool) -> dict:
        st = self.state[p]
        if "step" not in st:  # first step (or a state dict from an optimizer that never stepped p)
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
        if amsgrad and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
        if not self._in_place(p) and "master" not in st:
            # Masters start from the working weights at a param's first step (exact for a bf16
            # checkpoint). Weights changed behind the optimizer's back are overwritten by the next
            # step: restore the optimizer state together with the model.
            st["master"] = p.detach().to("cpu", torch.float32, copy=True)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """Torch's loader minus its cast of the state to each param's dtype/device: moments and
        masters must stay fp32 on the CPU. A `master` for an fp32 CPU param is copied into it."""
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("optimizer state_dict has a different number of param groups or params per group")
        id_map = {i: p for s, g in zip(saved, groups) for i, p in zip(s["params"], g["params"])}
        self.state.clear()
        for i, st in state_dict["state"].items():
            p = id_map[int(i)]
            new = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in st.items() if torch.is_tensor(v)}
            if "step" in st and not torch.is_tensor(st["step"]):
                new["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            if "master" in new and self._in_place(p):
                with torch.no_grad():
                    p.copy_(new.pop("master"))
            self.state[p] = new
        for g, s in zip(groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})

    # ---- the update --------------------------------------------------------------------------
    @staticmethod
    def _adamw(group: dict, masters, grads, states) -> None:
        """AdamW on fp32 CPU lists; ops mirror torch.optim.adam._multi_tensor_adam (decoupled)."""
        if not masters:
            return
        lr, wd, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
        beta1, beta2 = group["betas"]
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, 1)
        if wd != 0:
            torch._foreach_mul_(masters, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # Python-float bias corrections like torch's non-capturable path (steps differ per param
        # when some params had no grad on some steps).
        counts = [s.item() for s in steps]
        step_size = [-(lr / (1 - beta1**c)) for c in counts]
        bc2_sqrt = [(1 - beta2**c) ** 0.5 for c in counts]
        if amsgrad:
            maxes = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(maxes, exp_avg_sqs)
            denom = torch._foreach_sqrt(maxes)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(masters, exp_avgs, denom, step_size)

    def _buckets_for(self, gi: int, group: dict) -> list[_Bucket]:
        if gi not in self._buckets:
            by_key: dict[tuple, list] = {}
            for p in group["params"]:
                if self._pipelined(p):
                    by_key.setdefault((p.device, p.dtype), []).append(p)
            buckets = []
            for ps in by_key.values():
                cur, size = [], 0
                for p in ps:
                    cur.append(p)
                    size += p.numel() * p.element_size()
                    if size >= self.bucket_bytes:
                        buckets.append(_Bucket(cur, self.pin_memory))
                        cur, size = [], 0
                if cur:
                    buckets.append(_Bucket(cur, self.pin_memory))
            self._buckets[gi] = buckets
        return self._buckets[gi]

    def _streams_for(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cuda_work = []  # (group, bucket, params with grads)
        for gi, group in enumerate(self.param_groups):
            host = [p for p in group["params"] if p.grad is not None and not self._pipelined(p)]
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
            # Host-side params (CPU, or a device without the stream pipeline): synchronous copies.
            states = [self._state_for(p, group["amsgrad"]) for p in host]
            masters = [p if self._in_place(p) else s["master"] for p, s in zip(host, states)]
            grads = [p.grad if self._in_place(p) else p.grad.to("cpu", torch.float32) for p in host]
            self._adamw(group, masters, grads, states)
            for p, mst in zip(host, masters):
                if mst is not p:
                    p.copy_(mst)  # cast back to the working dtype/device
            if any(self._pipelined(p) for p in group["params"]):
                for b in self._buckets_for(gi, group):
                    live = [p for p in b.params if p.grad is not None]
                    if live:
                        cuda_work.append((group, b, live))
        if cuda_work:
            self._step_cuda(cuda_work)
        return loss

    def _step_cuda(self, work) -> None:
        devices = {b.params[0].device for _, b, _ in work}
        for dev in devices:
            d2h, h2d = self._streams_for(dev)
            main = torch.cuda.current_stream(dev)
            d2h.wait_stream(main)  # grads are produced by backward kernels still queued on main
            d2h.wait_stream(h2d)  # last step's uploads read the staging buffers we overwrite now
            h2d.wait_stream(main)  # params may still be read by queued kernels before we overwrite
        # Enqueue every bucket's download up front; the CPU then waits bucket by bucket.
        for _, b, live in work:
            with torch.cuda.stream(self._streams_for(b.params[0].device)[0]):
                for p in live:
                    b.views[p].copy_(p.grad, non_blocking=True)
                b.d2h_done.record()
        for group, b, live in work:
            b.d2h_done.synchronize()
            states = [self._state_for(p, group["amsgrad"]) for p in live]
            masters = [s["master"] for s in states]
            views = [b.views[p] for p in live]
            grads = views if b.staging.dtype == torch.float32 else [v.float() for v in views]
            self._adamw(group, masters, grads, states)
            torch._foreach_copy_(views, masters)  # fp32 -> working dtype on the CPU, into pinned memory
            with torch.cuda.stream(self._streams_for(b.params[0].device)[1]):
                for p, v in zip(live, views):
                    p.copy_(v, non_blocking=True)  # overlaps the next bucket's CPU update
        for dev in devices:
            torch.cuda.current_stream(dev).wait_stream(self._streams_for(dev)[1])


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Scale grads so their global L2 norm is at most max_norm; return the pre-clip norm (0-dim).

    Same result as torch.nn.utils.clip_grad_norm_ for finite norms (norms accumulate in fp32, one
    foreach call per (device, dtype)). A non-finite norm leaves the grads untouched so the caller can
    skip the step (torch would scale them by 0 or NaN). No host sync: the decision is a torch.where.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    by_key: dict[tuple, list] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    first = grads[0].device
    norms = [n.to(first) for gs in by_key.values() for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    for (dev, _), gs in by_key.items():
        torch._foreach_mul_(gs, coef.to(dev))
    return total


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: >=2-D weights (matmuls and embeddings, as nanoGPT) decay; 1-D params
    (biases, RMSNorm gains) do not, since shrinking a gain or bias toward 0 is not regularisation.
    Tied weights appear once (named_parameters deduplicates); frozen params are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
