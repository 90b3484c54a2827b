"""Chapter 12: offline, iterative and online DPO on exact worlds (float64, tabular, seconds)."""

import contextlib
import io
import math
import random
import string
from dataclasses import replace

import numpy as np
import pytest
import torch

from chapters.ch8_instruction_dpo.data import Pair
from chapters.ch8_instruction_dpo.miniature import disable_dropout
from chapters.ch12_online_dpo import (
    bt_labeller,
    compare_schedules,
    covered_world,
    empirical_dpo_gradient,
    empirical_dpo_loss,
    frontier,
    hidden_best_world,
    minimiser_at_infinity,
    newton_fit,
    offline_dpo,
    pair_distribution,
    preference_rounds,
    sample_pairs,
)
from chapters.ch12_online_dpo.__main__ import main
from chapters.ch12_online_dpo.miniature_online import (
    QUICK,
    Clock,
    Settings,
    closer_wins,
    compare_on_miniature,
    cut_at_eos,
    labelled_pairs,
    prepare,
    run_online,
    sbert_judge,
)
from gpt import GPT, GPTConfig
from gpt.cli import run

DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_prompt_world():
    """A world with a leading prompt axis: π_ref, r* (2, 5), β."""
    pi_ref = torch.tensor([[0.4, 0.25, 0.2, 0.1, 0.05], [0.1, 0.2, 0.3, 0.3, 0.1]], dtype=DT)
    rewards = torch.tensor([[0.0, 1.0, -0.5, 2.0, 0.3], [1.0, 0.0, 0.5, -1.0, 2.0]], dtype=DT)
    return pi_ref, rewards, 0.7


def by_hand_optimum(pi_ref, rewards, beta):
    """Eq. (36) written out: π_ref·exp(r/β), divided by its sum, entry by entry."""
    weights = [
        [p * math.exp(r / beta) for p, r in zip(row_p, row_r)]
        for row_p, row_r in zip(pi_ref.tolist(), rewards.tolist())
    ]
    return torch.tensor([[w / sum(row) for w in row] for row in weights], dtype=DT)


@pytest.mark.parametrize("rounds", [1, 4])
def test_infinite_data_offline_and_iterative_dpo_reach_pi_star(rounds):
    for pi_ref, rewards, beta in [
        two_prompt_world(),
        (hidden_best_world().pi_ref[None], hidden_best_world().rewards[None], 0.5),
    ]:
        policies = preference_rounds(
            pi_ref, rewards, beta, budget=100, rounds=rounds, seed=0, l2=0.0, expected=True
        )
        star = by_hand_optimum(pi_ref, rewards, beta)
        assert len(policies) == rounds
        assert (policies[-1] - star).abs().max() < 1e-6


def test_infinite_data_online_dpo_one_step_per_fresh_pair_reaches_pi_star():
    pi_ref, rewards, beta = two_prompt_world()
    policies = preference_rounds(
        pi_ref,
        rewards,
        beta,
        budget=1000,
        rounds=1000,
        seed=0,
        steps_per_round=1,
        lr=10.0,
        l2=0.0,
        keep_pairs=False,
        expected=True,
    )
    star = by_hand_optimum(pi_ref, rewards, beta)
    assert (policies[0] - star).abs().max() > 1e-3  # one step is not enough: the test can fail
    assert (policies[-1] - star).abs().max() < 1e-6


def test_one_round_is_offline_dpo_exactly():
    world = hidden_best_world()
    pi_ref, rewards, beta = two_prompt_world()
    for ref, r, b in [(world.pi_ref, world.rewards, world.beta), (pi_ref, rewards, beta)]:
        for seed in (0, 3):
            (one_round,) = preference_rounds(ref, r, b, budget=64, rounds=1, seed=seed)
            assert one_round.shape == ref.shape
            assert torch.equal(one_round, offline_dpo(ref, r, b, budget=64, seed=seed))


def test_iterative_first_round_is_offline_dpo_on_its_share():
    world = covered_world()
    rounds = preference_rounds(world.pi_ref, world.rewards, world.beta, 64, 4, seed=5)
    assert torch.equal(rounds[0], offline_dpo(world.pi_ref, world.rewards, world.beta, 16, 5))


def test_eq23_labeller_win_frequencies_match_sigmoid_of_reward_gap():
    rewards = torch.tensor([[0.0, 0.7, -1.2], [2.0, 0.0, 0.4]], dtype=DT)
    label = bt_labeller(rewards, torch.Generator().manual_seed(0))
    n = 20000
    for x, a, b in [(0, 1, 0), (0, 2, 1), (1, 0, 1), (1, 2, 2)]:
        wins = label(torch.full((n,), a), torch.full((n,), b), torch.full((n,), x))
        p = 1 / (1 + math.exp(-(rewards[x, a].item() - rewards[x, b].item())))
        assert wins.dtype == torch.bool
        assert abs(wins.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_pairs_are_two_different_responses_drawn_in_proportion_to_pi():
    pi = torch.tensor([[0.7, 0.2, 0.1]], dtype=DT)
    by_hand = torch.tensor([[[0, 0.14, 0.07], [0.14, 0, 0.02], [0.07, 0.02, 0]]], dtype=DT) / 0.46
    assert torch.allclose(pair_distribution(pi), by_hand, atol=1e-15)
    prompts, a, b = sample_pairs(pi, 5000, torch.Generator().manual_seed(0))
    assert (a != b).all() and (prompts == 0).all()


def test_same_seed_same_numbers_other_seed_other_numbers():
    world = hidden_best_world()
    args = (world.pi_ref, world.rewards, world.beta, 40)

    def run(seed, **kw):
        return preference_rounds(*args, rounds=4, seed=seed, **kw)

    for kw in ({}, {"steps_per_round": 3, "keep_pairs": False}):
        first, again, other = run(1, **kw), run(1, **kw), run(2, **kw)
        assert all(torch.equal(p, q) for p, q in zip(first, again))
        assert not torch.equal(first[-1], other[-1])


def test_eq41_gradient_on_counts_matches_autograd_of_eq38():
    pi_ref, rewards, beta = two_prompt_world()
    counts = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    theta = torch.log(pi_ref) + torch.randn(
        2, 5, generator=torch.Generator().manual_seed(1), dtype=DT
    )
    leaf = theta.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(
        empirical_dpo_loss(leaf, torch.log(pi_ref), counts, beta, 0.1), leaf
    )
    closed = empirical_dpo_gradient(theta, torch.log(pi_ref), counts, beta, 0.1)
    assert torch.allclose(closed, auto, atol=1e-14, rtol=0)


def test_minimiser_is_at_infinity_exactly_when_some_win_is_never_returned():
    log_ref = torch.log(torch.full((1, 3), 1 / 3, dtype=DT))
    both_ways = torch.zeros(1, 3, 3, dtype=DT)
    both_ways[0, 0, 1] = both_ways[0, 1, 0] = 1.0  # 0 beat 1 once, 1 beat 0 once
    one_way = both_ways.clone()
    one_way[0, 2, 0] = 1.0  # 2 beat 0 and never lost
    assert not minimiser_at_infinity(both_ways) and minimiser_at_infinity(one_way)
    cycle = one_way.clone()
    cycle[0, 1, 2] = 1.0  # now 0 -> 1 -> 2 -> 0: every win lies on a cycle
    assert not minimiser_at_infinity(cycle)
    for counts, finite in [(both_ways, True), (one_way, False), (cycle, True)]:
        short, long = (newton_fit(log_ref, log_ref, counts, 1.0, 0.0, max_iter=n) for n in (10, 60))
        spread = [(t - log_ref).max() - (t - log_ref).min() for t in (short, long)]
        if finite:  # converged: more Newton steps change nothing
            assert (short - long).abs().max() < 1e-9 and spread[1] < 5
        else:  # the winner's logit keeps climbing, about one unit per Newton step
            assert spread[1] > spread[0] + 5


def test_frontier_bounds_the_kl_regularised_objective_of_every_policy():
    world = hidden_best_world()
    betas = torch.logspace(-1, 1, 9, dtype=DT)
    front = frontier(world, betas)
    policies = preference_rounds(world.pi_ref, world.rewards, world.beta, 32, 4, seed=0)
    policies += list(
        torch.softmax(torch.randn(20, 8, generator=torch.Generator().manual_seed(0), dtype=DT), -1)
    )
    for pi in policies:
        reward = sum(p * r for p, r in zip(pi.tolist(), world.rewards.tolist()))
        kl = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), world.pi_ref.tolist()))
        for b, r_star, kl_star in zip(
            betas.tolist(), front["reward"].tolist(), front["kl_to_ref"].tolist()
        ):
            assert reward - b * kl <= r_star - b * kl_star + 1e-12


def test_experiment_spends_the_same_labels_and_reports_intervals():
    result = compare_schedules(covered_world(), budget=12, seeds=3, iterations=3, online_lrs=(1.0,))
    assert set(result["schedules"]) == {"offline", "iterative", "online lr=1"}
    for name, rounds in [("offline", 1), ("iterative", 3), ("online lr=1", 12)]:
        s = result["schedules"][name]
        assert s["rounds"] == s["labeller_calls"] == rounds and s["pairs"][-1] == 12
        for interval in s["metrics"].values():
            assert len(interval["mean"]) == rounds
            assert all(
                lo <= m <= hi
                for lo, m, hi in zip(interval["low"], interval["mean"], interval["high"])
            )
    assert result["optimum"]["kl_to_optimum"] < 1e-12


@pytest.mark.parametrize(
    "change, message",
    [
        ({"budget": 3, "rounds": 4}, "budget (3 pairs) < rounds (4)"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"pi_ref": torch.tensor([0.5, 0.3, 0.3], dtype=DT)}, "sum to 1"),
        ({"pi_ref": torch.tensor([1.2, -0.2, 0.0], dtype=DT)}, "positive mass"),
        ({"rewards": torch.zeros(4, dtype=DT)}, "must have pi_ref's shape"),
        ({"steps_per_round": 0}, "steps_per_round"),
    ],
)
def test_bad_arguments_give_one_line_errors(change, message):
    args = {
        "pi_ref": torch.tensor([0.5, 0.3, 0.2], dtype=DT),
        "rewards": torch.tensor([0.0, 1.0, -1.0], dtype=DT),
        "beta": 1.0,
        "budget": 8,
        "rounds": 2,
        "seed": 0,
    } | change
    with pytest.raises(ValueError) as error:
        preference_rounds(**args)
    assert message in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------ the run: python -m chapters.ch12_online_dpo
def _main_output(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def missing_data(tmp_path_factory):
    """A --data path with no file: section 5 (the miniature) says so in one line, the rest runs."""
    return str(tmp_path_factory.mktemp("ch12_data") / "missing.json")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, missing_data):
    with pytest.MonkeyPatch.context() as mp:
        plots = tmp_path_factory.mktemp("ch12_plots")
        mp.setenv("DPO_PLOTS_DIR", str(plots))
        result, text = _main_output(["--quick", "--data", missing_data])
    return result, text, plots


def test_quick_run_prints_each_claim_beside_its_check_and_writes_both_figures(quick_run):
    result, text, plots = quick_run
    for line in [
        "settings: budget 64 labelled pairs per schedule; seeds 0–9 (10 runs each)",
        "every frequency within 4 standard errors of σ(Δr*): True",
        "offline and iterative reach π* to < 1e-6: True",
        "max |Δπ| = 0.0; identical bit for bit: True",
        "iterative's first round = offline DPO on its share (16 pairs): 6 of 6",
        "--- 3. the hidden best world",
        "--- 3. the covered world",
        "every point on or below it: True",
        "vs offline, 95%: closer to π*:",
        "--- 4. the prior's weight in the hidden best world",
        "--- 5. the miniature: online DPO with a Sentence-BERT judge",
    ]:
        assert line in text, line
    skipped = [l for l in text.splitlines() if l.startswith("  skipped: no data set at")]
    assert len(skipped) == 1 and result["miniature"] is None  # one line, and the rest ran
    for name in ("ch12_kl_to_optimum_quick.png", "ch12_frontier_quick.png"):
        assert (plots / name).stat().st_size > 10_000
        assert f"figure: {plots / name}" in text
    assert set(result["worlds"]) == {"hidden_best", "covered"}
    for world in result["worlds"].values():
        assert world["seeds"] == 10 and world["budget"] == 64
        calls = {n: s["labeller_calls"] for n, s in world["schedules"].items()}
        assert calls == {"offline": 1, "iterative": 4, "online lr=0.5": 64, "online lr=2": 64}
        assert all(s["pairs"][-1] == 64 for s in world["schedules"].values())
        assert min(world["frontier_gaps"].values()) > -1e-9  # no mean point above the frontier
    assert result["limit"]["k1_gap"] == 0.0 and result["labeller_worst_z"] < 4
    assert set(result["sweep"]) == {1e-2, 1e-3, 1e-4, 1e-5}


def test_quick_run_is_deterministic(quick_run, missing_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path))

    def numbers(text):  # all but the timing and where the figures went
        return [l for l in text.splitlines() if not l.startswith(("done in", "figure: "))]

    assert numbers(_main_output(["--quick", "--data", missing_data])[1]) == numbers(quick_run[1])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--budget", "3"], "error: budget (3 pairs) < rounds (4)"),  # the library's ValueError
        (["--budget", "0"], "argument --budget: must be at least 1, got 0"),
        (["--seeds", "1"], "argument --seeds: must be at least 2 for an interval, got 1"),
        (["--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
        (["--seeds", "two"], "argument --seeds: 'two' is not an integer"),
        (["--quick", "--full-miniature"], "argument --full-miniature: not with --quick"),
    ],
)
def test_bad_flags_give_one_error_line(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        run(main, argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in captured.err
    assert captured.out == ""  # refused before any work


# ------------------------------------- the miniature: online DPO with a Sentence-BERT judge
class BagOfLetters:
    """A stub sentence encoder (sentence-transformers' `encode`): letter counts, + 1 so that no
    vector is zero, normalised."""

    def encode(self, texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64):
        counts = [[t.lower().count(c) for c in string.ascii_lowercase] + [1] for t in texts]
        v = np.array(counts, dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class Letters:
    """A vocabulary stub for a tiny GPT: token t reads as one letter, 0 is EOS."""

    eos = 0

    def decode(self, ids):
        return "".join(string.ascii_lowercase[t % 26] for t in ids)


def test_judge_prefers_the_response_closer_to_the_chosen_one():
    ref = np.array([[1.0, 0.0]] * 3)
    at = {deg: [math.cos(math.radians(deg)), math.sin(math.radians(deg))] for deg in (20, 50)}
    a = np.array([3 * np.array(at[20]), 3 * np.array(at[50]), at[50]])  # any norm: angles count
    b = np.array([at[50], at[20], at[50]])
    a_wins, tie, cos_a, _ = closer_wins(ref, a, b)
    assert a_wins.tolist() == [True, False, False] and tie.tolist() == [False, False, True]
    assert cos_a[0] == pytest.approx(math.cos(math.radians(20)), abs=1e-12)
    judge = sbert_judge(BagOfLetters())
    a_wins, tie, _, _ = judge(
        ["banana bread", "quiz", "same"], ["banana", "xyz", "same"], ["quiz", "quiet", "same"]
    )
    assert a_wins.tolist() == [True, False, False] and tie.tolist() == [False, False, True]


def tiny_online_world(n: int = 8):
    """A tiny random GPT as π_SFT, n training pairs (random prompts), entries with a chosen text."""
    torch.manual_seed(0)
    config = GPTConfig.tiny(vocab_size=32, n_positions=64)
    sft = disable_dropout(GPT(config)).eval().requires_grad_(False)
    rng = random.Random(0)
    pairs = [
        Pair(i, [rng.randrange(1, 32) for _ in range(rng.randrange(3, 7))], [1, 0], [2, 0])
        for i in range(n)
    ]
    entries = [{"chosen": "".join(rng.choices("abcde", k=5))} for _ in range(n)]
    return sft, pairs, entries


def test_online_dpo_on_a_tiny_gpt_runs_rounds_deterministically_from_ln2():
    sft, pairs, entries = tiny_online_world()
    before = {k: v.clone() for k, v in sft.state_dict().items()}
    settings = Settings(budget=8, batch_size=4, max_new_tokens=6, lr=1e-2, beta=0.5)
    runs = [
        run_online(sft, pairs, entries, sbert_judge(BagOfLetters()), Letters(), settings, Clock())
        for _ in range(2)
    ]
    (policy, rows), (again, rows_again) = runs
    assert rows == rows_again  # same seed, same samples, labels, steps
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), again.parameters()))
    assert [r["indices"] for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # each prompt once
    assert sum(r["pairs"] for r in rows) == 8
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert rows[0]["rewards/accuracies"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in sft.state_dict().items())  # π_SFT frozen
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters()))


def synthetic_entries(n: int = 60) -> list:
    """A preference data set in the real one's schema: the chosen response repeats the word; each
    entry its own prompt (a numbered input), since the split keeps a prompt in one split."""
    rng = random.Random(1)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "bread", "light"]
    out = []
    for i in range(n):
        w = rng.choice(words)
        out.append(
            {
                "instruction": f"Say the word {w}.",
                "input": f"request {i}",
                "output": w,
                "chosen": f"The word is {w}.",
                "rejected": f"No, not {rng.choice(words)}.",
            }
        )
    return out


def test_offline_and_online_spend_the_same_labelled_pairs_on_the_same_prompts():
    settings = replace(QUICK, budget=12, batch_size=4, temperatures=(0.0, 1.0), limits=None)
    result = compare_on_miniature(synthetic_entries(), BagOfLetters(), settings)
    train = result["sizes"]["train"]
    assert result["budget"] == 12 < train
    rounds = result["online_rows"]
    assert [len(r["indices"]) for r in rounds] == [4, 4, 4]
    assert {len(v) for v in result["offline_steps"].values()} == {3, 6}  # 1 and 2 epochs of 3
    online = [i for r in rounds for i in r["indices"]]
    data = prepare(synthetic_entries(), settings)
    assert online == [p.index for p in labelled_pairs(data["pairs"]["train"], 12, 0)]
    sft_row = next(w for w in result["win_rows"] if w["model"] == "SFT" and w["temperature"] == 1)
    assert sft_row["sequence_kl"] == 0.0  # KL(π_SFT‖π_SFT), sample by sample
    models = {w["model"] for w in result["win_rows"]}
    assert models == {"SFT", "offline 1 ep.", "offline 2 ep.", "online"}
    assert result["validation"]["SFT"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_budget_beyond_the_training_pairs_is_one_line():
    _, pairs, _ = tiny_online_world()
    with pytest.raises(ValueError) as error:
        labelled_pairs(pairs, 9, 0)
    assert "budget must be 0 (all) or 1..8 labelled pairs" in str(error.value)
    assert "\n" not in str(error.value)
    assert cut_at_eos([5, 3, 0, 0, 0], 0) == [5, 3, 0] and cut_at_eos([5, 3], 0) == [5, 3]
