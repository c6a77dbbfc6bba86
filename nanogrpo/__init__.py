"""nanogrpo: the library layer (model, generation, tokenizer, checkpoints, tasks, GRPO maths,
optimizer). Importable without Ray; the Ray actors live in actors/ and learner/."""
from .cache import KVCache
from .config import ModelConfig
from .generate import Completion, generate
from .model import Qwen2
from .tokenizer import Tokenizer

__all__ = ["Qwen2", "KVCache", "ModelConfig", "Tokenizer", "generate", "Completion"]
