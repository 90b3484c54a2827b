"""A minimal, hand-written GPT-2: config, model, checkpoint readers, tokenizer, generation."""
from gpt.checkpoint import load_gpt2
from gpt.config import GPTConfig
from gpt.generation import generate
from gpt.model import GPT, KVCache
from gpt.tokenizer import get_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "get_tokenizer", "load_gpt2"]
