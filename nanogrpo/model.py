"""A Qwen2-family decoder (Qwen2, Qwen3, Llama) with an explicit, preallocated KV cache.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...), so a released
`model.safetensors` loads with a plain `load_state_dict` and `save_pretrained` writes a directory
that `transformers.AutoModelForCausalLM` reads back.

Two forward modes share one code path:
  * training / scoring: `model(input_ids, attention_mask=None)` -> (B, T, V) logits, causal, with
    optional left/right padding and per-layer gradient checkpointing;
  * inference: `model(input_ids, cache=cache, input_lengths=...)` appends the tokens to each row of
    a `KVCache` at that row's own length, so rows of different lengths decode together without any
    padding inside the cache (nanogrpo/cache.py).
A third, `completion_hidden`, is the training forward for GRPO groups: the G completions of a prompt
attend to one shared forward of that prompt (`PromptKV`) instead of each recomputing it.
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cache import Cache, NoCache, PromptKV
from .config import ModelConfig
from .hardware import onednn_bf16


# oneDNN's inner product (the kernel F.linear already uses for bf16 on CPU) and its weight reorder
# into oneDNN's blocked layout. Private to torch, so looked up once and skipped when this build
# lacks them.
_onednn_linear = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                  if torch.backends.mkldnn.is_available() else None)
# oneDNN's bf16 kernels need AVX-512 (or AMX / AVX-NE-CONVERT): on an AVX2-only CPU the reorder
# raises, and F.linear's own bf16 fallback is the only path.
_onednn_reorder = (getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
                   if _onednn_linear is not None and onednn_bf16() else None)
ONEDNN_MIN_WEIGHT = 1 << 21  # below this many weight entries oneDNN's per-call cost (~20 us) loses
# Linear -> (its weight, (data_ptr, version), that weight's oneDNN-blocked bf16 copy). Outside the module, so a
# state_dict, a deepcopy or a pickle never meets the opaque tensor; dropped with the module.
_BLOCKED: "weakref.WeakKeyDictionary[Linear, tuple]" = weakref.WeakKeyDictionary()


class Linear(nn.Linear):
    """nn.Linear with faster CPU inference kernels; training (grad enabled) always takes F.linear.

    fp32, 4+ rows, a large weight: oneDNN instead of MKL's sgemm. For a few rows (a decode step's
    batch) MKL's sgemm barely reuses each weight it reads across rows: on the 0.5B shapes a 9-row
    step cost 2.6x a 1-row one. oneDNN ran those matmuls 1.3-2x faster (rows 4-64), while MKL stays
    better for 1-2 rows and small weights.
    bf16: oneDNN on a copy of the weight reordered once into its blocked layout, instead of F.linear
    reordering it on every call: 1.2-1.6x faster per matmul on SmolLM2's decode shapes (AMX), the
    same output bits. The copy costs the weight's memory again; it is rebuilt when the weight
    changes (a new version from the learner, loaded in place or swapped in).
    Same parameters and names as nn.Linear.
    """

    def forward(self, x):
        if _onednn_linear is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and _onednn_reorder is not None:
                return _onednn_linear(x, self.blocked_weight(), self.bias, "none", [], "")
            if (x.dtype == torch.float32 and self.weight.numel() >= ONEDNN_MIN_WEIGHT
                    and x.numel() >= 4 * x.shape[-1]):
                return _onednn_linear(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def blocked_weight(self):
        w = self.weight
        hit = _BLOCKED.get(self)
        # The same tensor (a weak reference: a freed one's address may come back), storage and
        # in-place version as when the copy was made.
        if hit is None or hit[0]() is not w or hit[1] != (w.data_ptr(), w._version):
            hit = _BLOCKED[self] = (weakref.ref(w), (w.data_ptr(), w._version),
                                    _onednn_reorder(w.detach(), 64))  # 64: a typical rollout batch
        return hit[2]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op instead of two; the same bits (the weight multiply comes last either way).
            return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)
        # Normalise in fp32 and cast back before the weight multiply, as the reference does;
        # doing the multiply in fp32 changes bf16 logits by a few ulps.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with linear or Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, torch.where(wavelen < old_len / hi, inv, mid))
    return inv


def rope_cos_sin(inv_freq, position_ids, dtype):
    """position_ids (B, T) -> cos, sin (B, T, 1, head_dim) in `dtype`, computed in fp32."""
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rope(x, cos, sin):
    """x (B, T, H, D): rotate the two halves of each head (the HF 'rotate_half' layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        # Qwen3 and Llama put attention_bias on o_proj too; Qwen2 has q/k/v bias only.
        self.o_proj = Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.model_type != "qwen2" and bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_idx, cache: Cache):
        # x (B, T, C), or (n, C) real tokens only when the cache packs; the projections stay packed.
        q, k, v = (cache.unpack(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, H_kv, D)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(layer_idx, k.transpose(1, 2), v.transpose(1, 2))  # (B, H_kv, S, D)
        if T == 1 and mask is not None:
            # Decode step: the g query heads that share a kv head attend as g queries of that one
            # head, so each cached key is read once. fp32: two batched matmuls (SDPA's CPU kernel
            # took 6-38% longer on the tiny and 0.5B decode shapes); bf16: SDPA on the grouped
            # queries, which beat both its enable_gqa form and the matmuls (see README Results).
            qg = q.view(B, self.n_kv, self.n_head // self.n_kv, self.head_dim)  # (B, H_kv, g, D)
            if x.dtype == torch.float32:
                s = torch.matmul(qg, k.transpose(-1, -2))  # (B, H_kv, g, S)
                y = torch.matmul(s.mul_(self.head_dim ** -0.5).add_(mask).softmax(-1), v)  # (B, H_kv, g, D)
            else:
                y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (B, H_kv, g, D)
            return self.o_proj(cache.pack(y.reshape(B, 1, self.n_head * self.head_dim)))
        q = q.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(cache.pack(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias and cfg.model_type == "llama"  # Qwen2/Qwen3 MLPs never have a bias
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_idx, cache: Cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_idx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    """Causal LM: `Qwen2(cfg)(input_ids (B, T)) -> logits (B, T, V)`. Also serves Qwen3 and Llama."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward to save activations
        self._inv_freq = {}  # device -> (D/2,) fp32; computed lazily so meta-device init stays cheap
        self._rope = {}  # (device, dtype) -> cos, sin tables (L, D) for positions [0, L)

    # ---------------------------------------------------------------- construction and I/O
    def init_weights(self, seed: int | None = None):
        """Random init as HF does it: N(0, initializer_range) matrices, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                w = torch.empty(mod.weight.shape).normal_(0.0, std, generator=gen)
                with torch.no_grad():
                    mod.weight.copy_(w)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        return self

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict, seed: int = 0, dtype=None, device=None) -> "Qwen2":
        cfg = ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        model = cls(cfg).init_weights(seed)
        return model.to(device=device, dtype=dtype) if (dtype or device) else model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, device=None) -> "Qwen2":
        """Load a HF checkpoint dir (model.safetensors or a sharded index), optionally cast/moved."""
        from .checkpoint import load_checkpoint  # checkpoint.py never imports model.py: no cycle

        cfg, state = load_checkpoint(path, dtype=dtype)
        with torch.device("meta"):
            model = cls(cfg)
        model.check_state_dict(state, source=str(path))
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(device) if device is not None else model

    def check_state_dict(self, state: dict, source: str):
        """One clear error for missing, unexpected or mis-shaped tensors."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
               for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
        problems = []
        if missing:
            problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            problems.append(f"mis-shaped tensors {bad[:5]}")
        if problems:
            raise ValueError(f"checkpoint {source} does not fit its config.json: " + "; ".join(problems))

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None):
        """Write config.json + model.safetensors (or shards + index) in the HF layout."""
        from .checkpoint import save_checkpoint

        state = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared storage; HF omits it too
        save_checkpoint(path, self.config, state, max_shard_bytes=max_shard_bytes)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- forward
    def inv_freq(self, device) -> torch.Tensor:
        if device not in self._inv_freq:
            # Cached tensors must be normal tensors even when first built under generate's
            # inference_mode, or a later training forward could not save them for backward.
            with torch.inference_mode(False):
                self._inv_freq[device] = rope_inv_freq(self.config, device)
        return self._inv_freq[device]

    def rope_table(self, n: int, device, dtype):
        """cos, sin (L >= n, D) for positions [0, L), grown on demand.

        A decode step then gathers one row per sequence instead of recomputing cos/sin of
        (B, D) angles. Same fp32 maths as rope_cos_sin, so values are bit-identical.
        """
        key = (device, dtype)
        if key not in self._rope or self._rope[key][0].shape[0] < n:
            L = max(n, 2 * self._rope[key][0].shape[0] if key in self._rope else 256)
            with torch.inference_mode(False):  # see inv_freq
                cos, sin = rope_cos_sin(self.inv_freq(device), torch.arange(L, device=device)[None], dtype)
            self._rope[key] = (cos[0, :, 0], sin[0, :, 0])
        return self._rope[key]

    def rope(self, pos, bound, T: int, device, dtype):
        """cos, sin broadcastable to (B, T, 1, D) for positions pos (B, T), or 0..T-1 if None.
        bound: host-side bound on the positions, so the table lookup needs no sync; None for
        arbitrary positions, whose angles are then computed directly."""
        if bound is None:
            return rope_cos_sin(self.inv_freq(device), pos, dtype)
        cos, sin = self.rope_table(bound, device, dtype)  # (L, D)
        if pos is None:
            return cos[None, :T, None], sin[None, :T, None]  # (1, T, 1, D)
        return cos[pos][:, :, None], sin[pos][:, :, None]  # (B, T, 1, D)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Cache | None = None,
                input_lengths=None, logits_at=None, return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, T): 1 for real tokens, 0 for padding (left or right); positions then
            count real tokens only, so a left-padded row gives the same logits as unpadded.
        cache: a KVCache: append to each row of the cache at its own length (prefill or decode).
            Rows whose input is shorter than T pass input_lengths (B,); the tail is padding whose
            keys are written but never counted, and later overwritten. A PromptKV: see there.
        logits_at (B,): compute logits only at one position per row -> (B, V). A prefill needs only
            the last position, which saves a (B, T, V) projection on a 150k vocabulary.
        return_hidden: return the final normed hidden states (B, T, C) instead of logits.
        """
        B, T = input_ids.shape
        cache = NoCache(attention_mask, position_ids) if cache is None else cache
        x = cache.pack(self.model.embed_tokens(input_ids))  # (B, T, C), or (n, C) real tokens only
        pos, mask, bound = cache.begin(B, T, x.dtype, input_lengths)
        cos, sin = self.rope(pos, bound, T, input_ids.device, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, i, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, i, cache)
        cache.end()
        x = cache.unpack(self.model.norm(x))
        if return_hidden:
            return x
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # (B, C)
        return self.lm_head(x)

    def completion_hidden(self, prompt_ids, prompt_lens, completion_ids, index, completion_lens=None) -> torch.Tensor:
        """The final hidden states that predict each completion token, each prompt run once.

        prompt_ids (P, Tp) right-padded with lengths prompt_lens (P,); completion_ids (N, Tc)
        right-padded, row r completing prompt index[r]. -> (N, Tc, C): [:, 0] at the prompt's last
        token, [:, t] at completion token t-1; the same values as running every prompt + completion
        on its own. Padding positions hold values that no real position depends on.
        completion_lens (N,), optional: the rows' real lengths. The projections and MLPs then run on
        real tokens only (prompts and completions), and padding positions hold zeros.
        """
        kv = PromptKV(prompt_lens, index, lengths=None if completion_lens is None else prompt_lens)
        hp = self(prompt_ids, cache=kv, return_hidden=True)  # (P, Tp, C)
        first = hp[index, prompt_lens[index] - 1][:, None]  # (N, 1, C)
        if completion_ids.shape[1] == 1:
            return first
        lens = None if completion_lens is None else (completion_lens - 1).clamp(min=0)  # tokens fed back
        hc = self(completion_ids[:, :-1], cache=kv.replay(lens), return_hidden=True)  # (N, Tc - 1, C)
        return torch.cat((first, hc), 1)
