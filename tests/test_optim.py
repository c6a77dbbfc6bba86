"""CPUOffloadAdamW against torch.optim.AdamW; clip_grad_norm_ against torch's; param_groups."""
import io

import pytest
import torch

from nanogrpo.optim import CPUOffloadAdamW, clip_grad_norm_, param_groups

SHAPES = [(16, 8), (16,), (4, 16), (4,), (10, 8)]  # an MLP's weights/biases and an embedding
GROUPS = [dict(idx=[0, 2, 4], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99)),
          dict(idx=[1, 3], lr=3e-3, weight_decay=0.0)]
cuda = pytest.mark.gpu  # skipped without CUDA by the hook in conftest.py


def _params(device="cpu", dtypes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(SHAPES)
    return [torch.randn(s, generator=g).to(device, dt).requires_grad_() for s, dt in zip(SHAPES, dtypes)]


def _groups(params):
    return [dict({k: v for k, v in spec.items() if k != "idx"}, params=[params[i] for i in spec["idx"]])
            for spec in GROUPS]


def _set_grads(step, refs, ours, seed=100):
    """Same random grads for both; param k gets no grad on steps where (step + k) % 4 == 0."""
    g = torch.Generator().manual_seed(seed + step)
    for k, (r, o) in enumerate(zip(refs, ours)):
        grad = torch.randn(r.shape, generator=g)
        if (step + k) % 4 == 0:
            r.grad, o.grad = None, None
        else:
            o.grad = grad.to(o.device, o.dtype)
            r.grad = o.grad.to("cpu", r.dtype)  # the reference sees exactly the grad we see


def _reload(opt, params, **kw):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh optimizer."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    new = CPUOffloadAdamW(_groups(params), amsgrad=opt.defaults["amsgrad"], **kw)
    new.load_state_dict(torch.load(buf, weights_only=True))
    return new


def _master(opt, p):
    return opt.state[p]["master"] if "master" in opt.state[p] else p


@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_adamw_fp32_with_state_round_trip(amsgrad):
    """Guards the update arithmetic (decoupled decay, bias correction per param step, AMSGrad),
    per-group hyperparameters, skipping grad-None params, and exact resume from a checkpoint."""
    refs, ours = _params(), _params()
    ref = torch.optim.AdamW(_groups(refs), amsgrad=amsgrad)
    opt = CPUOffloadAdamW(_groups(ours), amsgrad=amsgrad)
    for step in range(20):
        if step == 10:
            opt = _reload(opt, ours)
        _set_grads(step, refs, ours)
        ref.step()
        opt.step()
        torch.testing.assert_close(ours, refs, msg=f"step {step}")
    for r, o in zip(refs, ours):
        assert "master" not in opt.state[o]  # fp32 CPU params train in place
        for k, v in ref.state[r].items():
            torch.testing.assert_close(opt.state[o][k], v, msg=k)


def test_state_dict_is_torch_format():
    """Guards drifting from torch's format: our state_dict loads into torch.optim.AdamW, and
    torch's into ours, and both continue identically."""
    refs, ours = _params(), _params()
    ref, opt = torch.optim.AdamW(_groups(refs)), CPUOffloadAdamW(_groups(ours))
    for step in range(5):
        _set_grads(step, refs, ours)
        ref.step(), opt.step()
    ref2 = torch.optim.AdamW(_groups(refs))
    ref2.load_state_dict(opt.state_dict())
    opt2 = CPUOffloadAdamW(_groups(ours))
    opt2.load_state_dict(ref.state_dict())
    for step in range(5, 10):
        _set_grads(step, refs, ours)
        ref2.step(), opt2.step()
    torch.testing.assert_close(ours, refs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_masters(dtype):
    """Guards updating in bf16 (updates below bf16 resolution vanish): masters stay fp32 and follow
    fp32 AdamW exactly, the working weights are always master.to(dtype), and the master survives
    a checkpoint round trip."""
    ours = _params(dtypes=[dtype] * len(SHAPES))
    refs = [p.detach().float().requires_grad_() for p in ours]
    ref, opt = torch.optim.AdamW(_groups(refs), lr=1e-4), CPUOffloadAdamW(_groups(ours))
    for step in range(12):
        if step == 6:
            opt = _reload(opt, ours)
        _set_grads(step, refs, ours)
        ref.step(), opt.step()
        for r, o in zip(refs, ours):
            if o in opt.state:
                m = opt.state[o]["master"]
                assert m.dtype == torch.float32 and m.device.type == "cpu"
                torch.testing.assert_close(m, r.detach())
                assert torch.equal(o.detach(), m.to(dtype))


def test_state_tensors_round_trip_through_safetensors():
    """Guards state tensors that safetensors refuses (shared storage, views of the params, pinned
    buffers): the flattened state saves, loads and resumes bit-identically."""
    from safetensors.torch import load, save

    a, b = _params(dtypes=[torch.bfloat16] * len(SHAPES)), _params(dtypes=[torch.bfloat16] * len(SHAPES))
    opt_a, opt_b = CPUOffloadAdamW(_groups(a), amsgrad=True), CPUOffloadAdamW(_groups(b), amsgrad=True)
    for step in range(4):
        _set_grads(step, a, b)
        opt_a.step(), opt_b.step()
    sd = opt_b.state_dict()
    flat = load(save({f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}))
    state: dict[int, dict] = {}
    for name, v in flat.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt_b = CPUOffloadAdamW(_groups(b), amsgrad=True)
    opt_b.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    for step in range(4, 8):
        _set_grads(step, a, b)
        opt_a.step(), opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(opt_a.state[p]["master"], opt_b.state[q]["master"])


def test_grad_none_params_get_no_state():
    """Guards creating state (and stepping) for params that never received a grad, as torch does not."""
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = CPUOffloadAdamW([p, q])
    p.grad = torch.ones(3)
    opt.step()
    assert q not in opt.state and opt.state[p]["step"].item() == 1.0
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_offload_matches_torch_adamw(dtype):
    """Guards the CUDA pipeline: bucket boundaries (tiny bucket_bytes), stream/event ordering (the
    params are read on the main stream right after step) and mixed CPU+CUDA params in a group."""
    ours = _params("cuda", dtypes=[dtype] * len(SHAPES))
    ours[3] = ours[3].detach().cpu().float().requires_grad_()  # one CPU fp32 param in the mix
    refs = [p.detach().cpu().float().requires_grad_() for p in ours]
    ref = torch.optim.AdamW(_groups(refs), amsgrad=True)
    opt = CPUOffloadAdamW(_groups(ours), amsgrad=True, bucket_bytes=256)
    assert opt.pin_memory
    for step in range(10):
        if step == 5:
            opt = _reload(opt, ours, bucket_bytes=300)
        _set_grads(step, refs, ours)
        ref.step(), opt.step()
        snaps = [o.detach().clone() for o in ours]  # main-stream reads right after step, no sync
        for r, o, snap in zip(refs, ours, snaps):
            m = (_master(opt, o) if o in opt.state else o).detach().cpu().float()
            torch.testing.assert_close(m, r.detach())
            assert torch.equal(snap.cpu(), m.to(o.dtype)), "main stream saw stale weights"


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    """Guards the global norm over several tensors and the clip factor (clipping and not)."""
    g = torch.Generator().manual_seed(1)
    a, b = _params(seed=1), _params(seed=1)
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape, generator=g) * 0.3
        y.grad = x.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, max_norm)
    got = clip_grad_norm_(b, max_norm)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close([p.grad for p in b], [p.grad for p in a])


def test_clip_grad_norm_mixed_dtypes_and_nonfinite():
    """Guards bf16 norms accumulated in bf16, and a NaN/inf norm zeroing the grads (torch's
    behaviour) instead of being reported so the caller can skip the step."""
    p = torch.zeros(1000, requires_grad=True)
    q = torch.zeros(7, dtype=torch.bfloat16, requires_grad=True)
    p.grad, q.grad = torch.full((1000,), 0.01), torch.full((7,), 3.0, dtype=torch.bfloat16)
    total = clip_grad_norm_([p, q], 1e6)
    torch.testing.assert_close(total, torch.tensor((1000 * 1e-4 + 7 * 9.0) ** 0.5))
    for bad in (torch.inf, torch.nan):
        p.grad[3] = bad
        before = [p.grad.clone(), q.grad.clone()]
        total = clip_grad_norm_([p, q], 1.0)
        assert not torch.isfinite(total)
        torch.testing.assert_close([p.grad, q.grad], before, equal_nan=True)
    assert clip_grad_norm_([torch.zeros(2, requires_grad=True)], 1.0).item() == 0.0


def test_param_groups_no_decay_for_1d():
    """Guards decaying RMSNorm gains and biases, and counting tied embeddings twice."""
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.ModuleDict(dict(emb=emb, proj=torch.nn.Linear(4, 4), norm=torch.nn.LayerNorm(4),
                                     head=torch.nn.Linear(4, 10, bias=False)))
    model["head"].weight = emb.weight  # tied
    model["norm"].bias.requires_grad_(False)  # frozen -> left out
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([emb.weight, model["proj"].weight])
    assert ids(no_decay["params"]) == ids([model["proj"].bias, model["norm"].weight])
    CPUOffloadAdamW(param_groups(model, 0.1))  # accepted as-is by the optimizer
