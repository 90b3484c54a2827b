"""The offline tiktoken GPT-2 tokenizer equals transformers' GPT2TokenizerFast built from the same
files."""

import json
from pathlib import Path

import pytest
from transformers import GPT2TokenizerFast

from gpt.tokenizer import EOS_ID, bpe_files_dir, get_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data" / "instruction-data-with-preference.json"
CORPUS = [
    "Hello, world!",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "I'm, you're, he's, we've, they'll, she'd, can't",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, ﬁ ligature",
    "Numbers 1234567890 3.14159 1,000,000 -42",
    "def f(x):\n    return x ** 2  # code\n\tif x: pass",
    '<html><body class="a">&amp;</body></html>',
    "      ",
    "",
    "a" * 300,
    "Zero-width\u200bspace and \u00a0nbsp",
]


@pytest.fixture(scope="module")
def reference():
    folder = bpe_files_dir()
    vocab = json.loads((folder / "encoder.json").read_text())
    merges = [
        tuple(line.split()) for line in (folder / "vocab.bpe").read_text().split("\n")[1:-1]
    ]  # skip "#version"
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def preference_texts():
    entries = json.loads(DATA.read_text())
    return [
        e[key] for e in entries for key in ("instruction", "input", "output", "chosen", "rejected")
    ]


def test_endoftext_is_50256_and_vocab_is_50257():
    tok = get_tokenizer()
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", allowed_special="all") == [EOS_ID] == [50256]


@pytest.mark.parametrize("text", CORPUS)
def test_matches_transformers_and_round_trips_on_varied_text(reference, text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert ids == reference(text)["input_ids"]
    assert tok.decode(ids) == text


def test_matches_transformers_on_every_text_of_the_preference_data(reference):
    if not DATA.exists():
        pytest.skip(f"{DATA} is missing: copy ../shared/data/*.json into data/ (as .ci/run does)")
    texts = preference_texts()
    assert len(texts) == 5500
    tok = get_tokenizer()
    ours = tok.encode_ordinary_batch(texts)
    theirs = reference(texts)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]!r}"
    assert all(tok.decode(ids) == t for t, ids in zip(texts, ours))


def test_a_corrupted_bpe_file_is_refused(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        (tmp_path / name).write_bytes((bpe_files_dir() / name).read_bytes())
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="vocab.bpe has sha256 .* not OpenAI's"):
        get_tokenizer(tmp_path)
