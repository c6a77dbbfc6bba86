"""The built-in tiny tokenizer and Qwen2 config for the embedded default run (arithmetic on 2 CPU cores).

Built in code, but saved as ordinary HF files (tokenizer.json, tokenizer_config.json, config.json) so the
default run loads it through the same Tokenizer.from_pretrained / model-loading path as a released Qwen2.
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from nanogrpo.tokenizer import Tokenizer

# Everything an arithmetic prompt ("83,47:36") or answer ("83-47", "(3+5)*7") can contain; one token each.
TINY_CHARS = "0123456789+-*/()=:, "
ENDOFTEXT = "<|endoftext|>"
# Control tokens after the characters, as in HF vocabularies where added tokens come last; the ChatML pair is
# unused by the tiny template but keeps prompts built for Qwen (e.g. a stray "<|im_end|>") encodable.
TINY_SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID = len(TINY_CHARS)  # 20

# Prompt is the concatenated message contents; "=" asks for the answer, which is a bare expression then EOS.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


TINY_MODEL_CONFIG: dict = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA with 2 query heads per KV head, so the tiny run exercises the real code path
    "intermediate_size": 384,
    # A multiple of 8 keeps the embedding / lm_head matmuls on aligned shapes; ids >= the tokenizer's size are
    # never produced by the tokenizer and only get sampled by an untrained model.
    "vocab_size": _round_up(len(TINY_CHARS) + len(TINY_SPECIAL_TOKENS), 8),
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "torch_dtype": "float32",
    "use_sliding_window": False,
}


def build_tiny_tokenizer(directory: str | Path) -> Path:
    """Create the character-level tokenizer and save it as HF files in `directory`; returns the directory."""
    # BPE with no merges over a character vocabulary = one id per character. It is byte-level like Qwen2's
    # own tokenizer (vocab holds the GPT-2 byte spellings, space is "\u0120") because transformers 5 ignores
    # tokenizer_class next to a qwen2 config.json and rebuilds the pipeline as Qwen2Tokenizer (NFC, split
    # regex, byte-level) from our vocab; with byte-level spellings that rebuild encodes exactly as we do.
    # use_regex=False: nothing merges, so no word splitting is needed.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {byte_level.pre_tokenize_str(c)[0][0]: i for i, c in enumerate(TINY_CHARS)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in TINY_SPECIAL_TOKENS])
    assert backend.token_to_id(ENDOFTEXT) == ENDOFTEXT_ID, "TINY_MODEL_CONFIG's special ids would be wrong"
    tok = Tokenizer(backend, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=TINY_CHAT_TEMPLATE,
                    config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
                            TINY_MODEL_CONFIG["max_position_embeddings"]},
                    source="nanogrpo.tiny")
    return tok.save_pretrained(directory)


def write_tiny_model_dir(directory: str | Path) -> Path:
    """Write config.json and the tokenizer files (no weights: the model code initialises them)."""
    d = build_tiny_tokenizer(directory)
    with open(d / "config.json", "w", encoding="utf-8") as f:
        json.dump(TINY_MODEL_CONFIG, f, indent=2)
        f.write("\n")
    return d
