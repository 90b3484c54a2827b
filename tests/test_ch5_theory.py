"""Chapter 5 (report §5.1, §5.2) on random finite problems, float64.

These tests can refute §5.1's claims on the problems drawn, not prove them for all problems; the
closed forms (PL by explicit products, π* by explicit sums, variances by enumeration) are computed
here independently.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from chapters.ch4_dpo.loss import dpo_loss
from chapters.ch5_theory.__main__ import main
from chapters.ch5_theory.baselines import (
    dpg_baseline,
    dpg_weights,
    dpo_gradient_samples,
    expected_gradient,
    gradient_variance,
    min_variance_baseline,
    rl_baseline,
    score_function_samples,
    score_matrix,
    total_variance,
)
from chapters.ch5_theory.equivalence import (
    are_equivalent,
    equivalent_reward,
    implied_policy,
    lemma2_proof_steps,
    project_reward,
    ranking_distribution,
)

BETA = 0.7


def problem(seed=0, prompts=3, responses=4):
    g = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1)
    rewards = 2 * torch.randn(prompts, responses, generator=g, dtype=torch.float64)
    f = 5 * torch.randn(
        prompts, generator=g, dtype=torch.float64
    )  # a random f(x), one number per prompt
    return pi_ref, rewards, f


def np_plackett_luce(r, ranking):
    """Report eq. (11) by explicit products: Π_t exp(r_τ(t)) / Σ_{j≥t} exp(r_τ(j))."""
    return math.prod(
        math.exp(r[ranking[t]]) / sum(math.exp(r[j]) for j in ranking[t:])
        for t in range(len(ranking))
    )


def np_pi_star(pi_ref, r, beta):
    w = np.array([pi_ref[i] * math.exp(r[i] / beta) for i in range(len(r))])
    return w / w.sum()


# ------------------------------------------------------------------------------------------------
# §5.1


def test_definition1_adding_f_of_x_stays_in_the_class_and_a_y_dependent_change_leaves_it():
    _, r, f = problem()
    assert are_equivalent(equivalent_reward(r, f), r).all()
    assert torch.allclose(equivalent_reward(r, f) - r, f[:, None].expand_as(r), atol=0)
    bumped = r.clone()
    bumped[:, 0] += 1e-3  # depends on y: not of the form f(x)
    assert not are_equivalent(bumped, r).any()


def test_lemma1_equivalent_rewards_give_the_same_plackett_luce_distribution():
    _, r, f = problem(responses=4)
    rankings, p = ranking_distribution(r)
    _, p_shifted = ranking_distribution(equivalent_reward(r, f))
    assert rankings.shape == (24, 4)
    for x in range(len(r)):
        for k, ranking in enumerate(itertools.permutations(range(4))):
            want = np_plackett_luce(r[x].tolist(), ranking)
            assert abs(p[x, k].item() - want) < 1e-14 and abs(p_shifted[x, k].item() - want) < 1e-14


def test_lemma1_bradley_terry_case_and_a_non_equivalent_change_moves_the_distribution():
    _, r, f = problem(responses=2)
    _, p = ranking_distribution(r)  # K = 2: [P(y1 ≻ y2), P(y2 ≻ y1)]
    _, p_shifted = ranking_distribution(equivalent_reward(r, f))
    bt = 1 / (1 + torch.exp(r[:, 1] - r[:, 0]))  # σ(r1 − r2), by hand
    assert torch.allclose(p_shifted[:, 0], bt, atol=1e-15) and torch.allclose(
        p[:, 0], bt, atol=1e-15
    )
    bumped = r.clone()
    bumped[:, 0] += 0.5
    assert (ranking_distribution(bumped)[1][:, 0] - bt > 0.01).all()  # the check can fail


def test_lemma2_equivalent_rewards_give_the_same_optimal_policy():
    pi_ref, r, f = problem(responses=6)
    steps = lemma2_proof_steps(pi_ref, r, f, BETA)
    for x in range(len(r)):
        want = np_pi_star(pi_ref[x].tolist(), r[x].tolist(), BETA)
        assert np.abs(steps["π_r'"][x].numpy() - want).max() < 1e-14
        assert np.abs(steps["π_r"][x].numpy() - want).max() < 1e-14


def test_lemma2_setup_compares_a_distinct_member_r_prime_not_r_equals_r_plus_f():
    """Erratum: Lemma 2's setup "r(x, y) = r(x, y) + f(x)" holds only for f ≡ 0, and the lemma would
    compare r with itself; it should read r'(x, y) = r(x, y) + f(x), a reward unequal to r
    everywhere with the same π*."""
    pi_ref, r, f = problem(responses=6)
    assert (f.abs() > 0.1).all()
    r_prime = equivalent_reward(r, f)
    assert ((r_prime - r).abs() > 0.1).all()  # the printed r = r + f(x) is false at every (x, y)
    steps = lemma2_proof_steps(pi_ref, r, f, BETA)
    for x in range(len(r)):
        want = np_pi_star(pi_ref[x].tolist(), r[x].tolist(), BETA)
        assert (
            np.abs(np_pi_star(pi_ref[x].tolist(), r_prime[x].tolist(), BETA) - want).max() < 1e-14
        )  # by hand
        assert np.abs(steps["π_r'"][x].numpy() - want).max() < 1e-14


def test_lemma2_proof_exponent_is_r_plus_f_over_beta_not_r_over_beta_plus_f():
    """Erratum: the proof's π_ref·exp(r/β + f(x)) should read π_ref·exp((r + f(x))/β); the lemma
    still holds."""
    pi_ref, r, f = problem(responses=6)
    steps = lemma2_proof_steps(pi_ref, r, f, BETA)
    by_hand = pi_ref * torch.exp((r + f[:, None]) / BETA)  # π_ref·exp(r'/β), r' = r + f(x)
    assert torch.allclose(steps["numerator"], by_hand, rtol=1e-14, atol=0)
    assert torch.allclose(
        steps["factored"], by_hand, rtol=1e-13, atol=0
    )  # the factor pulled out is exp(f/β)
    ratio = steps["as printed"] / by_hand  # exp(f·(1 − 1/β)) per prompt: not 1 when β ≠ 1
    assert torch.allclose(
        ratio, torch.exp(f * (1 - 1 / BETA))[:, None].expand_as(ratio), rtol=1e-12
    )
    assert ((ratio - 1).abs() > 0.1).all()
    assert torch.allclose(
        steps["π as printed"], steps["π_r"], atol=1e-14
    )  # but it normalises to the same π


def test_theorem1_projection_is_in_the_class_and_equals_beta_log_ratio_of_the_optimal_policy():
    pi_ref, r, _ = problem(responses=6)
    proj = project_reward(r, pi_ref, BETA)
    assert are_equivalent(proj, r).all()
    for x in range(len(r)):
        pi_r = np_pi_star(pi_ref[x].tolist(), r[x].tolist(), BETA)
        want = BETA * np.log(pi_r / pi_ref[x].numpy())
        assert np.abs(proj[x].numpy() - want).max() < 1e-12


def test_theorem1_projection_maps_a_class_to_one_reward_with_the_same_preferences_and_optimum():
    pi_ref, r, _ = problem(responses=4)
    fs = 10 * torch.randn(100, len(r), dtype=torch.float64)  # 100 members of each prompt's class
    members = equivalent_reward(r, fs)  # (100, X, Y)
    proj = project_reward(r, pi_ref, BETA)
    assert torch.allclose(
        project_reward(members, pi_ref, BETA), proj.expand_as(members), atol=1e-12
    )
    assert torch.allclose(ranking_distribution(proj)[1], ranking_distribution(r)[1], atol=1e-14)
    pi_from_proj = pi_ref * torch.exp(proj / BETA)  # β·log π/π_ref = proj solved for π, by hand
    assert torch.allclose(pi_from_proj.sum(-1), torch.ones(len(r), dtype=torch.float64), atol=1e-14)
    for x in range(len(r)):
        assert (
            np.abs(
                pi_from_proj[x].numpy() - np_pi_star(pi_ref[x].tolist(), r[x].tolist(), BETA)
            ).max()
            < 1e-14
        )


def test_proposition1_only_the_projection_implies_a_distribution():
    pi_ref, r, _ = problem(responses=6)
    proj = project_reward(r, pi_ref, BETA)
    for c in (-3.0, -0.1, -1e-6, 0.0, 1e-6, 0.1, 3.0):
        mass = implied_policy(proj + c, pi_ref, BETA).sum(-1)
        assert torch.allclose(
            mass, torch.full_like(mass, math.exp(c / BETA)), rtol=1e-13
        )  # the proof: exp(f/β)
        assert ((mass - 1).abs() < 1e-14).all() if c == 0.0 else ((mass - 1).abs() > 1e-7).all()


def test_proposition1_distinct_policies_are_never_in_one_class():
    g = torch.Generator().manual_seed(4)
    pi_ref = torch.softmax(torch.randn(500, 5, generator=g, dtype=torch.float64), -1)
    pi, pi2 = (
        torch.softmax(torch.randn(500, 5, generator=g, dtype=torch.float64), -1) for _ in range(2)
    )
    r, r2 = BETA * torch.log(pi / pi_ref), BETA * torch.log(pi2 / pi_ref)
    assert not are_equivalent(r, r2, atol=1e-6).any()
    assert are_equivalent(
        r, BETA * torch.log(pi.clone() / pi_ref)
    ).all()  # the same π: the same reward


# ------------------------------------------------------------------------------------------------
# §5.2


def bandit(seed=0):
    g = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    theta = torch.log(pi_ref) + 0.5 * torch.randn(5, generator=g, dtype=torch.float64)
    rewards = torch.randn(5, generator=g, dtype=torch.float64) + 1.0
    return theta, pi_ref, rewards


def test_score_function_of_a_softmax_is_one_hot_minus_pi():
    theta, _, _ = bandit()
    pi = torch.softmax(theta, -1)
    assert torch.allclose(score_matrix(theta), torch.eye(5, dtype=torch.float64) - pi, atol=1e-15)


def test_baseline_leaves_the_policy_gradient_unbiased_by_enumeration():
    theta, _, rewards = bandit()
    pi = torch.softmax(theta, -1).tolist()
    r = rewards.tolist()
    # ∇_θ_k E_π[r] = π_k (r_k − Σ_y π_y r_y), the softmax policy gradient in closed form
    want = torch.tensor(
        [pi[k] * (r[k] - sum(p * q for p, q in zip(pi, r))) for k in range(5)], dtype=torch.float64
    )
    for b in (0.0, float(rl_baseline(theta, rewards)), 10.0, -7.0):
        assert torch.allclose(expected_gradient(theta, rewards, b), want, atol=1e-14)


def test_baseline_changes_the_variance_and_sampling_agrees_with_enumeration():
    theta, _, rewards = bandit()
    g = torch.Generator().manual_seed(0)
    shifted = rewards + 5.0  # an equivalent reward (Definition 1) with a large offset
    b_rl = rl_baseline(theta, shifted)
    exact = {b: gradient_variance(theta, shifted, b).item() for b in (0.0, float(b_rl))}
    pi = torch.softmax(theta, -1)
    by_hand = sum(
        pi[y] * ((shifted[y] - 0.0) ** 2) * ((torch.eye(5)[y] - pi) ** 2).sum() for y in range(5)
    )
    mean = expected_gradient(theta, shifted, 0.0)
    assert abs(exact[0.0] - (by_hand - mean.pow(2).sum()).item()) < 1e-12
    for b, v in exact.items():
        measured = total_variance(score_function_samples(theta, shifted, b, 20000, g)).item()
        assert abs(measured - v) < 0.05 * v  # 20000 draws: a few % relative error
    assert exact[float(b_rl)] < 0.2 * exact[0.0]


def test_mean_reward_baseline_can_raise_the_variance():
    """Erratum: §5.2's argument shows a baseline is unbiased, not that it lowers variance; B_RL =
    E_π[r] can raise it.

    π = (0.9, 0.1), r = (1, 0), by hand: ‖∇log π(y)‖² = 2(1 − π_y)², E[g] = (0.09, −0.09), so
    Var(B) = 0.9·(1 − B)²·0.02 + 0.1·B²·1.62 − 0.0162: Var(0) = 0.0018, Var(B_RL = 0.9) = 0.1152.
    """
    theta = torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64))
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b_rl = rl_baseline(theta, rewards)
    assert abs(b_rl.item() - 0.9) < 1e-15
    assert abs(gradient_variance(theta, rewards, 0.0).item() - 0.0018) < 1e-15
    assert abs(gradient_variance(theta, rewards, b_rl).item() - 0.1152) < 1e-14


def test_min_variance_baseline_minimises_the_exact_variance():
    theta, _, rewards = bandit()
    b_min = float(min_variance_baseline(theta, rewards))
    v_min = gradient_variance(theta, rewards, b_min)
    for db in (-0.5, -1e-3, 1e-3, 0.5):
        assert gradient_variance(theta, rewards, b_min + db) > v_min


def test_dpg_baseline_is_the_partition_function_and_keeps_the_gradient_unbiased():
    theta, pi_ref, rewards = bandit()
    energy = pi_ref * torch.exp(rewards / BETA)  # P(y) = π_ref·exp(r/β), whose normalisation is π*
    pi = torch.softmax(theta, -1)
    z = sum(
        pi_ref[y].item() * math.exp(rewards[y].item() / BETA) for y in range(5)
    )  # eq. (32) by hand
    weights = dpg_weights(theta, energy)
    assert abs(float((pi * weights).sum()) - z) < 1e-12  # E_{π_θ}[P/π_θ], enumerated
    assert abs(float(dpg_baseline(energy)) - z) < 1e-12
    pi_star = torch.tensor(np_pi_star(pi_ref.tolist(), rewards.tolist(), BETA))
    for b in (0.0, z):  # E[(P/π − B)∇log π] = Σ_y P(y)(e_y − π) = Z·(π* − π_θ) whatever B
        assert torch.allclose(expected_gradient(theta, weights, b), z * (pi_star - pi), atol=1e-13)


def test_dpg_baseline_reduces_the_measured_variance_here():
    theta, pi_ref, rewards = bandit()
    energy = pi_ref * torch.exp(rewards / BETA)
    weights, b = dpg_weights(theta, energy), float(dpg_baseline(energy))
    g = torch.Generator().manual_seed(1)
    measured = [
        total_variance(score_function_samples(theta, weights, bb, 20000, g)).item()
        for bb in (0.0, b)
    ]
    exact = [gradient_variance(theta, weights, bb).item() for bb in (0.0, b)]
    for m, e in zip(measured, exact):
        assert abs(m - e) < 0.1 * e  # heavier tails than RL's: 10 %
    assert measured[1] < 0.8 * measured[0]


def test_dpo_gradient_samples_match_eq41_and_need_no_baseline():
    theta, pi_ref, rewards = bandit()
    grads = dpo_gradient_samples(theta, pi_ref, rewards, BETA, 64, torch.Generator().manual_seed(2))
    assert torch.allclose(
        grads.sum(-1), torch.zeros(64, dtype=torch.float64), atol=1e-15
    )  # e_w − e_l: no π left
    logp, log_ref = torch.log_softmax(theta, -1), torch.log(pi_ref)
    for (
        row
        # each row is −β·σ(r̂_l − r̂_w)·(e_w − e_l) for some pair (eq. (41) for one example)
    ) in grads:
        w, l = int(row.argmin()), int(row.argmax())
        if w == l:
            continue
        margin = BETA * ((logp[w] - log_ref[w]) - (logp[l] - log_ref[l]))
        assert abs(row[w].item() + BETA / (1 + math.exp(margin.item()))) < 1e-14
    # a "baseline" subtracted from both implicit rewards: eq. (38) sees only their difference
    b = 3.7
    pc, pr = logp[0].clone().requires_grad_(True), logp[1].clone().requires_grad_(True)
    base = dpo_loss(pc, pr, log_ref[0], log_ref[1], BETA)
    shifted = dpo_loss(pc - b / BETA, pr - b / BETA, log_ref[0], log_ref[1], BETA)
    assert torch.allclose(base, shifted, atol=1e-15)
    assert torch.allclose(
        torch.stack(torch.autograd.grad(base, (pc, pr))),
        torch.stack(torch.autograd.grad(shifted, (pc, pr))),
        atol=1e-15,
    )


def test_dpo_gradient_samples_favour_each_response_as_often_as_bradley_terry_prefers_it():
    """A descent step on one example's eq. (38) raises the logit of its y_w: that response must win
    each pair {a, b} with the Bradley–Terry probability σ(r_a − r_b), not 1 − σ (the worse response
    labelled the winner)."""
    pi_ref = torch.full((4,), 0.25, dtype=torch.float64)  # every unordered pair drawn ~n/8 times
    rewards = torch.tensor(
        [0.0, 0.6, 1.5, 3.0], dtype=torch.float64
    )  # distinct: σ(r_a − r_b) ≠ 1/2
    theta = torch.log(pi_ref) + torch.tensor([0.3, -0.2, 0.1, -0.4], dtype=torch.float64)
    n = 20000
    grads = dpo_gradient_samples(theta, pi_ref, rewards, BETA, n, torch.Generator().manual_seed(5))
    wins, draws = np.zeros((4, 4)), np.zeros((4, 4))
    for row in grads:
        if row.abs().max() == 0:  # y1 = y2: no preference, zero gradient
            continue
        favoured, other = (
            int(row.argmin()),
            int(row.argmax()),
        )  # −row raises θ_favoured, lowers θ_other
        wins[favoured, other] += 1
        draws[favoured, other] += 1
        draws[other, favoured] += 1
    r = rewards.tolist()
    for a, b in itertools.combinations(range(4), 2):
        p = 1 / (1 + math.exp(r[b] - r[a]))  # Bradley–Terry P(a ≻ b), by hand
        se = math.sqrt(
            p * (1 - p) / draws[a, b]
        )  # binomial standard error of the frequency, ~0.01 here
        assert draws[a, b] > 2000 and abs(wins[a, b] / draws[a, b] - p) < 4.5 * se, (
            a,
            b,
            wins[a, b],
            draws[a, b],
            p,
        )


def test_dpo_gradient_variance_ignores_a_reward_offset_that_inflates_reinforce():
    theta, pi_ref, rewards = bandit()
    dpo, rl = [], []
    for c in (0.0, 10.0):
        dpo.append(
            total_variance(
                dpo_gradient_samples(
                    theta, pi_ref, rewards + c, BETA, 4000, torch.Generator().manual_seed(3)
                )
            ).item()
        )
        rl.append(gradient_variance(theta, rewards + c, 0.0).item())
    assert abs(dpo[1] - dpo[0]) < 1e-12  # the same draws give the same labels: Lemma 1
    assert rl[1] > 20 * rl[0]


def test_script_runs_and_writes_both_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path))
    main(["--samples", "500"])
    out = capsys.readouterr().out
    assert "Lemma 2's proof" in out and "Proposition 1" in out and "DPO" in out
    assert (
        "the same draws at every c give the same labels and per-example gradients: max |Δ| = "
        "0.0e+00" in out
    )
    assert (tmp_path / "ch5_equivalence_classes.png").exists() and (
        tmp_path / "ch5_baseline_variance.png"
    ).exists()
    with pytest.raises(SystemExit, match="error: --samples"):
        main(["--samples", "5"])
