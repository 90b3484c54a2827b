"""Chapter 8 (report §6.2): data, masks, SFT loss, the fast DPO step against the plain one, win
rates, --smoke, and the command line's refusals (one line each, before any training)."""

import copy
import csv
import json
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch8_instruction_dpo.__main__ as ch8
import gpt
import gpt.download
from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch4_dpo.loss import response_logprobs
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import win_rates
from chapters.ch8_instruction_dpo.dpo_step import (
    ReferenceCache,
    fast_dpo_loss,
    plain_dpo_loss,
    sequence_logprobs,
    token_kl,
)
from chapters.ch8_instruction_dpo.trainers import sft_batch, sft_loss, train_dpo
from chapters.common.files import plots_path
from chapters.common.rows import (
    packed_pairs_batch,
    pair_rows,
    prompt_response_rows,
    unpacked_pairs_batch,
)
from chapters.common.runtime import ChapterSkipped
from gpt import GPT, GPTConfig, get_tokenizer
from gpt.tokenizer import EOS_ID

needs_data = pytest.mark.skipif(
    not pdata.CACHE.is_file(), reason=f"data set not at {pdata.CACHE} (CI copies it there)"
)


@pytest.fixture(scope="module")
def entries():
    return pdata.load() if pdata.CACHE.is_file() else None


@pytest.fixture(scope="module")
def pairs(entries):
    """Four real training pairs: one with an input, one without, of different lengths."""
    if entries is None:
        pytest.skip("data set missing")
    train = pdata.split(entries)["train"]
    with_input = [i for i in train if entries[i]["input"]][:2]
    without = [i for i in train if not entries[i]["input"]][:2]
    return pdata.tokenize(entries, with_input + without, get_tokenizer(), EOS_ID)


def tiny(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return (
        GPT(GPTConfig.tiny(vocab_size=50257, n_positions=256, n_embd=16, n_layer=2, n_head=2))
        .to(dtype)
        .eval()
    )


# ---------------------------------------------------------------- data


@needs_data
def test_data_set_validates_and_has_the_six_identical_pairs(entries):
    assert len(entries) == 1100
    same = [i for i, e in enumerate(entries) if not pdata.has_preference(e)]
    assert same == [122, 226, 400, 566, 628, 676]  # as ../shared/data/README.md lists them


def test_bad_entries_give_one_clear_line_each():
    good = {
        "instruction": "Add 2 and 3.",
        "input": "",
        "output": "5",
        "chosen": "5.",
        "rejected": "Five, duh.",
    }
    bad = [
        good,
        {k: v for k, v in good.items() if k != "chosen"},
        {**good, "rejected": 7},
        {**good, "instruction": " "},
        "not an object",
    ]
    with pytest.raises(ValueError) as err:
        pdata.validate(bad)
    lines = str(err.value).splitlines()
    assert lines[0] == "4 bad entries in the data set:"
    assert lines[1:] == [
        "entry 1: missing key(s) chosen",
        "entry 2: 'rejected' is a int, not a string",
        "entry 3: empty 'instruction'",
        "entry 4: is a str, not an object with keys instruction, input, output, chosen, rejected",
    ]


def test_malformed_data_file_stops_the_chapter_with_one_error_line(tmp_path):
    path = tmp_path / "bad.json"
    good = {"instruction": "x", "input": "", "output": "", "chosen": "a", "rejected": "b"}
    path.write_text(
        json.dumps(
            [{k: v for k, v in good.items() if k != "rejected"}, good, {**good, "chosen": " "}]
        )
    )
    with pytest.raises(ValueError) as err:
        ch8.main(["--smoke", "--data", str(path), "--out", str(tmp_path)])
    assert (
        str(err.value)
        == "2 bad entries in the data set: entry 0: missing key(s) rejected; entry 2: empty "
        "'chosen'"
    )
    path.write_text(json.dumps([{}] * 5))
    with pytest.raises(
        ValueError, match=r"entries in the data set: entry 0: .*; entry 2: .*; and 2 more$"
    ) as err:
        ch8.main(["--smoke", "--data", str(path), "--out", str(tmp_path)])
    assert len(str(err.value).splitlines()) == 1


def test_download_is_hash_checked_and_offline_skips_the_chapter_with_one_line(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(pdata, "CACHE", tmp_path / "data.json")
    monkeypatch.setattr(
        gpt.download,
        "urlopen",
        lambda url, timeout: (_ for _ in ()).throw(urllib.error.URLError("offline")),
    )
    with pytest.raises(ChapterSkipped) as err:
        ch8.main(["--smoke", "--out", str(tmp_path)])
    assert len(str(err.value).splitlines()) == 1 and pdata.URL in str(err.value)
    pdata.CACHE.write_text("[]")  # a file that is not the published one
    with pytest.raises(ValueError, match="sha256"):
        pdata.data_file()


def test_split_is_seeded_disjoint_and_85_5_10():
    entries = ch8.distinct_prompts(1100)
    a, b, c = pdata.split(entries, seed=0), pdata.split(entries, seed=0), pdata.split(entries, 1)
    assert a == b and a != c
    sets = [set(a[k]) for k in ("train", "validation", "test")]
    assert [len(s) for s in sets] == [935, 55, 110]
    assert (
        set.union(*sets) == set(range(1100)) and sum(map(len, sets)) == 1100
    )  # disjoint and complete


def test_length_grouped_batches_cover_every_index_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=500).tolist()
    batches = pdata.length_grouped_batches(lengths, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(500))

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = rng.permutation(500).tolist()
    assert padding(batches) < 0.25 * padding([shuffled[s : s + 8] for s in range(0, 500, 8)])


# ---------------------------------------------------------------- masks and prompt format


@needs_data
def test_masks_on_real_examples_cover_exactly_the_response_and_eos(entries, pairs):
    tok = get_tokenizer()
    ids, att, resp = pair_rows(pairs, EOS_ID)  # (2B, T)
    B = len(pairs)
    for r in range(2 * B):
        p = pairs[r % B]
        e = entries[p.index]
        response = p.chosen if r < B else p.rejected
        n = len(p.prompt) + len(response)
        assert att[r].tolist() == [1] * n + [0] * (
            ids.shape[1] - n
        )  # prompt and response attended, padding not
        assert tok.decode(ids[r, : len(p.prompt)].tolist()) == pdata.format_prompt(e)
        assert (
            resp[r, : len(p.prompt)].sum() == 0 and resp[r, n:].sum() == 0
        )  # no prompt, no padding
        text = e["chosen"] if r < B else e["rejected"]
        assert tok.decode(ids[r][resp[r].bool()].tolist()) == text + "<|endoftext|>"
    # the packed layout predicts the same tokens: its plan targets decode to each response + EOS
    batch = packed_pairs_batch(pairs, EOS_ID)
    for s in range(2 * B):
        e = entries[pairs[s % B].index]
        assert (
            tok.decode(batch.targets[batch.seq == s].tolist())
            == (e["chosen"] if s < B else e["rejected"]) + "<|endoftext|>"
        )


@needs_data
def test_one_prompt_format_for_sft_dpo_and_evaluation(entries, pairs):
    tok = get_tokenizer()
    sft_ids, _, sft_resp = prompt_response_rows(
        [p.prompt for p in pairs], [p.chosen for p in pairs], EOS_ID
    )
    for r, p in enumerate(pairs):
        text = pdata.format_prompt(entries[p.index])
        assert text.startswith(pdata.PROMPT_HEAD) and text.endswith("### Response:\n")
        assert ("### Input:" in text) == bool(entries[p.index]["input"].strip())
        assert (
            sft_ids[r, : len(p.prompt)].tolist() == p.prompt == tok.encode(text)
        )  # SFT == DPO == generation prompt


# ---------------------------------------------------------------- SFT


@needs_data
def test_sft_loss_ignores_prompt_and_padding(pairs):
    model = tiny(0)
    ids, att, resp = prompt_response_rows(
        [p.prompt for p in pairs], [p.chosen for p in pairs], EOS_ID
    )
    loss = sft_loss(model, sft_batch(pairs, range(len(pairs)), EOS_ID, "cpu"))
    labels = ids.masked_fill(resp == 0, -100)[:, 1:]  # targets: response tokens only
    expected = F.cross_entropy(
        model(ids, att)[:, :-1].reshape(-1, 50257), labels.reshape(-1), ignore_index=-100
    )
    assert abs(loss.item() - expected.item()) < 1e-10
    all_tokens = F.cross_entropy(
        model(ids, att)[:, :-1].reshape(-1, 50257),
        ids.masked_fill(att == 0, -100)[:, 1:].reshape(-1),
    )
    assert abs(all_tokens.item() - expected.item()) > 1e-3  # prompt tokens would change it
    # a much longer row in the batch adds padding to the others; their response log-probs stay the
    # same
    longer = pairs + [pdata.Pair(-1, pairs[0].prompt * 2, pairs[0].chosen * 2, pairs[0].rejected)]
    sums, _ = sequence_logprobs(model, sft_batch(longer, range(len(longer)), EOS_ID, "cpu"))
    sums_alone, _ = sequence_logprobs(model, sft_batch(pairs, range(len(pairs)), EOS_ID, "cpu"))
    assert torch.allclose(sums[: len(pairs)], sums_alone, atol=1e-10)


# ---------------------------------------------------------------- the fast DPO step


@needs_data
def test_sequence_logprob_is_a_sum_over_response_tokens_unchanged_by_padding(pairs):
    """The report's code averaged over all positions, prompt and padding included; eq. (38) needs
    the sum."""
    model = tiny(1)
    ids, att, resp = pair_rows(pairs[:1], EOS_ID)
    logp = torch.log_softmax(model(ids, att), -1)[0]  # (T, V)
    by_hand = sum(logp[t - 1, ids[0, t]].item() for t in range(ids.shape[1]) if resp[0, t])
    alone, _ = sequence_logprobs(model, packed_pairs_batch(pairs[:1], EOS_ID))
    with_longer, _ = sequence_logprobs(model, packed_pairs_batch(pairs, EOS_ID))
    assert abs(alone[0].item() - by_hand) < 1e-10
    assert abs(with_longer[0].item() - by_hand) < 1e-10  # pair 0 in a padded batch of 4


@needs_data
def test_cached_and_live_reference_logprobs_agree(pairs):
    reference = tiny(2)
    cache = ReferenceCache(reference, pairs, EOS_ID, batch_size=3)
    ids, att, resp = pair_rows(pairs, EOS_ID)
    B = len(pairs)
    with torch.no_grad():
        live = response_logprobs(
            reference(ids, att), ids, resp
        )  # (2B,), full logits, ch4's function
    idx = [2, 0, 3, 1]
    ref_c, ref_r, ref_h = cache.get(idx)
    assert torch.allclose(ref_c, live[:B][idx], atol=1e-10) and torch.allclose(
        ref_r, live[B:][idx], atol=1e-10
    )
    # the cached hidden states give the reference's whole next-token distribution at each response
    # position
    batch = packed_pairs_batch([pairs[i] for i in idx], EOS_ID)
    _, live_logp = sequence_logprobs(reference, batch)
    assert torch.allclose(torch.log_softmax(ref_h @ cache.head_weight.T, -1), live_logp, atol=1e-10)


@needs_data
def test_fast_step_losses_and_gradients_equal_the_plain_step(pairs):
    reference = tiny(3)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a policy some steps away from the reference
    cache = ReferenceCache(reference, pairs, EOS_ID)
    idx = list(range(len(pairs)))
    ref_c, ref_r, _ = cache.get(idx)
    results = []
    for build in (packed_pairs_batch, unpacked_pairs_batch, None):
        policy.zero_grad()
        if build is None:
            loss = plain_dpo_loss(policy, reference, pairs, EOS_ID, beta=0.3)
        else:
            loss, _ = fast_dpo_loss(policy, build(pairs, EOS_ID), ref_c, ref_r, beta=0.3)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in policy.parameters()]))
    (packed, g_packed), (unpacked, g_unpacked), (plain, g_plain) = results
    assert abs(packed - plain) < 1e-12 and abs(unpacked - plain) < 1e-12
    for a, b, c in zip(g_packed, g_unpacked, g_plain):
        assert torch.allclose(a, c, atol=1e-12, rtol=1e-9) and torch.allclose(
            b, c, atol=1e-12, rtol=1e-9
        )
    assert (
        max(g.abs().max().item() for g in g_plain) > 1e-4
    )  # the gradients compared are not all zero


@needs_data
def test_first_dpo_step_loss_is_ln2_and_accuracy_zero_only_when_policy_starts_at_the_reference(
    pairs,
):
    """§6.2's code started the policy from base GPT-2 with reference = SFT; DPO starts both at
    π_SFT.
    """
    sft = tiny(4)
    cache = ReferenceCache(sft, pairs, EOS_ID)
    ref_c, ref_r, ref_h = cache.get(list(range(len(pairs))))
    batch = packed_pairs_batch(pairs, EOS_ID)
    loss, m = fast_dpo_loss(copy.deepcopy(sft), batch, ref_c, ref_r, 0.1, ref_h, cache.head_weight)
    assert (
        abs(loss.item() - math.log(2)) < 1e-12
        and m["rewards/accuracies"] == 0.0
        and abs(m["kl"]) < 1e-12
    )
    base = tiny(5)  # "base GPT-2": another model than the reference
    loss_base, m_base = fast_dpo_loss(base, batch, ref_c, ref_r, 0.1, ref_h, cache.head_weight)
    assert abs(loss_base.item() - math.log(2)) > 1e-3 and m_base["kl"] > 1e-3


def test_token_kl_matches_enumeration():
    rng = np.random.default_rng(0)
    p, q = (
        rng.dirichlet(np.ones(5), size=3),
        rng.dirichlet(np.ones(5), size=3),
    )  # (3 positions, 5 tokens)
    by_hand = [sum(p[n, v] * math.log(p[n, v] / q[n, v]) for v in range(5)) for n in range(3)]
    got = token_kl(torch.tensor(np.log(p)), torch.tensor(np.log(q)))
    assert np.allclose(got.numpy(), by_hand, atol=1e-14)


@needs_data
def test_dpo_training_keeps_the_reference_frozen_and_each_beta_starts_from_sft(pairs):
    sft = tiny(6, torch.float32).requires_grad_(False)
    before = {k: v.clone() for k, v in sft.state_dict().items()}
    caches = {
        "train": ReferenceCache(sft, pairs, EOS_ID),
        "validation": ReferenceCache(sft, pairs[:2], EOS_ID),
    }
    firsts = []
    for beta in (0.1, 1.0):
        policy, steps, epochs = train_dpo(
            sft,
            pairs,
            pairs[:2],
            caches,
            beta,
            epochs=1,
            lr=1e-3,
            batch_size=8,
            seed=0,
            device="cpu",
            pad_id=EOS_ID,
        )
        firsts.append(steps[0]["loss"])
        assert any(
            (a != b).any() for a, b in zip(policy.state_dict().values(), before.values())
        )  # the policy moved
    assert all(
        torch.equal(v, before[k]) for k, v in sft.state_dict().items()
    )  # the reference did not
    assert all(p.grad is None for p in sft.parameters())
    assert np.allclose(
        firsts, math.log(2), atol=1e-6
    )  # the second β did not continue from the first's policy


V_SMALL = (
    512  # the tests below fold GPT-2's token ids into a 512-token vocabulary: a head 100× cheaper
)


@pytest.fixture(scope="module")
def many_pairs(entries):
    """200 training pairs: at 8 pairs a batch, two shuffled windows of 16 batches
    (`length_grouped_batches`), so training's batches are not the sorted ones; token ids folded
    below V_SMALL."""
    if entries is None:
        pytest.skip("data set missing")

    def fold(ids):
        return [t % V_SMALL for t in ids]

    return [
        pdata.Pair(p.index, fold(p.prompt), fold(p.chosen), fold(p.rejected))
        for p in pdata.tokenize(
            entries, pdata.split(entries)["train"][:200], get_tokenizer(), EOS_ID
        )
    ]


def _sft_like(seed):
    """A float32 model in the state DPO starts from: dropout trained with, then switched off
    (`disable_dropout`)."""
    from chapters.ch8_instruction_dpo.miniature import disable_dropout

    torch.manual_seed(seed)
    config = GPTConfig.tiny(
        vocab_size=V_SMALL, n_positions=512, n_embd=64, n_layer=1, n_head=1, dropout=0.1
    )
    return disable_dropout(GPT(config).eval()).requires_grad_(False)


@needs_data
def test_train_cache_in_the_first_epochs_batches_makes_the_first_step_exactly_ln2_with_zero_margins(
    many_pairs,
):
    """At the first step the policy is the reference: a margin is 0 only if the policy's float32
    log-probs are the cache's bit for bit, i.e. computed on the same packed rows (attention's sums
    over a row depend on its padding). The control: for a training seed whose first batch a cache in
    sorted order rounds otherwise (a few % of the pairs are, here), the cache in the first epoch's
    batches still gives exactly ln 2 and margins of 0."""
    from chapters.ch8_instruction_dpo.dpo_step import evaluation_batches, first_epoch_batches
    from chapters.ch8_instruction_dpo.scaled_run import Scale

    ps, size, pad, val = many_pairs, 8, EOS_ID % V_SMALL, many_pairs[:16]
    sft = _sft_like(8)
    policy = copy.deepcopy(sft).requires_grad_(True).train()  # as train_dpo's first step runs it

    def margins(cache, idx):  # eq. (38)'s reward margins / β of the batch idx, per pair
        logps, _ = sequence_logprobs(policy, packed_pairs_batch([ps[i] for i in idx], pad))
        ref_c, ref_r, _ = cache.get(idx)
        return (logps[: len(idx)] - ref_c) - (logps[len(idx) :] - ref_r)

    by_length = ReferenceCache(sft, ps, pad, size)  # the order caches were built in before
    seed = next(
        (
            s
            for s in range(60)
            if margins(by_length, first_epoch_batches(ps, size, s)[0]).abs().max() > 0
        ),
        None,
    )
    assert seed is not None, (
        "no seed in 0..59 whose first batch a cache in sorted order rounds otherwise"
    )
    first = first_epoch_batches(ps, size, seed)[0]
    assert first not in evaluation_batches(ps, size)  # not the rows of any sorted batch
    caches = Scale().reference_caches(
        sft, {"train": ps, "validation": val}, pad, size, 512, seed=seed
    )
    assert torch.equal(margins(caches["train"], first), torch.zeros(size))
    _, steps, epochs = train_dpo(
        sft,
        ps,
        val,
        caches,
        0.1,
        epochs=1,
        lr=1e-3,
        batch_size=size,
        seed=seed,
        device="cpu",
        pad_id=pad,
    )
    ln2 = torch.log(torch.tensor(2.0)).item()  # float32's ln 2
    assert (
        steps[0]["loss"] == ln2
        and steps[0]["rewards/margins"] == 0.0
        and steps[0]["rewards/accuracies"] == 0.0
    )
    # epoch 0's validation reads the split in sorted batches, the validation cache's order: exact as
    # well
    assert (
        epochs[0]["loss"] == ln2
        and epochs[0]["rewards/margins"] == 0.0
        and epochs[0]["rewards/accuracies"] == 0.0
    )


@needs_data
def test_a_cache_built_in_another_order_is_stale(many_pairs, tmp_path):
    from chapters.ch8_instruction_dpo import reference_store

    sft, path = _sft_like(9), tmp_path / "reference_train.safetensors"
    fp = reference_store.reference_fingerprint(sft, many_pairs, max_length=512, batch_size=8)

    def build(seed):
        return reference_store.cached_reference(
            path, sft, many_pairs, 0, batch_size=8, fingerprint=fp, seed=seed, verbose=False
        )

    by_seed = build(0)
    with pytest.raises(
        ValueError, match=r"stale \(order: 'training epoch 1 of seed 0' there, 'by length' here\)"
    ):
        build(None)
    with pytest.raises(
        ValueError,
        match=r"stale \(order: 'training epoch 1 of seed 0' there, 'training epoch 1 of "
        r"seed 1' here\)",
    ):
        build(1)
    assert torch.equal(build(0).get([3])[0], by_seed.get([3])[0])  # the same order: reused
    with pytest.raises(ValueError, match="must hold each of the 200 pairs' indices once"):
        ReferenceCache(sft, many_pairs, 0, 8, batches=[[0, 1]])


# ---------------------------------------------------------------- win rates


def test_win_rate_counts_ties_as_half():
    sim_c = np.array([0.9, 0.2, 0.5, 0.5])
    sim_r = np.array([0.1, 0.8, 0.5, 0.4])
    assert win_rates.win_scores(sim_c, sim_r).tolist() == [
        1.0,
        0.0,
        0.5,
        1.0,
    ]  # the report's code scored the tie 0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = np.array([1.0, 0.0, 0.5] * 20 + [1.0] * 40)
    a, b = (
        win_rates.bootstrap_interval(scores, 2000, 0),
        win_rates.bootstrap_interval(scores, 2000, 0),
    )
    assert a == b and a[0] < scores.mean() < a[1]
    se = scores.std() / math.sqrt(len(scores))  # normal approximation, by hand
    assert abs((a[1] - a[0]) - 2 * 1.96 * se) < 0.3 * 2 * 1.96 * se


def test_sec62_higher_beta_means_lower_kl_at_the_optimum():
    """§6.2 says "higher β → higher KL"; eq. (36)'s optimum π* ∝ π_ref·exp(r/β) moves less from
    π_ref as β grows."""
    rng = np.random.default_rng(0)
    pi_ref, rewards = rng.dirichlet(np.ones(6), size=4), rng.normal(size=(4, 6))
    kls = []
    for beta in (0.1, 0.3, 0.7, 1.0):
        pi = optimal_policy(torch.tensor(pi_ref), torch.tensor(rewards), beta).numpy()  # float64
        kls.append(float((pi * np.log(pi / pi_ref)).sum(-1).mean()))
    assert all(a > b for a, b in zip(kls, kls[1:])), kls


# ---------------------------------------------------------------- the chapter


def test_weights_this_machine_cannot_download_skip_the_chapter_and_a_wrong_path_is_an_error(
    tmp_path, monkeypatch
):
    with pytest.raises(ValueError) as err:  # the user's mistake: an error, not `skipped`
        ch8.main(["--checkpoint", str(tmp_path / "no-such-gpt2")])
    assert len(str(err.value).splitlines()) == 1 and "no-such-gpt2" in str(err.value)

    def offline(name):
        raise gpt.download.DownloadError(f"could not download {name} (offline)")

    monkeypatch.setattr(gpt, "load_gpt2", offline)  # what this machine lacks: skipped
    with pytest.raises(ChapterSkipped) as err:
        ch8.main(["--model", "gpt2"])
    assert str(err.value) == "could not download gpt2 (offline)"


@needs_data
def test_smoke_runs_end_to_end_and_writes_every_figure_and_table(tmp_path, capsys):
    ch8.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "numbers mean nothing" in out
    for name in (
        "sft_epochs.csv",
        "dpo_steps.csv",
        "dpo_epochs.csv",
        "win_rates.csv",
        "win_rates.md",
        "generations.jsonl",
        "examples.md",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in (
        "ch8_dpo_training_smoke.png",
        "ch8_win_rates_smoke.png",
    ):  # the plots folder, never over real figures
        assert (plots_path() / name).stat().st_size > 0, name
    assert out.index("tables: ") < out.index(
        "figure: "
    )  # tables first: a figure that fails loses no table
    wins = list(csv.DictReader(open(tmp_path / "win_rates.csv")))
    models = ["SFT"] + [f"DPO β={b}" for b in ch8.BETAS]
    assert [(r["model"], float(r["temperature"])) for r in wins] == [
        (m, t) for m in models for t in ch8.TEMPERATURES
    ]
    steps = list(csv.DictReader(open(tmp_path / "dpo_steps.csv")))
    for (
        beta
    ) in ch8.BETAS:  # every β starts from the SFT model: its first step is at ln 2 with accuracy 0
        first = next(s for s in steps if float(s["beta"]) == beta)
        assert (
            abs(float(first["loss"]) - math.log(2)) < 1e-6
            and float(first["rewards/accuracies"]) == 0.0
        )


# ------------------------------------------------------ the command line refuses bad input up front


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--smoke", "--betas", "0.1", "0"], "--betas: must be > 0"),
        (["--smoke", "--betas", "-1"], "--betas: must be > 0"),
        (["--smoke", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--smoke", "--temperatures", "0", "-0.5"], "--temperatures: must be >= 0"),
        (["--smoke", "--temperatures", "nan"], "not a finite number"),
        (["--smoke", "--dpo-lr", "0"], "--dpo-lr: must be > 0"),
        (["--smoke", "--max-length", "0"], "--max-length: must be at least 1"),
        (["--model", "gpt3"], "invalid choice: 'gpt3'"),
        (["--smoke", "--device", "toaster"], "is not a torch device"),
    ]
    + (
        [(["--smoke", "--device", "cuda"], "this machine has no CUDA GPU")]
        if not torch.cuda.is_available()
        else []
    ),
)
def test_bad_arguments_are_one_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        ch8.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one error line
    assert (
        exit_.value.code == 2 and err[-1].startswith(f"{ch8.PROG}: error: ") and message in err[-1]
    ), err


def test_smoke_sets_only_the_settings_left_unset():
    args = ch8.parse_args(
        [
            "--smoke",
            "--sft-epochs",
            "3",
            "--dpo-lr",
            "0.25",
            "--n-boot",
            "7",
            "--max-new-tokens",
            "9",
        ]
    )
    assert (args.sft_epochs, args.dpo_lr, args.n_boot, args.max_new_tokens) == (
        3,
        0.25,
        7,
        9,
    )  # given: kept
    assert (args.dpo_epochs, args.sft_lr) == (2, 1e-3)  # not given: the smoke defaults
    full = ch8.parse_args(["--model", "gpt2"])
    assert (
        full.sft_epochs,
        full.dpo_epochs,
        full.sft_lr,
        full.dpo_lr,
        full.max_new_tokens,
        full.n_boot,
    ) == (2, 3, 5e-5, 5e-6, 64, 1000)


def _no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(ch8, "train_sft", fail)


def test_max_length_beyond_the_context_is_refused_before_the_data(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(
        ValueError, match="--max-length 257 exceeds the model's context of 256 tokens"
    ) as err:
        ch8.main(["--smoke", "--max-length", "257", "--out", str(tmp_path)])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "kind, entries, why",
    [  # --smoke keeps 16/2/2 of the 26/2/2 split of 30 entries
        (
            "empty",
            [],
            "of 0 entries (--smoke keeps at most 16/4/4) 0 have chosen == rejected and 0 are "
            "longer",
        ),
        (
            "identical",
            [
                {
                    "instruction": f"say {i}",
                    "input": "",
                    "output": "",
                    "chosen": "same",
                    "rejected": "same",
                }
                for i in range(30)
            ],
            "of 20 entries (--smoke keeps at most 16/4/4) 20 have chosen == rejected and 0",
        ),
        (
            "too long",
            [
                {
                    "instruction": f"{i} " + "word " * 300,  # 30 entries, not one repeated
                    "input": "",
                    "output": "",
                    "chosen": "a",
                    "rejected": "b",
                }
                for i in range(30)
            ],
            "16/4/4) 0 have chosen == rejected and 20 are longer than --max-length 256",
        ),
        (
            "too few",
            [
                {
                    "instruction": f"say {i}",
                    "input": "",
                    "output": "",
                    "chosen": "yes",
                    "rejected": "no",
                }
                for i in range(5)
            ],
            "leaving 4/0/1 (train/validation/test)",
        ),
    ],
)
def test_degenerate_data_sets_are_refused_in_one_line_before_training(
    kind, entries, why, tmp_path, monkeypatch
):
    _no_training(monkeypatch)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError) as err:
        ch8.main(["--smoke", "--data", str(path), "--out", str(tmp_path / "out")])
    message = str(err.value)
    assert len(message.splitlines()) == 1 and why in message, message
    assert f"at least {ch8.smallest_runnable_data_set()} entries with chosen ≠ rejected" in message
    assert ch8.smallest_runnable_data_set() == 11  # 9/1/1
    assert all(pdata.split(ch8.distinct_prompts(11)).values())
    assert not all(pdata.split(ch8.distinct_prompts(10)).values())
    assert not (tmp_path / "out").exists()  # nothing written


@needs_data
def test_unknown_sbert_offline_fails_in_one_line_without_retries(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.setattr(
        win_rates, "_hub_reachable", lambda timeout=3.0: False
    )  # offline, whatever this machine is
    with pytest.raises(
        ValueError, match="'no-such-sbert' is not in the local Hugging Face cache"
    ) as err:
        ch8.main(["--smoke", "--sbert", "no-such-sbert", "--out", str(tmp_path)])
    assert len(str(err.value).splitlines()) == 1


@needs_data
def test_unwritable_plots_or_out_folder_is_refused_before_training(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(
        "DPO_PLOTS_DIR", str(blocker / "plots")
    )  # a folder inside a file: never writable
    with pytest.raises(PermissionError, match="a-file") as err:
        ch8.main(["--smoke", "--out", str(tmp_path / "out")])
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path / "plots"))
    with pytest.raises(PermissionError, match="tables") as err:
        ch8.main(["--smoke", "--out", str(blocker / "out")])
