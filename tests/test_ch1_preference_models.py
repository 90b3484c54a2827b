"""Chapter 1: Plackett–Luce (eqs. (6)–(11)), Bradley–Terry as its K = 2 case (eqs. (12)–(16)), and
Christiano et al.'s preference loss (§2.1). Closed forms are computed by hand, in Python floats
(float64)."""

import itertools
import math

import pytest
import torch
from scipy import stats

from chapters.ch1_preference_models.__main__ import main
from chapters.ch1_preference_models.probabilities import (
    bradley_terry,
    bt_from_plackett_luce_steps,
    christiano_loss,
    christiano_predictor,
    plackett_eq10_steps,
    plackett_luce,
    plackett_luce_logprob,
    plackett_probabilities,
    plackett_remaining,
    plackett_sequential,
    preference_database,
    sample_rankings,
)
from chapters.common.files import plots_dir

F64 = torch.float64


def rand_p(n, seed):
    p = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return p / p.sum()


def hand_pl(scores, ranking):
    """Π_t e^{s_τ(t)} / Σ_{j≥t} e^{s_τ(j)}, by hand, with scores shifted by their max (exact in
    maths).
    """
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    prob = 1.0
    for t in range(len(ranking)):
        prob *= e[ranking[t]] / sum(e[ranking[j]] for j in range(t, len(ranking)))
    return prob


def test_eq6_top3_probability_matches_hand_formula_for_r5():
    p = rand_p(5, 1)
    for i, j, k in itertools.permutations(range(5), 3):
        pi, pj, pk = (p[n].item() for n in (i, j, k))
        eq6 = pi * (pj / (1 - pi)) * (pk / (1 - pi - pj))
        assert plackett_sequential(p, [i, j, k]).item() == pytest.approx(eq6, rel=1e-13)


def test_eq6_equals_eq8_for_k3():
    p = rand_p(3, 2)
    for i, j, k in itertools.permutations(range(3)):
        pi, pj, pk = (p[n].item() for n in (i, j, k))
        eq6 = pi * (pj / (1 - pi)) * (pk / (1 - pi - pj))
        assert plackett_remaining(p, [i, j, k]).item() == pytest.approx(eq6, rel=1e-13)


def test_eq7_equals_eq8_when_p_sums_to_one_and_only_eq8_is_scale_free():
    p = rand_p(5, 3)
    perms = torch.tensor(list(itertools.permutations(range(5))))  # (120, 5)
    torch.testing.assert_close(
        plackett_sequential(p, perms), plackett_remaining(p, perms), rtol=1e-13, atol=0
    )
    # the rewriting 1 − Σ_{k<j} p = Σ_{k≥j} p uses Σ p = 1; eq. (8) is unchanged by scaling p, eq.
    # (7) refuses
    torch.testing.assert_close(
        plackett_remaining(7.5 * p, perms), plackett_remaining(p, perms), rtol=1e-13, atol=0
    )
    with pytest.raises(ValueError, match="sum to 1"):
        plackett_sequential(7.5 * p, perms)


def test_eq7_product_index_must_be_j():
    """Erratum: eq. (7) prints Π_{i=1}^r over a factor in j. Read literally (j fixed), the product
    is that factor to the power r, and the 'probabilities' of all r! rankings do not sum to 1; over
    j they do."""
    p = rand_p(3, 4).tolist()
    r = 3

    def factor(order, j):  # p_{i_j} / (1 − Σ_{k<j} p_{i_k}), j 0-based
        return p[order[j]] / (1 - sum(p[order[k]] for k in range(j)))

    perms = list(itertools.permutations(range(r)))
    over_j = sum(math.prod(factor(o, j) for j in range(r)) for o in perms)
    assert over_j == pytest.approx(1.0, abs=1e-14)
    for j in range(r):
        literal = sum(math.prod(factor(o, j) for _i in range(r)) for o in perms)
        assert abs(literal - 1.0) > 0.05
    # the code multiplies over j: it matches the sum-to-one reading ranking by ranking
    for o in perms:
        assert plackett_sequential(torch.tensor(p, dtype=F64), list(o)).item() == pytest.approx(
            math.prod(factor(o, j) for j in range(r)), rel=1e-13
        )


def test_eq9_probabilities_are_a_softmax_of_scores():
    p = plackett_probabilities([0.0, math.log(2), math.log(3)])
    torch.testing.assert_close(
        p, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=F64), rtol=1e-14, atol=0
    )
    beta = torch.randn(4, 6, dtype=F64)
    p = plackett_probabilities(beta)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        p[:, 0] / p[:, 1], (beta[:, 0] - beta[:, 1]).exp(), rtol=1e-13, atol=0
    )


def test_eq10_each_line_equals_the_hand_product():
    beta = torch.randn(4, dtype=F64)
    perms = list(itertools.permutations(range(4)))
    lines = plackett_eq10_steps(beta, perms)
    hand = torch.tensor([hand_pl(beta.tolist(), o) for o in perms], dtype=F64)
    for n, line in enumerate(lines, start=1):
        torch.testing.assert_close(line, hand, rtol=1e-13, atol=0, msg=f"eq. (10) line {n}")


@pytest.mark.parametrize("K", range(1, 7))
def test_eq11_probabilities_of_all_rankings_sum_to_one(K):
    rewards = 2 * torch.randn(3, 1, K, dtype=F64)  # 3 prompts
    perms = torch.tensor(list(itertools.permutations(range(K))))  # (K!, K)
    total = plackett_luce(rewards, perms).sum(-1)  # (3,)
    torch.testing.assert_close(total, torch.ones(3, dtype=F64), rtol=0, atol=1e-14)


def test_eq11_matches_hand_product_batched_over_prompts():
    rewards = torch.randn(5, 4, dtype=F64)
    rankings = torch.stack([torch.randperm(4) for _ in range(5)])  # one ranking per prompt
    got = plackett_luce(rewards, rankings)  # (5,)
    for b in range(5):
        assert got[b].item() == pytest.approx(
            hand_pl(rewards[b].tolist(), rankings[b].tolist()), rel=1e-13
        )
        assert plackett_luce_logprob(rewards, rankings)[b].item() == pytest.approx(
            math.log(hand_pl(rewards[b].tolist(), rankings[b].tolist())), rel=1e-13
        )


def test_eq11_log_form_is_stable_for_large_rewards():
    big = [1000.0, 999.0, 990.0]
    logp = plackett_luce_logprob(torch.tensor(big, dtype=F64), [0, 1, 2])
    assert torch.isfinite(logp)
    assert logp.item() == pytest.approx(math.log(hand_pl(big, [0, 1, 2])), rel=1e-13)
    assert torch.isnan(
        plackett_eq10_steps(big, [0, 1, 2])[2]
    )  # the literal eq. (10) overflows here


def test_eq11_adding_any_f_of_x_to_all_rewards_changes_nothing():
    rewards = torch.randn(6, 5, dtype=F64)
    f = 20 * torch.randn(6, 1, dtype=F64)  # one constant per prompt
    perms = torch.tensor(list(itertools.permutations(range(5))))[:, None, :]  # (120, 1, 5)
    torch.testing.assert_close(
        plackett_luce(rewards + f, perms), plackett_luce(rewards, perms), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        bradley_terry(rewards[:, 0] + f[:, 0], rewards[:, 1] + f[:, 0]),
        bradley_terry(rewards[:, 0], rewards[:, 1]),
        rtol=1e-12,
        atol=0,
    )


def test_sampler_frequencies_pass_chi_square_against_eq11():
    rewards = torch.tensor([[1.2, 0.6, 0.0, -0.8], [0.0, 0.3, -1.0, 0.9]], dtype=F64)  # 2 prompts
    n = 20_000
    samples = sample_rankings(rewards, n, torch.Generator().manual_seed(0))  # (n, 2, 4)
    assert samples.shape == (n, 2, 4)
    perms = list(itertools.permutations(range(4)))
    for b in range(2):
        rows = [tuple(s) for s in samples[:, b].tolist()]
        counts = [rows.count(o) for o in perms]
        expected = [n * hand_pl(rewards[b].tolist(), o) for o in perms]
        assert stats.chisquare(counts, expected).pvalue > 0.01
        wrong = [
            n * hand_pl(rewards[b, [1, 0, 2, 3]].tolist(), o) for o in perms
        ]  # y1 and y2 swapped
        assert stats.chisquare(counts, wrong).pvalue < 1e-6


def test_eq12_to_eq15_k2_factors_by_hand():
    steps = bt_from_plackett_luce_steps(0.7, -0.4)
    first = math.exp(0.7) / (math.exp(0.7) + math.exp(-0.4))
    assert steps["(13)"].item() == pytest.approx(first, rel=1e-14)
    assert steps["(14)"].item() == 1.0
    assert steps["(12)"].item() == pytest.approx(first, rel=1e-14)
    assert steps["(15)"].item() == pytest.approx(first, rel=1e-14)


def test_eq16_bradley_terry_is_plackett_luce_at_k2():
    r1, r2 = torch.randn(7, dtype=F64), torch.randn(7, dtype=F64)
    hand = torch.tensor(
        [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in zip(r1.tolist(), r2.tolist())],
        dtype=F64,
    )
    torch.testing.assert_close(bradley_terry(r1, r2), hand, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        plackett_luce(torch.stack([r1, r2], -1), [0, 1]), hand, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        bradley_terry(r1, r2) + bradley_terry(r2, r1), torch.ones(7, dtype=F64), rtol=0, atol=1e-15
    )
    assert bradley_terry(0.0, 0.0).item() == 0.5
    assert bradley_terry(800.0, 0.0).item() == 1.0  # stable where e^800 overflows


def test_sec21_predictor_is_bradley_terry_on_summed_segment_rewards():
    seg1 = torch.tensor([[0.5, -0.2, 0.1]], dtype=F64)  # Σ = 0.4
    seg2 = torch.tensor([[1.0, 0.0, -0.1]], dtype=F64)  # Σ = 0.9
    expected = math.exp(0.4) / (math.exp(0.4) + math.exp(0.9))
    assert christiano_predictor(seg1, seg2).item() == pytest.approx(expected, rel=1e-14)


def test_sec21_loss_matches_hand_values_with_clear_winner_and_tie():
    seg1 = torch.tensor([[1.0], [1.0], [1.0], [0.0]], dtype=F64)
    seg2 = torch.zeros(4, 1, dtype=F64)
    s1, s2, mu = preference_database(seg1, seg2, ["1", "2", "tie", "tie"])
    p = 1 / (1 + math.exp(-1.0))  # P̂(1 ≻ 2) when Σ r̂ differs by 1
    per_triple = [
        -math.log(p),
        -math.log(1 - p),
        -0.5 * math.log(p) - 0.5 * math.log(1 - p),
        math.log(2),
    ]
    for n, expected in enumerate(per_triple):
        assert christiano_loss(s1[n : n + 1], s2[n : n + 1], mu[n : n + 1]).item() == pytest.approx(
            expected, rel=1e-13
        )
    assert christiano_loss(s1, s2, mu).item() == pytest.approx(sum(per_triple), rel=1e-13)


def test_sec21_incomparable_pairs_are_left_out_of_the_database():
    seg1 = torch.randn(5, 3, dtype=F64)
    seg2 = torch.randn(5, 3, dtype=F64)
    judged = ["1", "incomparable", "tie", "incomparable", "2"]
    s1, s2, mu = preference_database(seg1, seg2, judged)
    torch.testing.assert_close(s1, seg1[[0, 2, 4]], rtol=0, atol=0)
    torch.testing.assert_close(
        mu, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=F64), rtol=0, atol=0
    )
    kept = preference_database(seg1[[0, 2, 4]], seg2[[0, 2, 4]], ["1", "tie", "2"])
    assert christiano_loss(s1, s2, mu).item() == christiano_loss(*kept).item()
    with pytest.raises(ValueError, match="unknown judgement"):
        preference_database(seg1[:1], seg2[:1], ["maybe"])


def test_sec21_tie_loss_is_smallest_at_equal_segment_returns():
    gaps = torch.linspace(-3, 3, 61, dtype=F64)[:, None]
    mu = torch.tensor([[0.5, 0.5]], dtype=F64)
    loss = torch.stack([christiano_loss(g[None], torch.zeros(1, 1, dtype=F64), mu) for g in gaps])
    assert gaps[loss.argmin()].item() == pytest.approx(0.0, abs=1e-12)
    assert loss.min().item() == pytest.approx(math.log(2), rel=1e-13)


def test_sec21_loss_needs_its_minus_sign():
    """Erratum: §2.1 prints loss(r̂) = Σ μ(1) log P̂(1≻2) + μ(2) log P̂(2≻1), without the minus
    sign. Minimising that expression drives P̂ of the preferred segment to 0; with the minus sign,
    to 1.
    """
    seg2 = torch.zeros(1, 2, dtype=F64)
    mu = torch.tensor([[1.0, 0.0]], dtype=F64)  # segment 1 clearly preferred
    for sign, direction in [(-1.0, "down"), (1.0, "up")]:
        seg1 = torch.zeros(1, 2, dtype=F64, requires_grad=True)
        opt = torch.optim.SGD([seg1], lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            (
                sign * christiano_loss(seg1, seg2, mu)
            ).backward()  # sign −1: the report's printed expression
            opt.step()
        p = christiano_predictor(seg1, seg2).item()
        assert (p < 0.05) if direction == "down" else (p > 0.9)
    # as printed, the expression is a log-likelihood: never positive, so 'minimising' it has no
    # floor at 0
    assert (
        -christiano_loss(
            torch.randn(50, 2, dtype=F64),
            torch.randn(50, 2, dtype=F64),
            torch.full((50, 2), 0.5, dtype=F64),
        ).item()
        < 0
    )


def test_rankings_are_validated_with_one_line_errors():
    with pytest.raises(ValueError, match="repeats"):
        plackett_luce([0.0, 1.0, 2.0], [0, 0, 1])
    with pytest.raises(ValueError, match="full permutation"):
        plackett_luce([0.0, 1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        plackett_remaining(rand_p(3, 0), [0, 1, 3])


def test_script_prints_claims_and_writes_figures(capsys):
    main(["--samples", "2000"])
    out = capsys.readouterr().out
    assert "chi-square vs eq. (11)" in out and "eq. (16) bradley_terry" in out
    for name in ("ch1_bradley_terry_and_loss", "ch1_plackett_luce_frequencies"):
        assert (plots_dir() / f"{name}.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="error: --samples"):
        main(["--samples", "5"])
