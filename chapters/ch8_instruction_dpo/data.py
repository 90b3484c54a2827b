"""The instruction-preference data set of the report's experiment (§6.2): download, validation,
split, prompts, batches.

One prompt format (Alpaca style) serves SFT, DPO and evaluation alike: `format_prompt`. Responses
are tokenized apart from the prompt and end with EOS, so the prompt tokens are the same in all
three.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from gpt.download import DownloadError, fetch  # noqa: F401 (DownloadError: what callers catch)

URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
    "instruction-data-with-preference.json"
)
SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
CACHE = Path(__file__).resolve().parents[2] / "data" / "instruction-data-with-preference.json"
KEYS = ("instruction", "input", "output", "chosen", "rejected")
NON_EMPTY = (
    "instruction",
    "chosen",
    "rejected",
)  # `input` is empty in 775 entries; `output` is not used
SPLIT = (0.85, 0.05, 0.10)  # train, validation, test

PROMPT_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_file(path=None) -> Path:
    """The data file: `path` if given (read as is), else data/'s copy, downloaded once and checked
    against SHA256.

    The download is checked before it is renamed into data/ (gpt.download.fetch), so a bad one never
    stays there; its DownloadError names the URL, the reason and what to do.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"no data file at {path}; give the path of instruction-data-with-preference.json"
            )
        return path
    if not CACHE.is_file():
        try:
            fetch(URL, CACHE, sha256=SHA256, progress=False)
        except DownloadError as e:
            raise DownloadError(
                f"{e}. Run again, or fetch that URL by hand and put it at {CACHE}, "
                "or pass --data PATH"
            ) from None
    digest = sha256(CACHE)
    if digest != SHA256:
        raise ValueError(
            f"{CACHE} has sha256 {digest}, expected {SHA256}; delete it and run again to "
            f"re-download"
        )
    return CACHE


def validate(entries) -> list:
    """Check every entry's schema; raise ValueError with one line per bad entry saying which and
    why.
    """
    if not isinstance(entries, list):
        raise ValueError(
            f"the data set must be a JSON list of entries, got a JSON {type(entries).__name__}"
        )
    problems = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            problems.append(
                f"entry {i}: is a {type(e).__name__}, not an object with keys {', '.join(KEYS)}"
            )
            continue
        missing = [k for k in KEYS if k not in e]
        wrong = [k for k in KEYS if k in e and not isinstance(e[k], str)]
        empty = [k for k in NON_EMPTY if isinstance(e.get(k), str) and not e[k].strip()]
        if missing:
            problems.append(f"entry {i}: missing key(s) {', '.join(missing)}")
        if wrong:
            problems.append(
                f"entry {i}: "
                + ", ".join(f"'{k}' is a {type(e[k]).__name__}, not a string" for k in wrong)
            )
        if empty:
            problems.append(f"entry {i}: empty {', '.join(repr(k) for k in empty)}")
    if problems:
        raise ValueError(
            f"{len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'} in the data set:\n"
            + "\n".join(problems)
        )
    return entries


def deduplicate(entries) -> tuple:
    """(the entries with each exact duplicate dropped, keeping its first copy in file order, the
    number dropped). Two entries are duplicates when their instruction, input, chosen and rejected
    texts are all equal: the same preference pair, which a split by rows could put in train and in
    test alike."""
    seen, kept = set(), []
    for e in entries:
        key = tuple(e[k] for k in ("instruction", "input", "chosen", "rejected"))
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return kept, len(entries) - len(kept)


def load(path=None) -> list:
    """Fetch, parse and validate the data set, and drop its exact duplicates (`deduplicate`, said
    in one line) before anything splits it; a list of dicts with keys KEYS."""
    path = data_file(path)
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); re-download it or fix the file"
        ) from None
    entries, dropped = deduplicate(validate(entries))
    if dropped:
        print(
            f"data: dropped {dropped} exact duplicate entr{'y' if dropped == 1 else 'ies'} of "
            f"{len(entries) + dropped} in {path} (same instruction, input, chosen and rejected), "
            f"before the split, so that no pair sits in two splits; {len(entries)} left"
        )
    return entries


def prompt_key(entry) -> tuple:
    """What makes two entries the same prompt: their instruction and input."""
    return entry["instruction"], entry.get("input", "")


def split(entries, seed: int = 0) -> dict:
    """Seeded 85/5/10 split of the indices of `entries` into train, validation and test (disjoint,
    covering every index), by prompt: the rows are shuffled and cut 85/5/10, and every entry goes
    to the split where the first entry of its prompt (`prompt_key`) fell, so that no prompt is in
    two splits (a test prompt answered in train would inflate its win rate). With distinct prompts
    it is the plain row split."""
    n = len(entries)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train, n_val = round(SPLIT[0] * n), round(SPLIT[1] * n)
    cut = ["train"] * n_train + ["validation"] * n_val + ["test"] * (n - n_train - n_val)
    home, out = {}, {"train": [], "validation": [], "test": []}
    for i, name in zip(order, cut):
        out[home.setdefault(prompt_key(entries[i]), name)].append(i)
    return {name: sorted(indices) for name, indices in out.items()}


def has_preference(entry) -> bool:
    """False for the pairs whose chosen and rejected texts are identical: DPO has nothing to learn
    from them."""
    return entry["chosen"].strip() != entry["rejected"].strip()


def format_prompt(entry) -> str:
    """The Alpaca-style prompt; the response is written right after its last line."""
    text = f"{PROMPT_HEAD}\n\n### Instruction:\n{entry['instruction']}"
    if entry["input"].strip():
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


@dataclass
class Pair:
    """One preference pair as token ids; `chosen` and `rejected` end with EOS."""

    index: int  # entry index in the data set
    prompt: list
    chosen: list
    rejected: list

    @property
    def packed_length(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def tokenize(entries, indices, tokenizer, eos_id: int, max_length: int = 256) -> list:
    """Pairs for `indices`; a pair whose prompt + longer response exceeds `max_length` tokens is
    left out."""
    pairs = []
    for i in indices:
        e = entries[i]
        pair = Pair(
            i,
            tokenizer.encode(format_prompt(e)),
            tokenizer.encode(e["chosen"]) + [eos_id],
            tokenizer.encode(e["rejected"]) + [eos_id],
        )
        if pair.length <= max_length:
            pairs.append(pair)
    return pairs


def length_grouped_batches(
    lengths, batch_size: int, seed: int, shuffle: bool = True, window: int = 16
) -> list:
    """Batches of indices into `lengths` with similar lengths together (less padding), in a seeded
    random order.

    Indices are shuffled, cut into windows of `window` batches, sorted by length inside each window
    and cut into batches; the batches are shuffled again. Without `shuffle`, batches follow sorted
    length (for evaluation).
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
