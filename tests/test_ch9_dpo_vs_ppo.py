"""Chapter 9 (report §7): the DPO minimiser set, Π_PPO ⊆ Π_DPO, and where each method puts unseen
mass. Float64."""

import dataclasses
import math

import pytest
import torch

from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch9_dpo_vs_ppo.__main__ import main
from chapters.ch9_dpo_vs_ppo.minimisers import (
    dpo_flat_directions,
    dpo_minimiser,
    logit_hessian,
    loglinear_flat_directions,
    unseen_shift,
)
from chapters.ch9_dpo_vs_ppo.problem import (
    DT,
    comparison_graph,
    data_reward_loss,
    empirical_dpo_loss,
    make_problem,
    unseen_mask,
)
from chapters.ch9_dpo_vs_ppo.training import (
    Autoregressive,
    LogLinear,
    Tabular,
    fit_reward_model,
    minimise_dpo_lbfgs,
    train_ppo,
    train_tabular_dpo,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see chapters.common.one_thread


@pytest.fixture(scope="module")
def problem():
    return make_problem(seed=0)


@pytest.fixture(scope="module")
def r_hat(problem):
    return fit_reward_model(problem)


def with_votes(problem, votes):
    """The same reference and reward with hand-written votes [(x, y_w, y_l), ...]."""
    prompt, chosen, rejected = torch.tensor(votes).T
    return dataclasses.replace(problem, prompt=prompt, chosen=chosen, rejected=rejected)


def loss_at_logits(problem, logits):
    """Eq. (38) written out by hand (no ch4 code): mean of softplus(−β·(Δ log-ratio)) over the
    votes.
    """
    logp = torch.log_softmax(logits, -1)
    ratio = logp - problem.pi_ref.log()
    x, w, l = problem.prompt, problem.chosen, problem.rejected
    return torch.nn.functional.softplus(-problem.beta * (ratio[x, w] - ratio[x, l])).mean()


def test_comparison_graph_finds_components_and_unseen_responses_by_hand():
    base = make_problem(seed=0, prompts=1, vocab=6, length=1)
    pb = with_votes(base, [(0, 0, 1), (0, 2, 1), (0, 1, 2), (0, 4, 3), (0, 3, 4)])
    components, unseen = comparison_graph(pb)
    assert components == [[[0, 1, 2], [3, 4]]]
    assert unseen == [[5]]
    assert unseen_mask(pb).tolist() == [[False] * 5 + [True]]


def test_example_votes_every_pair_both_ways_so_a_finite_minimiser_exists(problem):
    pairs = {}
    for x, w, l in zip(problem.prompt.tolist(), problem.chosen.tolist(), problem.rejected.tolist()):
        pairs.setdefault((x, min(w, l), max(w, l)), set()).add(w)
    assert len(pairs) >= 6 and all(len(winners) == 2 for winners in pairs.values())
    assert unseen_mask(problem).any(-1).all()  # every prompt has responses the data never shows


def test_dpo_loss_is_constant_along_component_and_unseen_directions(problem, r_hat):
    """Claim: adding to θ(x, ·) a constant per component and anything on unseen responses leaves eq.
    (38) unchanged."""
    star = dpo_minimiser(problem, r_hat).log()
    base = loss_at_logits(problem, star)
    basis = dpo_flat_directions(problem)
    assert torch.allclose(basis @ basis.T, torch.eye(len(basis), dtype=DT), atol=1e-14)
    g = torch.Generator().manual_seed(1)
    directions = list(basis) + [
        torch.randn(len(basis), generator=g, dtype=DT) @ basis for _ in range(5)
    ]
    worst = max(
        abs(loss_at_logits(problem, star + t * v.view(problem.shape)) - base).item()
        for v in directions
        for t in (-3.0, -0.5, 0.5, 3.0)
    )
    assert worst < 1e-13  # float64 rounding only


def test_dpo_loss_rises_off_the_flat_directions(problem, r_hat):
    star = dpo_minimiser(problem, r_hat).log()
    base = loss_at_logits(problem, star)
    basis = dpo_flat_directions(problem)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        v = torch.randn(basis.shape[1], generator=g, dtype=DT)
        v = v - basis.T @ (basis @ v)
        v = v / v.norm()
        for t in (-0.3, 0.3):
            assert loss_at_logits(problem, star + t * v.view(problem.shape)) - base > 1e-6


def test_hessian_null_space_is_exactly_the_flat_directions(problem, r_hat):
    """At a minimiser the loss is flat along V and strictly curved on V⊥: eigenvectors of eigenvalue
    0 span V."""
    hess = logit_hessian(problem, dpo_minimiser(problem, r_hat).log())
    eig, vec = torch.linalg.eigh(hess)
    null = vec[:, eig.abs() < 1e-10]
    basis = dpo_flat_directions(problem)
    assert null.shape[1] == len(basis)
    assert (null @ null.T - basis.T @ basis).abs().max() < 1e-8
    assert eig.min() > -1e-12  # convex in θ


def test_ppo_optimum_is_a_dpo_minimiser(problem, r_hat):
    """π* = eq. (36) for the eq. (26) fit reaches the minimum that direct minimisation of eq. (38)
    over free logits finds."""
    star = optimal_policy(problem.pi_ref, r_hat, problem.beta)
    logits = torch.zeros(
        problem.shape, dtype=DT, requires_grad=True
    )  # an independent route: uniform start, L-BFGS
    opt = torch.optim.LBFGS(
        [logits],
        max_iter=3000,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_at_logits(problem, logits)
        loss.backward()
        return loss

    opt.step(closure)
    direct_min = loss_at_logits(problem, logits.detach()).item()
    at_star = star.log().requires_grad_()
    loss = loss_at_logits(problem, at_star)
    (grad,) = torch.autograd.grad(loss, at_star)
    assert abs(loss.item() - direct_min) < 1e-10
    assert (
        abs(loss.item() - data_reward_loss(r_hat, problem).item()) < 1e-12
    )  # min of eq. (38) = min of eq. (26)
    assert grad.norm() < 1e-6


def test_every_full_support_dpo_minimiser_is_eq36_of_some_fitted_reward(problem, r_hat):
    """With π_ref > 0 everywhere, r_π = β·log π/π_ref minimises eq. (26) and eq. (36) maps it back
    to π: Π_DPO ⊆ Π_PPO too."""
    g = torch.Generator().manual_seed(3)
    basis = dpo_flat_directions(problem)
    pi = dpo_minimiser(
        problem,
        r_hat,
        (5 * torch.randn(len(basis), generator=g, dtype=DT) @ basis).view(problem.shape),
    )
    r_pi = problem.beta * (pi.log() - problem.pi_ref.log())
    assert abs(data_reward_loss(r_pi, problem) - data_reward_loss(r_hat, problem)) < 1e-12
    assert (optimal_policy(problem.pi_ref, r_pi, problem.beta) - pi).abs().max() < 1e-14


def test_zero_reference_mass_response_is_a_dpo_solution_but_never_a_kl_optimum(problem, r_hat):
    """The strict part of Π_PPO ⊂ Π_DPO: a response π_ref never produces may carry DPO mass; eq.
    (36) gives it 0 always."""
    y0 = int(torch.nonzero(unseen_mask(problem)[0])[0])
    pi_ref0 = problem.pi_ref.clone()
    pi_ref0[0, y0] = 0.0
    pi_ref0 = pi_ref0 / pi_ref0.sum(-1, keepdim=True)
    pb0 = dataclasses.replace(problem, pi_ref=pi_ref0)
    pi = optimal_policy(pi_ref0, r_hat, problem.beta)
    pi[0] = 0.5 * pi[0]
    pi[0, y0] = 0.5
    assert abs(empirical_dpo_loss(pi.log(), pb0) - data_reward_loss(r_hat, problem)) < 1e-12
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        assert (
            optimal_policy(
                pi_ref0, 10 * torch.randn(problem.shape, generator=g, dtype=DT), problem.beta
            )[0, y0]
            == 0
        )
    assert math.isinf(
        (pi[0] * (pi[0].log() - pi_ref0[0].log())).nansum().item()
    )  # KL(π ‖ π_ref) = ∞


@pytest.mark.parametrize("mass", [0.01, 0.5, 0.99])
def test_minimiser_set_contains_policies_with_any_unseen_mass(problem, r_hat, mass):
    pi = dpo_minimiser(problem, r_hat, unseen_shift(problem, r_hat, mass))
    assert torch.allclose(
        (pi * unseen_mask(problem)).sum(-1), torch.full((3,), mass, dtype=DT), atol=1e-12
    )
    assert abs(empirical_dpo_loss(pi.log(), problem) - data_reward_loss(r_hat, problem)) < 1e-12


def test_loglinear_loss_is_flat_exactly_along_the_null_space_of_vote_differences(problem):
    psi = torch.randn(
        problem.features.shape[-1], generator=torch.Generator().manual_seed(5), dtype=DT
    )

    def loss(theta):
        return loss_at_logits(problem, problem.pi_ref.log() + problem.features @ theta)

    null = loglinear_flat_directions(problem)
    assert len(null) == 2  # the seed-0 data pin all but the two shifts that leave every π unchanged
    for v in null:
        assert abs(loss(psi + 4 * v) - loss(psi)) < 1e-13
    diffs = (
        problem.features[problem.prompt, problem.chosen]
        - problem.features[problem.prompt, problem.rejected]
    )
    assert (diffs @ null.T).abs().max() < 1e-12
    assert (
        abs(loss(psi + diffs[0] / diffs[0].norm()) - loss(psi)) > 1e-4
    )  # a direction the data see


def test_gradient_steps_on_tabular_dpo_keep_unseen_logits_and_component_sums(problem):
    """The gradient of eq. (38) in θ lies in V⊥: zero on unseen responses, zero sum on each
    component.
    """
    policy = Tabular(problem)
    start = policy.params[0].detach().clone()
    opt = torch.optim.SGD(policy.params, lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        empirical_dpo_loss(policy.logp(), problem).backward()
        opt.step()
    moved = policy.params[0].detach() - start
    assert moved[unseen_mask(problem)].abs().max() == 0
    components, _ = comparison_graph(problem)
    for x, comps in enumerate(components):
        for c in comps:
            assert abs(moved[x, c].sum()) < 1e-13
    assert moved.abs().max() > 0.1


def test_tabular_dpo_by_lbfgs_lands_on_the_ppo_optimum_autoregressive_does_not(problem, r_hat):
    star = dpo_minimiser(problem, r_hat)
    tab = minimise_dpo_lbfgs(Tabular(problem), problem).logp().detach().exp()
    ar = minimise_dpo_lbfgs(Autoregressive(problem), problem).logp().detach().exp()
    minimum = data_reward_loss(r_hat, problem)
    assert abs(empirical_dpo_loss(ar.log(), problem) - minimum) < 1e-10  # both are minimisers ...
    assert (0.5 * (tab - star).abs().sum(-1)).max() < 1e-6  # ... tabular is π*
    mask = unseen_mask(problem)
    assert (ar * mask).sum(-1).mean() > 2 * (star * mask).sum(
        -1
    ).mean()  # the autoregressive one: > 2x π*'s unseen mass


def test_autoregressive_dpo_step_hands_the_losers_mass_to_its_unseen_siblings():
    base = make_problem(seed=0, prompts=1, vocab=3, length=2)
    aa, bb = 0, 4  # responses "AA" and "BB"
    pb = with_votes(base, [(0, aa, bb)] * 9 + [(0, bb, aa)])
    policy = Autoregressive(pb)
    before = torch.softmax(policy.params[1][0, 1].detach(), -1)  # π(· | x, first token B)
    opt = torch.optim.SGD(policy.params, lr=0.1)
    opt.zero_grad()
    empirical_dpo_loss(policy.logp(), pb).backward()
    opt.step()
    after = torch.softmax(policy.params[1][0, 1].detach(), -1)
    assert after[1] < before[1]  # BB, the loser, loses mass ...
    assert after[0] > before[0] and after[2] > before[2]  # ... to BA and BC, which no vote mentions


def test_ppo_run_reaches_the_kl_optimum_of_the_fitted_reward(problem, r_hat):
    policy = Tabular(problem)
    train_ppo(
        policy,
        problem,
        r_hat,
        iterations=150,
        lr=0.05,
        batch=256,
        generator=torch.Generator().manual_seed(0),
    )
    star = dpo_minimiser(problem, r_hat)
    tv = 0.5 * (policy.logp().detach().exp() - star).abs().sum(-1)
    assert tv.max() < 0.01


def test_runs_are_seeded_and_repeatable(problem, r_hat):
    def ppo(seed):
        return train_ppo(
            LogLinear(problem),
            problem,
            r_hat,
            iterations=5,
            lr=0.05,
            generator=torch.Generator().manual_seed(seed),
        )

    assert ppo(0) == ppo(0)
    assert ppo(0) != ppo(1)
    assert train_tabular_dpo(Autoregressive(problem), problem, 5, lr=0.05) == train_tabular_dpo(
        Autoregressive(problem), problem, 5, lr=0.05
    )
    assert torch.equal(make_problem(seed=0).pi_ref, problem.pi_ref) and torch.equal(
        make_problem(seed=0).chosen, problem.chosen
    )


def test_script_rejects_bad_arguments_in_one_line(capsys):
    for argv, says in (
        (["--beta", "0"], "argument --beta: must be > 0, got 0"),
        (["--steps", "2"], "argument --steps: must be at least 4"),
        (["--sweep", "-1"], "argument --sweep: must be 0 or more"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
