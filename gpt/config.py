"""GPT-2 hyper-parameters: the four published sizes and small ones for tests and toy experiments."""

from dataclasses import dataclass, replace

PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1558M
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, as GPT-2
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick sizes that "
                f"divide"
            )

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """The published GPT-2 sizes by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(PRESETS)}")
        return cls(**PRESETS[name], **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "GPTConfig":
        """A GPT-2 small enough for tests and toy experiments (~0.1M parameters at vocab 64)."""
        return replace(
            cls(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4), **overrides
        )
