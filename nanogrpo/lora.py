"""LoRA adapters for `nanogrpo.model.Qwen2`, in PEFT's parameter names and file format.

LoRA (Hu et al. 2021) trains a low-rank update per target projection: W x + (alpha / r) B A x with
A (r, in) and B (out, r), B starting at zero so step 0 is the base model. Here:

  * `add_lora(model, LoraConfig(...))` swaps each target `Linear` (q/k/v/o, gate/up/down by default)
    for a `LoraLinear` that keeps the *same* base Parameter objects under the same names
    (`...q_proj.weight`), so checkpoint code, `weights.pack` and digests see the base as before, and
    adds `lora_A.weight` / `lora_B.weight` beside them. The base is frozen; A and B are fp32 even when
    the base is bf16, since a bf16 adapter rounds away most of each small update.
  * `adapters_off(model)`: the base model for a KL reference, with no second copy of the weights.
  * `merge` / `unmerge`: fold the adapters into the base weights for fast inference, either keeping
    the base aside (unmerge restores it bit for bit, in any dtype) or in place in fp32 (the base held
    once; each version rounds by about an ulp). `merge_for_rollouts` picks the workers' default.
  * `adapter_state_dict` / `save_adapter` / `load_adapter`: PEFT's saved key names
    (`base_model.model.<name>.lora_A.weight`, no adapter name) and its directory layout
    (`adapter_config.json` + `adapter_model.safetensors`), readable by `peft.PeftModel.from_pretrained`.
  * `pack_adapters` / `apply_adapters`: adapter-only weight sync, one flat fp32 buffer per version.
  * `export_merged`: a plain HF model directory with the adapters merged in.

No Ray, no PEFT import: PEFT is only a reader/writer of the same files.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import TOKENIZER_FILES, _atomic, save_checkpoint
from .model import Linear, Qwen2

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the HF model: two levels of names
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    r: int = 8                # rank of every adapter (--lora-rank)
    alpha: float = 16.0       # the update is scaled by alpha / r (--lora-alpha)
    dropout: float = 0.0      # dropout on the adapters' input, in training only (--lora-dropout)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # projection names to adapt (--lora-targets)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(dict.fromkeys(self.targets))  # de-duplicated, order kept
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in DEFAULT_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"--lora-targets: {bad or 'nothing'} not adaptable; "
                             f"choose from {','.join(DEFAULT_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoraLinear(Linear):
    """A target projection: the base Linear's own weight/bias Parameters plus fp32 lora_A, lora_B.

    Forward = base(x) + scale * B(A(dropout(x))), the adapter path computed in fp32 and added in the
    base's dtype. `disabled` (see adapters_off) or merged: the base path only.
    """

    def __init__(self, base: nn.Linear, cfg: LoraConfig, generator: torch.Generator):
        # Built on meta, then handed the base's Parameters: no copy of the base, and anything that
        # holds those Parameters (an optimizer, flat sync buffers) still sees the live weights.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, dtype=torch.float32, device=dev)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, dtype=torch.float32, device=dev)
        # PEFT's default init: A Kaiming-uniform (a=sqrt(5), i.e. U(+-1/sqrt(in))), B zero. Drawn on
        # the CPU from one seeded generator so the init does not depend on the device.
        a = torch.empty(cfg.r, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.scale, self.p_drop = cfg.scale, cfg.dropout
        self.disabled = False
        self.pristine: torch.Tensor | None = None  # the base weight while merged with keep_base
        self.in_place = False  # merged into the base weight itself (no kept copy)

    @property
    def merged(self) -> bool:
        return self.pristine is not None or self.in_place

    def forward(self, x):
        y = super().forward(x)  # (..., out)
        if self.disabled or self.merged:
            return y
        if self.p_drop and self.training:
            x = F.dropout(x, self.p_drop, training=True)
        a = F.linear(x.to(torch.float32), self.lora_A.weight)  # (..., r)
        if y.dtype == torch.float32:
            # y + scale * a @ B^T as one GEMM: per projection the unmerged adapter then costs two thin
            # matmuls and no extra elementwise passes, which matters in small-batch decode steps.
            out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_B.weight.t(),
                              alpha=self.scale)  # (N, out)
            return out.view(y.shape)
        # Low-precision base: sum in fp32 and round once, as PEFT does.
        return F.linear(a, self.lora_B.weight).mul_(self.scale).add_(y).to(y.dtype)

    @torch.no_grad()
    def write_effective(self, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """base + scale * B @ A (out, in), summed in fp32 and rounded once to base's dtype."""
        A, B = self.lora_A.weight, self.lora_B.weight
        if base.dtype == torch.float32:
            return torch.addmm(base, B, A, alpha=self.scale, out=out)
        w = torch.addmm(base.float(), B, A, alpha=self.scale).to(base.dtype)
        return w if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.out_features}, scale={self.scale}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter matrix, in model order: what the optimizer and sync see."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def add_lora(model: Qwen2, cfg: LoraConfig, seed: int = 0) -> Qwen2:
    """Put adapters on every target projection of every layer (in place); freeze everything else.

    After this only adapter parameters require grad, so `optim.param_groups(model, wd)` gives an
    optimizer with state for the adapters only.
    """
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters")
    gen = torch.Generator().manual_seed(seed)
    found = set()
    for name, mod in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in cfg.targets and name.startswith("model.layers.") and isinstance(mod, nn.Linear):
            setattr(model.get_submodule(parent), leaf, LoraLinear(mod, cfg, gen))
            found.add(leaf)
    if set(cfg.targets) - found:
        raise ValueError(f"--lora-targets: no module named {sorted(set(cfg.targets) - found)} in this model")
    model.requires_grad_(False)
    for _, p in lora_parameters(model):
        p.requires_grad_(True)
    model.lora_config = cfg
    return model


@contextmanager
def adapters_off(model: nn.Module):
    """The base model inside the block (the KL reference policy): same weights, adapters skipped."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        # Merged weights hold the adapters; skipping the adapter path would not give the base.
        raise RuntimeError("adapters_off on a merged model: unmerge(model) first")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@torch.no_grad()
def merge(model: nn.Module, keep_base: bool = True) -> nn.Module:
    """Fold each adapter into its base weight, so a forward costs what the base model's does.

    keep_base=True: the base tensor is kept aside (one extra copy of the target weights), so
    `unmerge` is bitwise exact in any dtype and `apply_adapters` rewrites base + new update from it:
    no error accumulates over versions. keep_base=False (fp32 only): merged into the one copy;
    `unmerge` and each new version subtract the old update and add the new one, which rounds by
    about an ulp of the weight per version (measured in tests/test_lora.py), so the base drifts slowly.
    """
    for _, m in lora_modules(model):
        if m.merged:
            continue
        if keep_base:
            m.pristine = m.weight.data
            m.weight.data = m.write_effective(m.pristine)
        elif m.weight.dtype != torch.float32:
            # Each bf16 rounding moves a weight by up to half a bf16 ulp (0.2% of it), twice a version.
            raise ValueError(f"merge(keep_base=False) needs fp32 weights, not {m.weight.dtype}")
        else:
            m.weight.data.addmm_(m.lora_B.weight, m.lora_A.weight, alpha=m.scale)
            m.in_place = True
    return model


def merge_for_rollouts(model: nn.Module) -> nn.Module:
    """How a rollout worker holds its adapters: merged, since a merged decode step costs what the
    base's does while unmerged adapters cost two extra matmuls per projection per step. bench/lora.py
    (fp32, 2 CPU cores, r=8, 32 rows): unmerged generation took 1.11x the base's time on the SmolLM2
    shape and 1.31-1.42x on a 4-layer toy, merged 1.00x; taking a version merged cost 82-90 ms against
    a 3.4 s rollout call, so merged won per call by 1.09-1.14x (SmolLM2). fp32 weights merge in
    place, so the worker holds the base once; other dtypes keep the base aside, since in place each version would
    round every bf16 weight twice (up to 0.2% of it each time) and the errors would add up."""
    return merge(model, keep_base=model.lm_head.weight.dtype != torch.float32)


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Take the adapters back out: the kept base (bitwise the weights before `merge`), or, merged
    in place, the weight minus the update."""
    for _, m in lora_modules(model):
        if m.pristine is not None:
            m.weight.data, m.pristine = m.pristine, None
        elif m.in_place:
            m.weight.data.addmm_(m.lora_B.weight, m.lora_A.weight, alpha=-m.scale)
            m.in_place = False
    return model


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in lora_modules(model))


@contextmanager
def _changing_adapters(model: nn.Module):
    """Around a write into the adapters: in-place merged weights lose the old update before it and
    gain the new one after; kept-base merged weights are rewritten from the base."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        if m.in_place:
            m.weight.data.addmm_(m.lora_B.weight, m.lora_A.weight, alpha=-m.scale)
    try:
        yield
    finally:
        for m in mods:
            if m.in_place:
                m.weight.data.addmm_(m.lora_B.weight, m.lora_A.weight, alpha=m.scale)
            elif m.pristine is not None:
                m.write_effective(m.pristine, out=m.weight.data)


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name (`...q_proj.weight`) -> base + scale * B @ A of every adapted projection."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.weight"] = m.weight.detach().clone() if m.merged else m.write_effective(m.weight)
    return out


def merged_state_dict(model: Qwen2) -> dict[str, torch.Tensor]:
    """The plain Qwen2 state dict (HF names, no adapter keys) with the adapters merged in; the model
    itself is not changed. A tied lm_head is left out, as save_pretrained does."""
    eff = effective_weights(model)
    state = {k: eff.get(k, v) for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def export_merged(model: Qwen2, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """A HF model directory (config.json + model.safetensors + tokenizer files) with the adapters
    merged in, which `transformers.AutoModelForCausalLM.from_pretrained` loads as a plain model."""
    out_dir = Path(out_dir)
    save_checkpoint(out_dir, model.config, merged_state_dict(model))
    for f in TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy2(Path(tokenizer_dir) / f, out_dir / f)
    return out_dir


# ----------------------------------------------------------------------------- PEFT state and files
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under the names PEFT's save_pretrained writes (no adapter name):
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (r, in)."""
    return {PEFT_PREFIX + n: p.detach() for n, p in lora_parameters(model)}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter state"):
    """Copy PEFT-named adapter tensors into the model's adapters (all of them, exact shapes); a
    merged model is re-merged from its kept base."""
    params = dict(lora_parameters(model))
    if not params:
        raise ValueError(f"{source}: the model has no LoRA adapters to load into (add_lora first)")
    names = {k.removeprefix(PEFT_PREFIX): k for k in state}
    missing = sorted(PEFT_PREFIX + n for n in set(params) - set(names))
    unexpected = sorted(names[n] for n in set(names) - set(params))  # as the file spells them
    bad = [f"{names[n]}: {tuple(state[names[n]].shape)} vs model {tuple(p.shape)}"
           for n, p in params.items() if n in names and state[names[n]].shape != p.shape]
    problems = [f"{what} {lst[:3]}{' ...' if len(lst) > 3 else ''}" for what, lst in
                (("missing", missing), ("unexpected", unexpected),
                 ("mis-shaped (another rank?)", bad)) if lst]
    if problems:
        raise ValueError(f"{source} does not fit the model's adapters: " + "; ".join(problems))
    with _changing_adapters(model):
        for n, p in params.items():
            p.copy_(state[names[n]])


def adapter_config_dict(cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (the fields PEFT's LoraConfig has had
    since 0.6; newer fields keep their defaults when absent)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT adapter directory: adapter_config.json + adapter_model.safetensors."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    _atomic(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(adapter_config_dict(cfg, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    _atomic(path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return path


# Fields of a PEFT LoRA config that change the maths or the layout; anything but the default
# would make our adapters compute something else than PEFT's, so they are refused, not ignored.
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "exclude_modules": None, "lora_bias": False, "use_qalora": False, "layer_replication": None,
                "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None}


def _targets_of(value, where: str) -> tuple[str, ...]:
    # PEFT reads a list as "modules whose name ends in one of these" and a string as a regex over
    # full module names; only bare projection names map onto every layer's projection of that kind.
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{where}: field target_modules must be a list of projection names "
                         f"({','.join(DEFAULT_TARGETS)}), got {value!r}")
    bad = [t for t in value if t not in DEFAULT_TARGETS]
    if bad or not value:
        raise ValueError(f"{where}: field target_modules has {bad or 'nothing'}; nanogrpo adapts whole "
                         f"projection kinds only: {','.join(DEFAULT_TARGETS)}")
    return tuple(value)


def _number(d: dict, key: str, where: str, ok, expected: str):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise ValueError(f"{where}: field {key} must be {expected}, got {v!r}")
    return v


def read_adapter_config(path: str | Path) -> LoraConfig:
    """adapter_config.json -> LoraConfig; one clear error naming the file and field otherwise."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist (not a PEFT adapter directory)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        got = d.get("peft_type") if isinstance(d, dict) else d
        raise ValueError(f"{f}: field peft_type must be 'LORA', got {got!r}")
    for key, default in _UNSUPPORTED.items():
        if d.get(key, default) not in (default, None, False, {}, [], "none"):
            raise ValueError(f"{f}: field {key}={d[key]!r} is not supported (expected {default!r})")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in d]
    if missing:
        raise ValueError(f"{f}: field {missing[0]} is missing")
    d.setdefault("lora_dropout", 0.0)
    r = _number(d, "r", str(f), lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    alpha = _number(d, "lora_alpha", str(f), lambda v: v > 0, "> 0")
    dropout = _number(d, "lora_dropout", str(f), lambda v: 0 <= v < 1, "in [0, 1)")
    return LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=_targets_of(d["target_modules"], str(f)))


def load_adapter(model: Qwen2, path: str | Path) -> Qwen2:
    """Load a PEFT LoRA directory (ours or one PEFT wrote) into `model`, adding adapters when it has
    none; a model that already has adapters must have the directory's rank, alpha and targets."""
    path = Path(path)
    cfg = read_adapter_config(path)
    have = getattr(model, "lora_config", None)
    if have is None:
        add_lora(model, cfg)
    else:
        for field, mine, theirs in (("r", have.r, cfg.r), ("lora_alpha", have.alpha, cfg.alpha),
                                    ("target_modules", sorted(have.targets), sorted(cfg.targets))):
            if mine != theirs:
                raise ValueError(f"{path / CONFIG_FILE}: field {field}={theirs!r} "
                                 f"but the model's adapters have {mine!r}")
    f = path / WEIGHTS_FILE
    if not f.is_file():
        pickled = (path / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is not loaded: pickle files can run code)" if pickled else ""
        raise FileNotFoundError(f"{f} does not exist{hint}")
    try:
        with safe_open(str(f), framework="pt") as sf:
            state = {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read {f} (truncated or corrupt?): {e}") from None
    load_adapter_state_dict(model, state, source=str(f))
    return model


# ----------------------------------------------------------------------------- adapter-only weight sync
@dataclass
class PackedAdapters:
    version: int
    scale: float                               # alpha / r the adapters were trained with
    layout: list[tuple[str, tuple, int]]       # (parameter name, shape, offset into buffer)
    buffer: np.ndarray                         # (n,) fp32: every adapter matrix end to end

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


@torch.no_grad()
def pack_adapters(model: nn.Module, version: int) -> PackedAdapters:
    """The adapters as one flat CPU fp32 buffer (adapter bytes, not model bytes), tagged `version`."""
    items = lora_parameters(model)
    if not items:
        raise ValueError("pack_adapters: the model has no LoRA adapters")
    layout, off = [], 0
    for name, p in items:
        layout.append((name, tuple(p.shape), off))
        off += p.numel()
    # One cat on the adapters' device, then one device-to-host copy (not one per matrix).
    flat = torch.cat([p.reshape(-1) for _, p in items]).to("cpu", torch.float32)  # (n,)
    return PackedAdapters(version, model.lora_config.scale, layout, flat.numpy())


def adapter_digest(model: nn.Module) -> str:
    """sha256 of the adapters' fp32 bytes in name order: equal on a learner and a worker that took
    its version, merged or not (a digest of all weights differs there: merged weights hold the update)."""
    h = hashlib.sha256()
    for name, p in lora_parameters(model):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def apply_adapters(model: nn.Module, packed: PackedAdapters):
    """Load a packed version into a worker's adapters. A merged worker (see `merge`) re-merges from
    its kept base, so the weights it generates with are base + this version, never a drifted sum."""
    params = dict(lora_parameters(model))
    mine = [(n, tuple(p.shape)) for n, p in params.items()]
    if mine != [(n, s) for n, s, _ in packed.layout]:
        diff = sorted(set(mine) ^ {(n, s) for n, s, _ in packed.layout})
        raise ValueError(f"adapters v{packed.version} do not match this model's adapters "
                         f"(rank or targets differ): {diff[:3]}")
    if not math.isclose(packed.scale, model.lora_config.scale, rel_tol=1e-12):
        raise ValueError(f"adapters v{packed.version} have scale {packed.scale}, this model {model.lora_config.scale} "
                         "(different --lora-alpha / --lora-rank)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only; we only read
        flat = torch.from_numpy(packed.buffer)
    with _changing_adapters(model):
        for name, shape, off in packed.layout:
            p = params[name]
            p.copy_(flat[off: off + p.numel()].view(shape), non_blocking=True)
