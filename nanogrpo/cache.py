"""What a forward's attention reads besides its own tokens: the Cache interface and its three kinds.

Qwen2.forward calls `begin` once (positions, mask), every attention layer calls `update` (store
this layer's keys/values, get back the ones to attend to), and forward calls `end` once:
  * NoCache: a plain forward over whole sequences (training, scoring), optional padding;
  * KVCache: generation's preallocated per-row keys/values, rows of different lengths in one batch;
  * PromptKV: GRPO training, where the G completions of a prompt attend to one shared forward of it.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


def additive_mask(allowed, dtype):
    """Boolean (B, T, S) -> (B, 1, T, S) of 0 / -inf in `dtype`, built once per forward (SDPA
    would otherwise convert a boolean mask in every layer)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf"))[:, None]



class Cache:
    """What a forward asks of the keys/values its queries attend to; one object per forward call.

    Qwen2.forward calls `begin` once (positions, mask), every attention layer calls `update` (store
    this layer's keys/values, get back the ones to attend to), and forward calls `end` once. `pack`
    and `unpack` let the token-wise layers (norms, projections, MLPs) run on real tokens only.
    The cache owns its write, as gpt-fast's KVCache.update does, so Attention never asks which kind
    it has. NoCache (a plain forward), KVCache (generation) and PromptKV (GRPO training) implement it.
    """

    def begin(self, B: int, T: int, dtype, input_lengths=None):
        """-> positions (B, T) or None for 0..T-1, the additive mask or None for causal, and a host
        bound on the positions (None: positions are arbitrary, compute their RoPE directly)."""
        return None, None, T

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, H_kv, T, D) of this forward -> the keys/values its queries attend to."""
        return k, v

    def end(self):
        pass

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NoCache(Cache):
    """A plain forward over whole sequences, with optional padding (attention_mask) or positions."""

    def __init__(self, attention_mask=None, position_ids=None):
        self.attention_mask, self.position_ids = attention_mask, position_ids

    def begin(self, B, T, dtype, input_lengths=None):
        pos, am = self.position_ids, self.attention_mask
        bound = None if pos is not None else T  # explicit positions (packed sequences, offsets)
        if am is None:
            return pos, None, bound
        am = am.bool()  # (B, T)
        if pos is None:
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        dev = am.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        # Every query also sees itself, so a padding query's softmax is never empty (NaN).
        allowed = (causal[None] & am[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
        return pos, additive_mask(allowed, dtype), bound


class KVCache(Cache):
    """Preallocated keys/values for `batch_size` rows of up to `max_len` tokens.

    Each row r holds its own sequence in positions [0, lengths[r]); there is no padding inside a
    row, so rows of different lengths decode in one batch and RoPE positions are simply the row's
    length. A forward with the cache uses rows [0, B) for an input of batch B. `move_rows` moves
    live rows into finished rows' slots (batch compaction); `copy_rows` copies a prefilled
    prompt's rows from another cache into the G rows of its group, wherever they are free.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, H_kv, S, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len
        # Host-side upper bound on lengths, so attention can slice the cache without a device sync.
        self.bound = 0
        self._write = self._rows = self._added = None  # set by begin() for the current forward

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def begin(self, B, T, dtype, input_lengths=None):
        """Rows [0, B) take T tokens each at their own length; input_lengths (B,): only that many
        are real (the rest is padding whose keys are written but not counted, later overwritten)."""
        if self.bound + T > self.max_len:  # the bound may be loose: rows finished or refilled
            self.tighten(B)
        if self.bound + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {T} more tokens")
        dev = self.lengths.device
        self.bound += T
        self._rows = B
        self._added = input_lengths if input_lengths is not None else torch.full((B,), T, device=dev)
        pos = self.lengths[:B, None] + torch.arange(T, device=dev)  # (B, T)
        # Where each (row, kv head, token) lands in the flat (B_max * H_kv * S, D) view of a layer's
        # cache: one index_copy_ per layer instead of an advanced-index put.
        H, S = self.k[0].shape[1], self.max_len
        base = (torch.arange(B, device=dev)[:, None] * H + torch.arange(H, device=dev)) * S  # (B, H)
        self._write = (base[:, :, None] + pos[:, None, :]).flatten()  # (B * H * T,)
        # A query sees keys at positions <= its own; this is causal and also hides stale keys past
        # each row's length. Built once as an additive mask for all layers.
        key_pos = torch.arange(self.bound, device=dev)  # (S,)
        return pos, additive_mask(key_pos[None, None, :] <= pos[:, :, None], dtype), self.bound  # (B, 1, T, S)

    def update(self, layer_idx, k, v):
        kc, vc = self.k[layer_idx], self.v[layer_idx]  # (B_max, H_kv, S, D)
        D = kc.shape[-1]
        kc.view(-1, D).index_copy_(0, self._write, k.reshape(-1, D).to(kc.dtype))
        vc.view(-1, D).index_copy_(0, self._write, v.reshape(-1, D).to(vc.dtype))
        B = self._rows
        return kc[:B, :, : self.bound], vc[:B, :, : self.bound]  # (B, H_kv, S, D)

    def end(self):
        self.lengths[: self._rows] += self._added

    def tighten(self, B: int):
        """Lower the host bound to the longest of rows [0, B) (one device sync)."""
        self.bound = int(self.lengths[:B].max()) if B else 0

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy rows src[i] -> dst[i] (disjoint sets); the rest stay where they are."""
        self.copy_rows(self, src, dst)

    def copy_rows(self, other: "KVCache", src: torch.Tensor, dst: torch.Tensor):
        """Rows src[i] of `other` -> rows dst[i] of this cache (src may repeat: a prompt's group)."""
        s = other.bound
        for t, o in zip(self.k + self.v, other.k + other.v):
            t[dst, :, :s] = o[src, :, :s]
        self.lengths[dst] = other.lengths[src]
        self.bound = max(self.bound, s)


class PromptKV(Cache):
    """Keys/values of a batch of prompts, with their autograd graph, shared by the completions of each.

    Two forwards use it. The prompts' forward (`PromptKV(lens, index)`, prompts right-padded)
    stores every layer's keys and values; the completions' forward (`.replay()`) lets completion
    row r attend to prompt index[r]'s keys at positions < lens[index[r]] and causally to its own,
    at positions that continue the prompt. Each row thus computes exactly what the concatenated
    prompt + completion would, while the prompt runs once per group instead of once per row; the
    gradient of a shared key sums over the completions that read it. Layers store by index (not
    append), so a gradient-checkpointing recompute of the prompts' forward overwrites, not grows.
    """

    def __init__(self, prompt_lens: torch.Tensor, index: torch.Tensor, k=None, v=None, lengths=None):
        self.prompt_lens, self.index = prompt_lens, index  # (P,), (N,) row -> prompt
        self.replaying = k is not None
        self.k, self.v = (k, v) if self.replaying else ({}, {})
        self.lengths = lengths  # (N,) real tokens per replayed row, or None: all of them
        self._flat = None  # (n,) positions of the real tokens in the flattened (N * T) input
        self._shape = None  # (N, T) of that input; both set by the first pack()

    def replay(self, lengths: torch.Tensor | None = None) -> "PromptKV":
        """The completions' side. lengths (N,): only the first lengths[r] tokens of row r are real;
        the rest is padding that the projections and MLPs then skip (`pack` / `unpack`)."""
        return PromptKV(self.prompt_lens, self.index, self.k, self.v, lengths)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, F) -> (n, F), the real tokens only (unchanged when all tokens are real)."""
        if self.lengths is None:
            return x
        N, T = x.shape[:2]
        if self._flat is None:
            real = torch.arange(T, device=x.device)[None, :] < self.lengths[:, None]  # (N, T)
            self._flat, self._shape = real.flatten().nonzero().squeeze(1), (N, T)
        return x.reshape(N * T, -1)[self._flat]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(n, F) -> (N, T, F), zeros at padding."""
        if self.lengths is None:
            return x
        N, T = self._shape
        return x.new_zeros(N * T, x.shape[-1]).index_copy(0, self._flat, x).view(N, T, -1)

    def update(self, layer_idx, k, v):
        if not self.replaying:
            self.k[layer_idx], self.v[layer_idx] = k, v
            return k, v
        return (torch.cat((self.k[layer_idx][self.index], k), 2),  # (N, H_kv, Tp + T, D)
                torch.cat((self.v[layer_idx][self.index], v), 2))

    def begin(self, B, T, dtype, input_lengths=None):
        """Prompts: plain causal (right padding is never attended to by a real token). Replay:
        positions (N, T) after each row's prompt and the additive mask (N, 1, T, Tp + T)."""
        if not self.replaying:
            return None, None, T
        lens = self.prompt_lens[self.index]  # (N,)
        dev, Tp = lens.device, self.k[0].shape[2]
        pos = lens[:, None] + torch.arange(T, device=dev)  # (N, T)
        prompt_ok = (torch.arange(Tp, device=dev)[None, :] < lens[:, None])[:, None, :].expand(-1, T, -1)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None].expand(lens.shape[0], -1, -1)
        return pos, additive_mask(torch.cat((prompt_ok, causal), -1), dtype), int(self.prompt_lens.max()) + T
