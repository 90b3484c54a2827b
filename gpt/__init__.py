"""A minimal, hand-written GPT-2: config, model, checkpoint readers, tokenizer, generation."""

from gpt.checkpoint import load_gpt2
from gpt.config import GPTConfig
from gpt.model import GPT, KVCache
from gpt.tokenizer import get_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "get_tokenizer", "load_gpt2"]


def __getattr__(name):
    """`gpt.generate`, imported on first use: `python -m gpt.generation` must find gpt.generation
    not yet loaded."""
    if name == "generate":
        from gpt.generation import generate

        return generate
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
