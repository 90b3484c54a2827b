"""Chapter 8 in miniature: the compact vocabulary, the authors' switches, the length control, the
ladder."""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch

from chapters.ch4_dpo.loss import response_logprobs, unshifted_logprobs
from chapters.ch8_instruction_dpo import authors_setup as au
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import length_control as lc
from chapters.ch8_instruction_dpo import miniature as mini
from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache
from chapters.ch8_instruction_dpo.trainers import dpo_step, sft_batch, sft_loss
from chapters.ch8_instruction_dpo.win_rates import win_scores
from chapters.common.rows import pair_rows
from gpt import GPT, GPTConfig, get_tokenizer
from gpt.tokenizer import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0


def tiny(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny()).double().eval()


def random_pairs(n, seed):
    """Pairs of random tokens: prompts of 2–4 tokens, responses of 1–5, so rows need padding."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        return torch.randint(
            1, 64, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g
        ).tolist()

    return [pdata.Pair(i, tokens(2, 4), tokens(1, 5), tokens(1, 5)) for i in range(n)]


# ---------------------------------------------------------------- the compact vocabulary


def test_compact_vocab_round_trips_seen_text_and_reads_unseen_tokens_as_unk():
    tok = get_tokenizer()
    texts = [
        "the cat sat on the mat.",
        "the cat ran.",
    ] * 2  # every token twice: all kept at min_count 2
    vocab = mini.CompactVocab(tok, texts, EOS_ID, min_count=2)
    assert vocab.decode(vocab.encode(texts[0])) == texts[0]
    assert set(vocab.gpt2_ids) == {t for text in texts for t in tok.encode(text)} | {EOS_ID}
    assert vocab.gpt2_ids[vocab.eos] == EOS_ID and vocab.unk == vocab.size - 1
    unseen = vocab.encode("the zebra")
    assert unseen[0] == vocab.index[tok.encode("the")[0]] and vocab.unk in unseen
    assert vocab.decode(unseen) == "the"  # UNK is dropped from decoded text


def test_compact_vocab_counts_only_the_texts_it_is_given():
    tok = get_tokenizer()
    vocab = mini.CompactVocab(tok, ["alpha beta", "alpha beta", "gamma"], EOS_ID, min_count=2)
    assert set(vocab.encode("gamma")) == {vocab.unk}  # seen once: below min_count
    assert set(vocab.gpt2_ids) == set(tok.encode("alpha beta")) | {EOS_ID}


def test_base_documents_make_every_token_of_prompt_and_both_responses_a_target():
    pairs = random_pairs(3, 0)
    docs = mini.base_documents(pairs, eos_id=PAD)
    assert len(docs) == 6
    batch = sft_batch(docs, range(6), PAD, "cpu")
    for s, doc in enumerate(docs):
        p = pairs[s // 2]
        assert batch.targets[batch.seq == s].tolist() == p.prompt + (
            p.chosen if s % 2 == 0 else p.rejected
        )


def test_unigram_baseline_matches_counting_by_hand():
    train = [pdata.Pair(0, [1], [2, 2, 3], []), pdata.Pair(1, [1], [3], [])]
    held = [pdata.Pair(2, [1], [2, 4], [])]
    V = 5  # add-one counts: token 0..4 -> 1, 1, 3, 3, 1 (sum 9)
    expected = -(math.log(3 / 9) + math.log(1 / 9)) / 2
    assert abs(mini.unigram_loss(train, held, V) - expected) < 1e-12


# -------------------------------------------------------- each switch changes exactly what it names


@pytest.fixture(scope="module")
def rows():
    pairs = random_pairs(4, 1)
    ids, att, resp = pair_rows(pairs, PAD)
    return pairs, ids, att, resp


def test_all_switches_off_give_eq38_sum_over_response_tokens(rows):
    _, ids, att, resp = rows
    model = tiny(0)
    with torch.no_grad():
        got = au.variant_logprobs(model, ids, att, resp, au.AuthorsSetup())
        assert torch.equal(got, response_logprobs(model(ids, att), ids, resp))


@pytest.mark.parametrize("switch", ["unshifted", "hide_response", "prompt_inside", "token_mean"])
def test_each_logprob_switch_gives_chapter4s_version_of_that_mistake_on_the_same_batch(
    rows, switch
):
    _, ids, att, resp = rows
    model = tiny(0)
    everything = torch.ones_like(resp)
    everything[:, 0] = False
    with torch.no_grad():
        logits = model(ids, att)
        expected = {
            "unshifted": lambda: unshifted_logprobs(logits, ids, resp),
            "hide_response": lambda: response_logprobs(model(ids, att * ~resp), ids, resp),
            "prompt_inside": lambda: response_logprobs(logits, ids, everything),
            "token_mean": lambda: response_logprobs(logits, ids, resp, per_token_mean=True),
        }[switch]()
        got = au.variant_logprobs(model, ids, att, resp, au.AuthorsSetup(**{switch: True}))
        correct = response_logprobs(logits, ids, resp)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert (got.double() - correct).abs().max() > 1e-3  # the mistake is visible on this batch


def test_the_four_logprob_switches_together_are_the_authors_get_log_prob(rows):
    """Their `get_log_prob`: log_softmax(logits)[labels] at the same position, mean over every
    position of the row, the response masked out of attention (chapter 4's 'all four')."""
    _, ids, att, resp = rows
    model = tiny(0)
    setup = au.AuthorsSetup(unshifted=True, hide_response=True, prompt_inside=True, token_mean=True)
    with torch.no_grad():
        got = au.variant_logprobs(model, ids, att, resp, setup)
        logp = torch.log_softmax(model(ids, att * ~resp), -1)  # (R, T, V)
        by_hand = torch.stack(
            [
                sum(logp[r, t, ids[r, t]] for t in range(ids.shape[1])) / ids.shape[1]
                for r in range(ids.shape[0])
            ]
        )
        assert torch.allclose(
            got,
            unshifted_logprobs(model(ids, att * ~resp), ids, torch.ones_like(resp)) / ids.shape[1],
        )
    assert torch.allclose(
        got.double(), by_hand, atol=1e-5, rtol=0
    )  # ch4's unshifted_logprobs works in float32


def test_authors_sft_loss_covers_prompt_and_padding(rows):
    pairs = rows[0]
    model = tiny(0)
    batch = sft_batch(pairs, range(len(pairs)), PAD, "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.input_ids, batch.attention_mask), -1)
        ids = batch.input_ids
        by_hand = -np.mean(
            [
                logp[r, t - 1, ids[r, t]].item()
                for r in range(ids.shape[0])
                for t in range(1, ids.shape[1])
            ]
        )
        assert abs(au.authors_sft_loss(model, batch).item() - by_hand) < 1e-12
        assert (
            abs(sft_loss(model, batch).item() - by_hand) > 1e-3
        )  # ours scores the response tokens only


def test_reference_grad_switch_changes_only_whether_the_reference_gets_gradients(rows):
    pairs = rows[0]
    reference = tiny(2)
    cache = ReferenceCache(reference, pairs, PAD)
    idx = list(range(len(pairs)))
    losses = {}
    for grad in (False, True):
        torch.manual_seed(0)
        policy = copy.deepcopy(reference).requires_grad_(True)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ref = copy.deepcopy(reference).requires_grad_(True)
        setup = au.AuthorsSetup(unshifted=True, reference_grad=grad)
        loss, _ = au.make_dpo_step(setup, ref)(policy, pairs, idx, cache, 0.5, "cpu", PAD)
        loss.backward()
        losses[grad] = loss.item()
        assert all((p.grad is not None) == grad for p in ref.parameters())
    assert losses[False] == losses[True]


def test_switches_off_use_the_fast_step_and_the_plain_step_matches_it():
    pairs = random_pairs(4, 3)
    reference = tiny(3)
    cache = ReferenceCache(reference, pairs, PAD)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert au.make_dpo_step(au.AuthorsSetup(), reference) is dpo_step
    fast, m_fast = dpo_step(policy, pairs, [0, 1, 2, 3], cache, 0.3, "cpu", PAD)
    plain, m_plain = au.make_dpo_step(au.AuthorsSetup(reference_grad=True), reference)(
        policy, pairs, [0, 1, 2, 3], cache, 0.3, "cpu", PAD
    )
    assert abs(fast.item() - plain.item()) < 1e-12
    assert all(abs(m_fast[k] - m_plain[k]) < 1e-10 for k in m_fast)


def test_eval_whole_data_draws_from_every_entry_of_the_data_set():
    test = list(range(990, 1100))
    assert au.evaluation_indices(1100, test, au.AuthorsSetup(), 0) == test
    drawn = au.evaluation_indices(1100, test, au.AuthorsSetup(eval_whole_data=True), 0)
    assert (
        len(drawn) == au.EVAL_SAMPLE == len(set(drawn)) and min(drawn) < 990
    )  # training entries included
    assert drawn == au.evaluation_indices(
        1100, test, au.AuthorsSetup(eval_whole_data=True), 0
    )  # seeded here


def test_a_tie_scores_half_here_and_zero_with_the_authors_rule():
    sim_c, sim_r = np.array([0.9, 0.5, 0.2, 0.4]), np.array([0.1, 0.5, 0.8, 0.4])
    assert win_scores(sim_c, sim_r).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert win_scores(sim_c, sim_r, tie=0.0).tolist() == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]  # their cos(g, c) > cos(g, r)


def test_ladder_fixes_one_mistake_per_rung_from_the_authors_setup_to_ours():
    rungs = au.ladder()
    assert rungs[0][1] == au.AuthorsSetup.authors() and rungs[-1][1] == au.AuthorsSetup()
    for (_, a), (_, b) in zip(rungs, rungs[1:]):
        assert len(a.on) - len(b.on) == 1 and set(b.on) < set(a.on)
    assert len(rungs) == len(au.AuthorsSetup.authors().on) + 1


# ---------------------------------------------------------------- length control


def test_length_controlled_win_rate_equals_the_raw_one_when_lengths_are_equal():
    rng = np.random.default_rng(0)
    scores = rng.choice([0.0, 0.5, 1.0], size=50)
    chosen = rng.integers(5, 40, size=50)
    same = lc.length_controlled_win_rate(
        scores, rng.integers(5, 40, size=50), chosen, chosen
    )  # ℓ_c = ℓ_r: d = 0
    assert same == scores.mean()
    as_long = lc.length_controlled_win_rate(scores, chosen, chosen, chosen)
    assert as_long == scores.mean()


def test_length_controlled_win_rate_moves_against_a_length_advantage():
    """Constructed: 40 prompts where the generation is as long as the chosen response (d > 0) and
    wins 90% of the time, 10 where it is as long as the rejected one (d < 0) and wins 30%: raw 0.78.
    By hand: x takes two values ±tanh(10/8) (d = ±10, std 8), so the least-squares line joins the
    two groups' rates and is 0.6 at x = 0."""
    chosen, rejected = np.full(50, 20), np.full(50, 10)
    gen = np.r_[np.full(40, 20), np.full(10, 10)]
    scores = np.r_[np.ones(36), np.zeros(4), np.ones(3), np.zeros(7)]
    raw = scores.mean()
    got = lc.length_controlled_win_rate(scores, gen, chosen, rejected)
    assert abs(raw - 0.78) < 1e-12 and abs(got - 0.6) < 1e-12
    # the mirror image: 40 generations as long as the rejected response win 30%, 10 as long as the
    # chosen win 90%
    gen = np.r_[np.full(40, 10), np.full(10, 20)]
    scores = np.r_[np.ones(12), np.zeros(28), np.ones(9), np.zeros(1)]
    got = lc.length_controlled_win_rate(scores, gen, chosen, rejected)
    assert abs(scores.mean() - 0.42) < 1e-12 and abs(got - 0.6) < 1e-12


# ---------------------------------------------------------------- the pipeline, tiny

needs_data = pytest.mark.skipif(
    not pdata.CACHE.is_file(), reason=f"data set not at {pdata.CACHE} (CI copies it there)"
)
TINY = dict(n_embd=16, n_layer=1, n_head=2, n_positions=192, dropout=0.1)
N_ENTRIES = 60
TINY_ARGS = [
    "--base-epochs",
    "1",
    "--sft-epochs",
    "1",
    "--dpo-epochs",
    "1",
    "--betas",
    "0.1",
    "0.5",
    "--temperatures",
    "0",
    "--max-new-tokens",
    "4",
    "--n-boot",
    "20",
    "--batch-size",
    "16",
]


class LetterSbert:
    """A stand-in for SBERT: unit vectors of letter counts (deterministic, instant)."""

    def encode(self, texts, **_):
        counts = np.array(
            [[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] + [1] for t in texts], float
        )
        return counts / np.linalg.norm(counts, axis=1, keepdims=True)


def run_tiny(tmp, *extra, setup=None):
    """ch8.main on the first N_ENTRIES entries with a tiny miniature; returns the output folder.
    Records the entry indices every trainer saw in `seen` (stage -> set)."""
    import chapters.ch8_instruction_dpo.__main__ as ch8

    seen = {}

    def spy(stage, fn, pos):
        def wrapped(*args, **kwargs):
            seen.setdefault(stage, set()).update(p.index for p in args[pos])
            return fn(*args, **kwargs)

        return wrapped

    data = tmp / "data.json"
    data.write_text(json.dumps(pdata.load()[:N_ENTRIES]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "DPO_PLOTS_DIR", str(tmp / "plots")
        )  # module-scoped callers run before conftest's autouse fixture
        mp.setattr(mini, "CONFIG", TINY)
        mp.setattr(ch8, "load_sbert", lambda name, device: LetterSbert())
        mp.setattr(mini, "train_sft", spy("base", mini.train_sft, 1))
        mp.setattr(ch8, "train_sft", spy("sft", ch8.train_sft, 1))
        mp.setattr(ch8, "train_dpo", spy("dpo", ch8.train_dpo, 1))
        if setup is not None:
            mp.setattr(au.AuthorsSetup, "authors", classmethod(lambda cls: setup))
        ch8.main(
            ["--miniature", "--data", str(data), "--out", str(tmp / "out"), *TINY_ARGS, *extra]
        )
    return tmp / "out", seen


def rows_of(path):
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not pdata.CACHE.is_file():
        pytest.skip("data set missing")
    return run_tiny(tmp_path_factory.mktemp("tiny"))


@needs_data
def test_the_three_stages_train_only_on_the_training_split(tiny_run):
    _, seen = tiny_run
    train = set(pdata.split(pdata.load()[:N_ENTRIES])["train"])
    assert set(seen) == {"base", "sft", "dpo"}
    for stage, indices in seen.items():
        assert indices <= train, stage
    assert (
        seen["base"] == seen["sft"]
    )  # every training pair's texts, both responses, went into the base model


@needs_data
def test_compact_vocab_is_counted_on_the_training_split_only():
    entries = pdata.load()[:N_ENTRIES]
    split = pdata.split(entries)
    texts = mini.training_texts(entries, split["train"])
    assert len(texts) == 3 * len(split["train"])
    held_out = {pdata.format_prompt(entries[i]) for i in split["test"]} | {
        entries[i]["chosen"] for i in split["test"]
    }
    assert not held_out & set(texts)


@needs_data
def test_miniature_dpo_starts_at_ln2_with_accuracy_zero_for_every_beta(tiny_run):
    out, _ = tiny_run
    steps = rows_of(out / "dpo_steps.csv")
    for beta in ("0.1", "0.5"):
        first = next(s for s in steps if s["beta"] == beta)
        assert (
            abs(float(first["loss"]) - math.log(2)) < 1e-6
            and float(first["rewards/accuracies"]) == 0.0
        )


@needs_data
def test_win_rate_table_has_length_and_length_controlled_columns(tiny_run):
    out, _ = tiny_run
    for row in rows_of(out / "win_rates.csv"):
        assert float(row["mean_length"]) >= 0 and 0 <= float(row["lc_win_rate"]) <= 1


@needs_data
def test_the_ladders_last_rung_equals_the_normal_pipelines_numbers(tiny_run, tmp_path):
    out, _ = tiny_run
    ladder_out, _ = run_tiny(tmp_path, "--ladder")
    rungs = rows_of(ladder_out / "ladder.csv")
    assert [r["rung"] for r in rungs] == [name for name, _ in au.ladder()]
    last = rungs[-1]
    assert last["mistakes_on"] == "none"
    epochs = [e for e in rows_of(out / "dpo_epochs.csv") if e["beta"] == "0.5"]
    final = {s: [e for e in epochs if e["split"] == s][-1] for s in ("train", "validation")}
    win = next(
        r
        for r in rows_of(out / "win_rates.csv")
        if r["model"] == "DPO β=0.5" and r["temperature"] == "0.0"
    )
    expected = {
        "first_loss": rows_of(out / "dpo_steps.csv")[0]["loss"],
        "train_loss": final["train"]["loss"],
        "validation_loss": final["validation"]["loss"],
        "validation_accuracy": final["validation"]["rewards/accuracies"],
        "validation_kl": final["validation"]["kl"],
        "mean_length": win["mean_length"],
        "win_rate": win["win_rate"],
        "lc_win_rate": win["lc_win_rate"],
    }
    for key, value in expected.items():
        assert abs(float(last[key]) - float(value)) < 1e-9, key
    first = rungs[
        0
    ]  # the authors' setup: reference = base model, so the first DPO loss is not ln 2
    assert abs(float(first["first_loss"]) - math.log(2)) > 1e-6 and int(first["n"]) > int(last["n"])


@needs_data
def test_continue_beta_switch_starts_the_second_beta_where_the_first_ended(tmp_path):
    out, _ = run_tiny(
        tmp_path,
        "--authors-setup",
        "--betas",
        "0.1",
        "0.5",
        setup=au.AuthorsSetup(continue_beta=True),
    )
    steps = rows_of(out / "dpo_steps.csv")
    firsts = [float(next(s for s in steps if s["beta"] == b)["loss"]) for b in ("0.1", "0.5")]
    assert abs(firsts[0] - math.log(2)) < 1e-6 and abs(firsts[1] - math.log(2)) > 1e-6


def test_no_model_named_and_no_weights_cached_runs_the_miniature(monkeypatch):
    import chapters.ch8_instruction_dpo.__main__ as ch8

    monkeypatch.setattr(mini, "weights_cached", lambda name: False)
    args = ch8.parse_args([])
    assert (
        args.miniature
        and args.model is None
        and args.tag == "miniature"
        and args.suffix == "_miniature"
    )
    assert (args.sft_lr, args.dpo_lr, args.max_length) == tuple(
        ch8.DEFAULTS[k][2] for k in ("sft_lr", "dpo_lr", "max_length")
    )
    monkeypatch.setattr(mini, "weights_cached", lambda name: name == "gpt2-medium")
    args = ch8.parse_args([])
    assert (
        not args.miniature
        and args.model == "gpt2-medium"
        and args.sft_lr == ch8.DEFAULTS["sft_lr"][0]
    )
    assert ch8.parse_args(["--miniature", "--ladder"]).betas == list(ch8.AUTHORS_BETAS)
    assert (
        ch8.parse_args(["--miniature", "--sft-lr", "0.01"]).sft_lr == 0.01
    )  # the command line wins
