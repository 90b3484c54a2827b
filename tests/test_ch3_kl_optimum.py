"""Chapter 3 (report §3.3, §4.1; eqs. (27)–(37)) on discrete response spaces, float64.

Closed forms are computed independently in numpy (explicit sums over y), never by calling the
function under test a second way.
"""

import numpy as np
import pytest
import torch

from chapters.ch3_kl_optimum.__main__ import main
from chapters.ch3_kl_optimum.optimum import (
    ascend_logits,
    kl_divergence,
    kl_objective,
    log_partition_function,
    objective_rewritings,
    optimal_policy,
    reward_from_policy,
    rlhf_token_rewards,
)

BETA = 0.7


def problem(seed=0, prompts=3, responses=6):
    """π_ref with full support, rewards, and a random policy π, (prompts, responses), float64."""
    g = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1)
    rewards = 2 * torch.randn(prompts, responses, generator=g, dtype=torch.float64)
    pi = torch.softmax(2 * torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1)
    return pi_ref, rewards, pi


def np_kl(p, q):
    return sum(p[i] * np.log(p[i] / q[i]) for i in range(len(p)))


def np_log_z(pi_ref, r, beta):
    return np.log(sum(pi_ref[i] * np.exp(r[i] / beta) for i in range(len(r))))


def np_pi_star(pi_ref, r, beta):
    w = np.array([pi_ref[i] * np.exp(r[i] / beta) for i in range(len(r))])
    return w / w.sum()


def np_minus_objective_over_beta(p, q, r, beta):
    """−J(π)/β = KL(π‖π_ref) − E_π[r]/β, by hand: what every line from eq. (30) on must equal."""
    return np_kl(p, q) - sum(p[i] * r[i] for i in range(len(p))) / beta


def by_hand_lines(pi, pi_ref, r, beta):
    """Each line (30), (31), (34), (35) of §4.1 as printed, one prompt at a time by explicit sums
    over y."""
    lines = {k: [] for k in ("(30)", "(31)", "(34)", "(35)")}
    for x in range(len(r)):
        p, q, rx = pi[x].numpy(), pi_ref[x].numpy(), r[x].numpy()
        z = sum(q[i] * np.exp(rx[i] / beta) for i in range(len(p)))  # eq. (32)
        star = np_pi_star(q, rx, beta)
        lines["(30)"].append(
            sum(p[i] * (np.log(p[i] / q[i]) - rx[i] / beta) for i in range(len(p)))
        )
        lines["(31)"].append(
            sum(
                p[i] * (np.log(p[i] / (q[i] * np.exp(rx[i] / beta) / z)) - np.log(z))
                for i in range(len(p))
            )
        )
        lines["(34)"].append(sum(p[i] * np.log(p[i] / star[i]) for i in range(len(p))) - np.log(z))
        lines["(35)"].append(np_kl(p, star) - np_log_z(q, rx, beta))
    return {k: np.array(v) for k, v in lines.items()}


def assert_line_is_its_closed_form(line, seed=0, prompts=3):
    """The code's line equals the line computed by hand as printed, and both equal −J(π)/β by hand
    (float64)."""
    pi_ref, r, pi = problem(seed=seed, prompts=prompts)
    got = objective_rewritings(pi, pi_ref, r, BETA)[line].numpy()
    closed = np.array(
        [
            np_minus_objective_over_beta(pi[x].numpy(), pi_ref[x].numpy(), r[x].numpy(), BETA)
            for x in range(len(r))
        ]
    )
    as_printed = by_hand_lines(pi, pi_ref, r, BETA)[line]
    assert (
        np.abs(got - as_printed).max() < 1e-12
    )  # tolerance: float64 round-off on sums of terms up to ~10
    assert np.abs(got - closed).max() < 1e-12
    return pi_ref, r, pi


def test_eq27_objective_is_expected_reward_minus_beta_kl():
    pi_ref, r, pi = problem()
    got = kl_objective(pi, pi_ref, r, BETA)
    for x in range(len(r)):
        p, q, rx = pi[x].numpy(), pi_ref[x].numpy(), r[x].numpy()
        want = sum(p[i] * rx[i] for i in range(len(p))) - BETA * np_kl(p, q)
        assert abs(got[x].item() - want) < 1e-12  # tolerance: float64 round-off


def test_kl_divergence_is_zero_on_equal_distributions_and_handles_zeros():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert kl_divergence(p, p).item() == 0.0
    assert abs(kl_divergence(p, q).item() - np.log(2)) < 1e-15  # 0·log 0 counts as 0


def test_eq28_token_rewards_sum_to_sequence_reward_under_left_and_right_padding():
    g = torch.Generator().manual_seed(1)
    policy = -torch.rand(2, 5, generator=g, dtype=torch.float64)  # per-token log-probs
    ref = -torch.rand(2, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool
    )  # left-, right-padded rows
    score = torch.tensor([1.5, -2.0], dtype=torch.float64)
    got = rlhf_token_rewards(score, policy, ref, mask, BETA)
    for b in range(2):
        positions = [t for t in range(5) if mask[b, t]]
        seq = score[b].item() - BETA * sum(
            policy[b, t].item() - ref[b, t].item() for t in positions
        )
        assert abs(got[b].sum().item() - seq) < 1e-12  # eq. (28) on the whole sequence
        last = positions[-1]
        for t in range(5):
            kl_t = -BETA * (policy[b, t].item() - ref[b, t].item()) if mask[b, t] else 0.0
            want = kl_t + (
                score[b].item() if t == last else 0.0
            )  # the score sits on the last response token
            assert abs(got[b, t].item() - want) < 1e-12


def test_eq28_row_without_response_tokens_is_a_one_line_error():
    zeros = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="no response token"):
        rlhf_token_rewards(torch.zeros(1), zeros, zeros, torch.zeros(1, 3, dtype=torch.bool), BETA)


def test_eq29_objective_is_expectation_of_reward_minus_beta_log_ratio():
    pi_ref, r, pi = problem()
    steps = objective_rewritings(pi, pi_ref, r, BETA)
    for x in range(len(r)):
        p, q, rx = pi[x].numpy(), pi_ref[x].numpy(), r[x].numpy()
        want = sum(p[i] * rx[i] for i in range(len(p))) - BETA * np_kl(p, q)  # eq. (27), by hand
        assert abs(steps["(29)"][x].item() - want) < 1e-12


def test_eq30_dividing_by_minus_beta_turns_the_max_into_a_min():
    assert_line_is_its_closed_form("(30)")
    pi_ref, r, _ = problem()
    candidates = torch.softmax(
        torch.randn(50, *r.shape, dtype=torch.float64), -1
    )  # 50 policies per prompt
    steps = objective_rewritings(candidates, pi_ref, r, BETA)
    assert torch.allclose(steps["(30)"], -steps["(29)"] / BETA, rtol=0, atol=1e-12)
    assert torch.equal(steps["(30)"].argmin(0), steps["(29)"].argmax(0))  # the same policy wins


def test_eq31_adding_and_subtracting_log_z_changes_nothing():
    pi_ref, r, pi = assert_line_is_its_closed_form("(31)")
    steps = objective_rewritings(pi, pi_ref, r, BETA)
    assert torch.allclose(steps["(31)"], steps["(30)"], rtol=0, atol=1e-12)


def test_eq32_partition_function_matches_hand_sum_and_stays_finite_for_tiny_beta():
    pi_ref, r, _ = problem()
    got = log_partition_function(pi_ref, r, BETA)
    for x in range(len(r)):
        assert abs(got[x].item() - np_log_z(pi_ref[x].numpy(), r[x].numpy(), BETA)) < 1e-12
    tiny = log_partition_function(
        pi_ref, r, 1e-4
    )  # exp(r/β) overflows float64; the log-sum-exp does not
    assert torch.isfinite(tiny).all()
    # as β → 0, β·log Z(x) → max_y r(x, y) (the term of the largest reward dominates); tolerance
    # β·|log π_ref|
    assert torch.allclose(1e-4 * tiny, r.max(-1).values, atol=1e-3)


def test_eq32_partition_function_depends_on_the_reward_and_beta_not_on_pi():
    """Erratum: §4.1 says Z(x) "is a function only of x and π_ref". Z(x) = Σ_y π_ref·exp(r/β) also
    depends on r and β; what eq. (35) needs is that it does not depend on π."""
    pi_ref, r, _ = problem()
    log_z = log_partition_function(pi_ref, r, BETA)
    top = (torch.log(pi_ref) + r / BETA).argmax(-1)  # the response that carries the most of Z(x)
    bumped = r.clone()
    bumped[torch.arange(len(r)), top] += 1.0  # another reward on the same x and π_ref
    for x in range(len(r)):
        q = pi_ref[x].numpy()
        got = log_partition_function(pi_ref[x], bumped[x], BETA).item()
        assert abs(got - np_log_z(q, bumped[x].numpy(), BETA)) < 1e-12
        assert got - log_z[x].item() > 0.1  # a higher reward raises Z(x)
        shifted = log_partition_function(
            pi_ref[x], r[x] + 2.0, BETA
        ).item()  # r + f(x): Z·exp(f(x)/β)
        assert abs(shifted - log_z[x].item() - 2.0 / BETA) < 1e-12
        other_beta = log_partition_function(pi_ref[x], r[x], 2 * BETA).item()
        assert abs(other_beta - np_log_z(q, r[x].numpy(), 2 * BETA)) < 1e-12
        assert abs(other_beta - log_z[x].item()) > 0.01
    # not on π: KL(π‖π*) − eq. (35) is log Z(x) for every π, by hand
    pis = torch.softmax(
        2 * torch.randn(20, *r.shape, dtype=torch.float64), -1
    )  # 20 policies per prompt
    steps = objective_rewritings(pis, pi_ref, r, BETA)  # (20, X)
    for x in range(len(r)):
        star, want = (
            np_pi_star(pi_ref[x].numpy(), r[x].numpy(), BETA),
            np_log_z(pi_ref[x].numpy(), r[x].numpy(), BETA),
        )
        for k in range(len(pis)):
            assert abs(np_kl(pis[k, x].numpy(), star) - steps["(35)"][k, x].item() - want) < 1e-12


def test_eq33_optimal_policy_is_a_distribution_matching_hand_formula():
    pi_ref, r, _ = problem()
    got = optimal_policy(pi_ref, r, BETA)
    assert (got >= 0).all() and torch.allclose(
        got.sum(-1), torch.ones(len(r), dtype=torch.float64), atol=1e-14
    )
    for x in range(len(r)):
        assert (
            np.abs(got[x].numpy() - np_pi_star(pi_ref[x].numpy(), r[x].numpy(), BETA)).max() < 1e-14
        )


def test_eq34_the_gibbs_distribution_is_pi_star_and_log_z_leaves_the_expectation():
    pi_ref, r, pi = assert_line_is_its_closed_form("(34)")
    steps = objective_rewritings(pi, pi_ref, r, BETA)
    assert torch.allclose(steps["(34)"], steps["(31)"], rtol=0, atol=1e-12)


def test_eq35_objective_is_minus_beta_kl_to_pi_star_plus_beta_log_z():
    """The identity behind eqs. (34)–(35): J(π) = −β·KL(π‖π*) + β·log Z(x), for random π."""
    pi_ref, r, pi = assert_line_is_its_closed_form("(35)", seed=3, prompts=20)
    steps = objective_rewritings(pi, pi_ref, r, BETA)
    assert torch.allclose(steps["(35)"], steps["(34)"], rtol=0, atol=1e-12)
    j = kl_objective(pi, pi_ref, r, BETA)
    for x in range(len(r)):
        p, q, rx = pi[x].numpy(), pi_ref[x].numpy(), r[x].numpy()
        want = -BETA * np_kl(p, np_pi_star(q, rx, BETA)) + BETA * np_log_z(q, rx, BETA)
        assert abs(j[x].item() - want) < 1e-12


def test_eq36_pi_star_beats_every_random_policy():
    pi_ref, r, _ = problem()
    pi_star = optimal_policy(pi_ref, r, BETA)
    randoms = torch.softmax(
        3 * torch.randn(5000, *r.shape, dtype=torch.float64), -1
    )  # (5000, X, Y)
    gap = kl_objective(pi_star, pi_ref, r, BETA) - kl_objective(randoms, pi_ref, r, BETA)
    assert (gap > 0).all()


def test_eq36_pi_star_beats_small_perturbations_of_itself():
    pi_ref, r, _ = problem()
    pi_star = optimal_policy(pi_ref, r, BETA)
    j_star = kl_objective(pi_star, pi_ref, r, BETA)
    for eps in (1e-2, 1e-3, 1e-4):
        noise = eps * torch.randn(200, *r.shape, dtype=torch.float64)
        perturbed = torch.softmax(torch.log(pi_star) + noise, -1)  # stays on the simplex
        gap = j_star - kl_objective(perturbed, pi_ref, r, BETA)
        assert (gap > 0).all()
        # second order: the gap is β·KL(π‖π*) ≈ (β/2)·χ², so it shrinks like eps² (here within a
        # factor 10)
        assert gap.max() < 10 * BETA * eps**2 * r.shape[-1]


def test_eq36_gradient_ascent_on_free_logits_converges_to_pi_star():
    pi_ref, r, _ = problem()
    got = ascend_logits(pi_ref, r, BETA)
    want = np.stack([np_pi_star(pi_ref[x].numpy(), r[x].numpy(), BETA) for x in range(len(r))])
    assert np.abs(got.numpy() - want).max() < 1e-6  # tolerance: the optimiser's stopping rule


def test_eq36_objective_at_pi_star_is_beta_log_z():
    pi_ref, r, _ = problem()
    j_star = kl_objective(optimal_policy(pi_ref, r, BETA), pi_ref, r, BETA)
    for x in range(len(r)):
        assert (
            abs(j_star[x].item() - BETA * np_log_z(pi_ref[x].numpy(), r[x].numpy(), BETA)) < 1e-12
        )


def test_eq36_small_beta_concentrates_on_the_argmax_reward():
    pi_ref, r, _ = problem()
    off = [
        1 - optimal_policy(pi_ref, r, beta).gather(-1, r.argmax(-1, keepdim=True)).min().item()
        for beta in (1.0, 0.1, 0.01)
    ]
    assert off[0] > off[1] > off[2] and off[2] < 1e-6


def test_eq36_large_beta_returns_pi_ref():
    pi_ref, r, _ = problem()
    dist = [
        (optimal_policy(pi_ref, r, beta) - pi_ref).abs().max().item() for beta in (1.0, 1e2, 1e5)
    ]
    assert dist[0] > dist[1] > dist[2] and dist[2] < 1e-4  # |π* − π_ref| = O(|r|/β)


def test_eq36_rejects_non_positive_beta_in_one_line():
    pi_ref, r, _ = problem()
    with pytest.raises(ValueError, match="beta must be > 0"):
        optimal_policy(pi_ref, r, 0.0)


def test_eq37_reward_from_policy_recovers_reward_up_to_beta_log_z():
    pi_ref, r, _ = problem()
    pi_star = optimal_policy(pi_ref, r, BETA)
    shifted = r - reward_from_policy(
        pi_star, pi_ref, BETA
    )  # (X, Y): should be β·log Z(x) for every y
    for x in range(len(r)):
        want = BETA * np_log_z(pi_ref[x].numpy(), r[x].numpy(), BETA)
        assert np.abs(shifted[x].numpy() - want).max() < 1e-12
    full = reward_from_policy(pi_star, pi_ref, BETA, log_partition_function(pi_ref, r, BETA))
    assert torch.allclose(full, r, rtol=0, atol=1e-12)


def test_script_runs_and_writes_both_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path))
    main(["--responses", "5"])
    out = capsys.readouterr().out
    assert "eq. (35)" in out and "eq. (37)" in out
    assert (tmp_path / "ch3_optimal_policy_vs_beta.png").exists()
    assert (tmp_path / "ch3_objective_along_beta.png").exists()
    with pytest.raises(SystemExit, match="error: --responses"):
        main(["--responses", "1"])
