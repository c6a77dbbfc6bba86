"""Model configuration read from a Hugging Face `config.json`.

One dataclass covers the three decoder families that share this code: Qwen2 (q/k/v bias),
Qwen3 (per-head q/k RMSNorm, no bias, explicit head_dim) and Llama (no bias). Anything else is
refused by name, so a user pointing at a Mistral or Gemma checkpoint gets a clear message
instead of silently wrong logits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
# RoPE variants whose frequency maths is implemented in model.rope_inv_freq.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch.dtype or a name ("bf16", "bfloat16", "torch.float32", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}: expected one of float32, bfloat16, float16")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"            # qwen2 | qwen3 | llama
    vocab_size: int = 151936             # rows of embed_tokens / lm_head
    hidden_size: int = 896               # residual stream width
    intermediate_size: int = 4864        # SwiGLU inner width
    num_hidden_layers: int = 24          # decoder blocks
    num_attention_heads: int = 14        # query heads
    num_key_value_heads: int = 2         # key/value heads (GQA when < query heads)
    head_dim: int = 0                    # 0 = hidden_size // num_attention_heads (Qwen3 sets it)
    rms_norm_eps: float = 1e-6           # RMSNorm epsilon
    rope_theta: float = 1_000_000.0      # RoPE base frequency
    rope_scaling: dict | None = None     # {"rope_type": "linear"|"llama3", ...} or None
    max_position_embeddings: int = 32768 # longest context the checkpoint was trained for
    tie_word_embeddings: bool = False    # lm_head shares embed_tokens' weight
    attention_bias: bool | None = None   # q/k/v bias; None = family default (Qwen2 yes, others no)
    mlp_bias: bool = False               # Llama's optional MLP bias
    hidden_act: str = "silu"             # SwiGLU activation (only silu is supported)
    initializer_range: float = 0.02      # std of the random init
    bos_token_id: int | None = None      # informational, written back on save
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"         # dtype the checkpoint is stored in
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, preserved on save

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: nanogrpo supports "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.head_dim in (0, None):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: only 'silu' is implemented")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r}: expected one of {SUPPORTED_ROPE_TYPES}")

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if "model_type" not in d:
            raise ValueError("config has no 'model_type' field")
        if d.get("use_sliding_window"):
            # Qwen2 checkpoints ship it off; silently attending to the full context instead would
            # give different logits from the model's own implementation past the window.
            raise ValueError(f"use_sliding_window=true (sliding_window={d.get('sliding_window')}) is not "
                             "implemented: nanogrpo attends to the full context")
        # transformers 5 moved rope_theta into rope_parameters; older files keep it at the top
        # level with an optional rope_scaling dict. Accept both.
        rope = d.pop("rope_parameters", None) or {}
        scaling = d.pop("rope_scaling", None) or None
        theta = d.pop("rope_theta", rope.get("rope_theta", 10000.0))
        if rope and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_theta", "rope_scaling")}
        kwargs = {k: d.pop(k) for k in list(d) if k in known and d[k] is not None}
        kwargs.setdefault("torch_dtype", "float32")
        return cls(rope_theta=float(theta), rope_scaling=scaling, extra=d, **kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The HF `config.json` form, loadable by transformers.AutoConfig."""
        skip = ("extra", "rope_scaling", "rope_theta", "torch_dtype")
        d = {k: v for k, v in self.extra.items() if k not in ("dtype", "torch_dtype")}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip})
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["rope_theta"] = self.rope_theta
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        d["torch_dtype"] = d["dtype"] = self.torch_dtype
        if self.model_type == "qwen2":
            d.pop("attention_bias", None)  # Qwen2 always has q/k/v bias; its config has no such key
        return d
