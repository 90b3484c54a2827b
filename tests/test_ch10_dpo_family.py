"""Chapter 10: the DPO family's losses by hand, and each one's population minimiser against π* of
eq. (36).

Closed forms are computed here independently (math on floats, or softmax written out) in float64;
Newton's and the LP's answers are checked against them, or against the optimality condition they
must satisfy.
"""

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch

from chapters.ch4_dpo.loss import dpo_loss, preference_probabilities
from chapters.ch7_frontier.methods import dpo_batch_loss
from chapters.ch7_frontier.task import frontier_reward, logprob, reference_and_pairs
from chapters.ch10_dpo_family.frontier import add_mismatched, family_batch_loss, train_and_place
from chapters.ch10_dpo_family.losses import (
    kto_loss,
    kto_reference_point,
    orpo_loss,
    preference_loss,
    simpo_optimal_policy,
)
from chapters.ch10_dpo_family.optima import (
    deterministic_labels,
    flip_labels,
    hinge_minimiser,
    kto_minimiser,
    kto_table_loss,
    minimise_pairs,
    newton_path,
    pair_table_loss,
    tabular_problem,
    unpaired,
)

F64 = dict(dtype=torch.float64)
pytestmark = pytest.mark.usefixtures("one_thread")


def log_sigmoid(v):
    return -math.log1p(math.exp(-v))


def t(*v):
    return torch.tensor(v, **F64)


def gibbs(pi_ref, reward, beta):
    """π_ref·exp(reward/β), normalised per prompt: eq. (36) written out."""
    w = pi_ref * torch.exp(reward / beta)
    return w / w.sum(-1, keepdim=True)


def two_responses(gap, beta, ref=(0.3, 0.7)):
    """One prompt, two responses with reward gap r*(y0) − r*(y1) = gap: π_ref, r*, BT rows."""
    pi_ref, rewards = t(*ref)[None], t(gap, 0.0)[None]
    return pi_ref, rewards, preference_probabilities(pi_ref, rewards)


def margin(pi, pi_ref):
    """log π/π_ref(y0) − log π/π_ref(y1) for a one-prompt, two-response policy."""
    u = torch.log(pi[0]) - torch.log(pi_ref[0])
    return (u[0] - u[1]).item()


# ------------------------------------------------------------------------------- the losses by hand
PC, PR, RC, RR, BETA, EPS, GAMMA = -4.0, -6.5, -5.0, -5.5, 0.3, 0.15, 0.4
H = (PC - RC) - (PR - RR)


@pytest.mark.parametrize(
    "kind,want",
    [
        ("dpo", -log_sigmoid(BETA * H)),
        ("cdpo", -(1 - EPS) * log_sigmoid(BETA * H) - EPS * log_sigmoid(-BETA * H)),
        (
            "rdpo",
            (-(1 - EPS) * log_sigmoid(BETA * H) + EPS * log_sigmoid(-BETA * H)) / (1 - 2 * EPS),
        ),
        ("ipo", (H - 1 / (2 * BETA)) ** 2),
        ("hinge", max(0.0, 1 - BETA * H)),
    ],
)
def test_each_kind_equals_its_paper_formula_by_hand(kind, want):
    kw = dict(label_smoothing=EPS) if kind in ("cdpo", "rdpo") else {}
    assert preference_loss(kind, t(PC), t(PR), t(RC), t(RR), BETA, **kw).item() == pytest.approx(
        want, abs=1e-14
    )


def test_hinge_is_zero_beyond_margin_one_and_linear_below():
    h = t(-2.0, 0.0, 1 / BETA, 5.0)
    got = preference_loss("hinge", h, t(0.0), t(0.0), t(0.0), BETA)
    assert got.tolist() == pytest.approx([1 + 2 * BETA, 1.0, 0.0, 0.0], abs=1e-15)


def test_simpo_is_eq6_on_per_token_means_and_ignores_the_reference():
    mc, mr = PC / 5, PR / 7
    want = -log_sigmoid(BETA * (mc - mr) - GAMMA)
    for ref in (t(0.0), t(123.0)):
        assert preference_loss(
            "simpo", t(mc), t(mr), ref, -ref, BETA, gamma=GAMMA
        ).item() == pytest.approx(want, abs=1e-14)


def test_dpo_kind_is_chapter4_eq38():
    lp = torch.randn(4, 50, **F64) * 5
    assert torch.equal(preference_loss("dpo", *lp, 0.2), dpo_loss(*lp, 0.2))


def test_cdpo_is_dpo_with_each_label_flipped_with_probability_eps():
    pc, pr, rc, rr = torch.randn(4, 30, **F64) * 3
    mixed = (1 - EPS) * dpo_loss(pc, pr, rc, rr, BETA) + EPS * dpo_loss(pr, pc, rr, rc, BETA)
    assert torch.allclose(
        preference_loss("cdpo", pc, pr, rc, rr, BETA, label_smoothing=EPS),
        mixed,
        atol=1e-14,
        rtol=0,
    )


def test_rdpo_is_unbiased_for_dpo_under_label_flips():
    pc, pr, rc, rr = torch.randn(4, 30, **F64) * 3
    rdpo = partial(preference_loss, "rdpo", beta=BETA, label_smoothing=EPS)
    expected = (1 - EPS) * rdpo(pc, pr, rc, rr) + EPS * rdpo(
        pr, pc, rr, rc
    )  # over the flip of the observed label
    assert torch.allclose(expected, dpo_loss(pc, pr, rc, rr, BETA), atol=1e-13, rtol=0)


def test_orpo_is_nll_plus_lambda_odds_ratio_term_by_hand():
    mc, mr, lam = -0.8, -1.9, 0.25
    log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
    assert orpo_loss(t(mc), t(mr), lam).item() == pytest.approx(
        -mc - lam * log_sigmoid(log_odds), abs=1e-14
    )
    assert orpo_loss(t(mc), t(mr), lam, chosen_nll=t(2.0)).item() == pytest.approx(
        2 - lam * log_sigmoid(log_odds), abs=1e-14
    )


def test_orpo_odds_stay_finite_near_probability_one_and_for_tiny_probabilities():
    got = orpo_loss(t(-1e-12, -300.0), t(-300.0, -1e-12), 1.0)
    assert torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(
        1e-12 + math.log1p(math.exp(-(math.log(1e12) + 300))), abs=1e-12
    )


def test_kto_loss_by_hand_and_its_reference_point_is_a_clamped_detached_mean():
    z0 = 0.4
    r = PC - RC
    got = kto_loss(
        t(PC, PC),
        t(RC, RC),
        torch.tensor([True, False]),
        BETA,
        z0,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    want = [
        1.5 - 1.5 / (1 + math.exp(-BETA * (r - z0))),
        0.5 - 0.5 / (1 + math.exp(-BETA * (z0 - r))),
    ]
    assert got.tolist() == pytest.approx(want, abs=1e-14)
    pol = t(-3.0, -5.0).requires_grad_(True)
    assert kto_reference_point(pol, t(-4.0, -4.5)).item() == pytest.approx(
        0.25
    )  # mean of 1 and −0.5
    assert not kto_reference_point(pol, t(-4.0, -4.5)).requires_grad
    assert kto_reference_point(t(-9.0), t(-1.0)).item() == 0.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: preference_loss("dop", t(0), t(0), t(0), t(0), 0.1), "unknown kind"),
        (lambda: preference_loss("dpo", t(0), t(0), t(0), t(0), 0.0), "beta must be > 0"),
        (lambda: preference_loss("ipo", t(0), t(0), t(0), t(0), -1.0), "beta must be > 0"),
        (
            lambda: preference_loss("rdpo", t(0), t(0), t(0), t(0), 0.1, label_smoothing=0.5),
            r"\[0, 0.5\)",
        ),
        (
            lambda: preference_loss("cdpo", t(0), t(0), t(0), t(0), 0.1, label_smoothing=-0.1),
            r"\[0, 0.5\)",
        ),
        (
            lambda: preference_loss("dpo", t(0), t(0), t(0), t(0), 0.1, label_smoothing=0.1),
            "only by 'cdpo' and 'rdpo'",
        ),
        (lambda: preference_loss("ipo", t(0), t(0), t(0), t(0), 0.1, gamma=1.0), "only by 'simpo'"),
        (lambda: orpo_loss(t(0.0), t(-1.0), 0.1), "< 0"),
        (lambda: orpo_loss(t(-1.0), t(-2.0), -0.1), ">= 0"),
        (lambda: kto_loss(t(-1.0), t(-1.0), True, 0.0, 0.0), "beta must be > 0"),
    ],
)
def test_bad_arguments_raise_a_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


# -----------------------------------------------------------------------------------------
# population minimisers
@pytest.fixture(scope="module")
def problem():
    """Chapter 4's tabular problem: π_ref, r*, BT rows from π_ref, β = 0.5."""
    pi_ref, rewards = tabular_problem(0)
    return pi_ref, rewards, preference_probabilities(pi_ref, rewards), 0.5


def pairs(kind, beta, **kw):
    return partial(preference_loss, kind, beta=beta, **kw)


def test_dpo_population_minimiser_is_pi_star(problem):
    pi_ref, rewards, weights, beta = problem
    pi = minimise_pairs(pairs("dpo", beta), pi_ref, weights)
    assert (pi - gibbs(pi_ref, rewards, beta)).abs().max() < 1e-12


def test_ipo_population_minimiser_is_pi_ref_tilted_by_the_win_rate_against_pi_ref_not_pi_star(
    problem,
):
    pi_ref, rewards, weights, beta = problem
    pi = minimise_pairs(pairs("ipo", beta), pi_ref, weights)
    win_rate = (pi_ref[:, None, :] * torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])).sum(
        -1
    )  # p*(y ≻ π_ref)
    assert (pi - gibbs(pi_ref, win_rate, beta)).abs().max() < 1e-12
    assert (pi - gibbs(pi_ref, rewards, beta)).abs().max() > 0.1


def test_hinge_minimiser_beats_every_nearby_policy_and_its_log_ratio_gaps_are_integers_over_beta(
    problem,
):
    pi_ref, rewards, weights, beta = problem
    pi = hinge_minimiser(pi_ref, weights, beta)
    loss = lambda p: pair_table_loss(pairs("hinge", beta), torch.log(p), pi_ref, weights).item()  # noqa: E731
    best = loss(pi)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        other = torch.softmax(torch.log(pi) + 0.3 * torch.randn(pi.shape, generator=g, **F64), -1)
        assert loss(other) >= best - 1e-12
    assert loss(gibbs(pi_ref, rewards, beta)) > best + 1e-3  # π* is not a minimiser
    u = beta * (torch.log(pi) - torch.log(pi_ref))
    steps = u - u.min(-1, keepdim=True).values
    assert (steps - steps.round()).abs().max() < 1e-9


def test_simpo_minimiser_is_reference_free_and_length_scaled(problem):
    pi_ref, rewards, weights, beta = problem
    lengths = torch.arange(1, 7)
    uniform = torch.full_like(pi_ref, 1 / 6)
    pi = minimise_pairs(pairs("simpo", beta), pi_ref, weights, lengths, start=uniform)
    # β·log π(y)/|y| − r*(y) is the same for every y of a prompt: BT fitted exactly on
    # length-normalised rewards
    offset = beta * torch.log(pi) / lengths - rewards
    assert (offset - offset.mean(-1, keepdim=True)).abs().max() < 1e-10
    assert (pi - simpo_optimal_policy(rewards, lengths, beta)).abs().max() < 1e-10
    other_ref = torch.softmax(
        torch.randn(pi_ref.shape, generator=torch.Generator().manual_seed(5), **F64), -1
    )
    again = minimise_pairs(
        pairs("simpo", beta),
        other_ref,
        preference_probabilities(other_ref, rewards),
        lengths,
        start=uniform,
    )
    assert (again - pi).abs().max() < 1e-8


def test_simpo_target_margin_widens_the_two_response_optimum_as_its_stationarity_equation_says():
    beta, gamma = 0.5, 0.8
    pi_ref, rewards, weights = two_responses(1.0, beta)
    pi = minimise_pairs(
        pairs("simpo", beta, gamma=gamma), pi_ref, weights, start=torch.full_like(pi_ref, 0.5)
    )
    d = (
        beta * (torch.log(pi[0, 0]) - torch.log(pi[0, 1])).item()
    )  # β·(log π(y0) − log π(y1)), both of length 1
    p = 1 / (1 + math.exp(-1.0))
    # p·σ(γ − d) = (1 − p)·σ(γ + d): both orders of the pair at their joint optimum
    assert p / (1 + math.exp(d - gamma)) == pytest.approx(
        (1 - p) / (1 + math.exp(-d - gamma)), abs=1e-12
    )
    assert d > math.log(p / (1 - p))  # wider than the γ = 0 optimum, logit p


def test_cdpo_two_response_minimiser_is_pi_star_for_the_smoothed_preference_shrunk_reward():
    beta, eps, gap = 0.5, 0.1, 2.0
    pi_ref, rewards, weights = two_responses(gap, beta)
    pi = minimise_pairs(pairs("cdpo", beta, label_smoothing=eps), pi_ref, weights)
    p = eps + (1 - 2 * eps) / (1 + math.exp(-gap))
    assert beta * margin(pi, pi_ref) == pytest.approx(math.log(p / (1 - p)), abs=1e-10)
    assert math.log(p / (1 - p)) < gap


def test_cdpo_keeps_a_finite_minimiser_when_preferences_are_deterministic():
    beta, eps = 0.5, 0.1
    pi_ref, rewards, weights = two_responses(3.0, beta)
    pi = minimise_pairs(
        pairs("cdpo", beta, label_smoothing=eps), pi_ref, deterministic_labels(weights, rewards)
    )
    assert beta * margin(pi, pi_ref) == pytest.approx(math.log((1 - eps) / eps), abs=1e-10)


def test_dpo_on_flipped_labels_shrinks_the_reward_and_rdpo_at_the_true_rate_recovers_pi_star(
    problem,
):
    pi_ref, rewards, weights, beta = problem
    eps = 0.2
    noisy = flip_labels(weights, eps)
    pi_star = gibbs(pi_ref, rewards, beta)
    rdpo = minimise_pairs(pairs("rdpo", beta, label_smoothing=eps), pi_ref, noisy)
    assert (rdpo - pi_star).abs().max() < 1e-12
    dpo = minimise_pairs(pairs("dpo", beta), pi_ref, noisy)
    assert (dpo - pi_star).abs().max() > 0.05
    centred = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
    r_hat, r = centred(beta * torch.log(dpo / pi_ref)), centred(rewards)
    slope = ((r_hat * r).sum() / (r * r).sum()).item()
    assert 0.3 < slope < 1 - 2 * eps + 0.05  # shrunk, about as the flip rate says
    two_ref, two_r, two_w = two_responses(
        1.5, beta
    )  # with two responses the shrunk reward is exact
    pi = minimise_pairs(pairs("dpo", beta), two_ref, flip_labels(two_w, eps))
    p = eps + (1 - 2 * eps) / (1 + math.exp(-1.5))
    assert beta * margin(pi, two_ref) == pytest.approx(math.log(p / (1 - p)), abs=1e-10)


def test_dpo_has_no_minimiser_under_deterministic_preferences_and_ipo_has_a_finite_one(
    problem,
):
    pi_ref, rewards, weights, _ = problem
    det = deterministic_labels(weights, rewards)
    best_mass = -torch.log(pi_ref.gather(-1, rewards.argmax(-1, keepdim=True))).mean().item()
    win = (rewards[:, :, None] > rewards[:, None, :]).double() + 0.5 * torch.eye(6, **F64)
    for beta in (0.1, 2.0):
        losses, kls = [], []
        loss_fn = partial(pair_table_loss, pairs("dpo", beta), pi_ref=pi_ref, weights=det)

        def record(k, theta):
            losses.append(loss_fn(theta).item())
            p = torch.softmax(theta, -1)
            kls.append((p * (torch.log(p) - torch.log(pi_ref))).nansum(-1).mean().item())

        dpo = torch.softmax(
            newton_path(loss_fn, torch.log(pi_ref), max_iter=25, on_step=record), -1
        )
        assert all(b < a for a, b in zip(losses, losses[1:]))  # every step still lowers the loss
        assert losses[-1] < 1e-6 and kls[-1] == pytest.approx(
            best_mass, abs=1e-3
        )  # towards all mass on the best
        ipo = minimise_pairs(pairs("ipo", beta), pi_ref, det)
        assert (ipo - gibbs(pi_ref, (pi_ref[:, None, :] * win).sum(-1), beta)).abs().max() < 1e-12
        floor = pi_ref * math.exp(-1 / beta)  # p*(y ≻ π_ref) ∈ [0, 1] keeps π_IPO ≥ π_ref·e^(−1/β)
        assert (ipo >= floor).all() and (dpo < floor).any()


def test_kto_minimiser_gives_no_mass_to_responses_chosen_less_often_than_rejected(problem):
    pi_ref, rewards, weights, beta = problem
    desirable, undesirable = unpaired(weights)
    loss = partial(kto_loss, beta=beta)
    pi, z0 = kto_minimiser(loss, pi_ref, desirable, undesirable)
    assert z0 == pytest.approx(
        (pi * (torch.log(pi) - torch.log(pi_ref))).nansum(-1).mean().item(), abs=1e-10
    )
    losers = undesirable > desirable
    assert losers.any() and (pi[losers] == 0).all()

    def at(p):
        return kto_table_loss(
            loss, torch.log(p).clamp(min=-1000), pi_ref, desirable, undesirable, z0
        ).item()  # noqa: E731

    base = at(pi)
    for x, y in torch.nonzero(
        losers
    ).tolist():  # move a little mass from the prompt's largest response onto a loser
        moved = pi.clone()
        moved[x, y] += 1e-4
        moved[x, pi[x].argmax()] -= 1e-4
        assert at(moved) > base
    theta = torch.log(pi).clamp(min=-1000).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        kto_table_loss(loss, theta, pi_ref, desirable, undesirable, z0), theta
    )
    assert grad[~losers].abs().max() < 1e-10  # stationary on the responses that keep mass


def test_orpo_minimiser_tends_to_its_sft_optimum_as_lambda_goes_to_zero(problem):
    pi_ref, rewards, weights, beta = problem
    lengths = torch.arange(1, 7)
    chosen = weights.sum(2)  # P(x, y chosen)
    sft = (
        chosen / lengths / (chosen / lengths).sum(-1, keepdim=True)
    )  # argmin of −Σ_y P(y chosen)·log π(y)/|y|
    far = []
    for lam in (1e-4, 1e-1):
        pi = minimise_pairs(
            lambda pc, pr, rc, rr: orpo_loss(pc, pr, lam),
            pi_ref,
            weights,
            lengths,
            start=torch.full_like(pi_ref, 1 / 6),
        )
        far.append((pi - sft).abs().max().item())
    assert far[0] < 1e-3 < far[1]


# ---------------------------------------------------------------------------- chapter 7's miniature
LOSSES = dict(
    preference=preference_loss, orpo=orpo_loss, kto=kto_loss, reference_point=kto_reference_point
)
TINY = dict(
    prompts=2,
    sft_sequences=64,
    sft_steps=2,
    sft_batch=32,
    sft_lr=3e-3,
    draws=2,
    k=4,
    steps=3,
    checkpoints=(3,),
    batch_size=8,
    lr=1e-2,
    frontier=np.geomspace(0.05, 100.0, 60),
)


@pytest.fixture(scope="module")
def tiny():
    setup = reference_and_pairs(TINY, seed=0)
    add_mismatched(setup["data"], setup["ref"], torch.Generator().manual_seed(1))
    return setup


def test_miniature_dpo_loss_is_chapter7s(tiny):
    batch = {k: v[:12] for k, v in tiny["data"].items()}
    ours = family_batch_loss("dpo", LOSSES, tiny["ref"], batch, 0.7)
    assert torch.allclose(ours, dpo_batch_loss(tiny["ref"], batch, 0.7), atol=0, rtol=0)


def test_miniature_kto_treats_its_reference_point_as_a_constant(tiny):
    policy = copy.deepcopy(tiny["ref"]).requires_grad_(True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {k: v[:12] for k, v in tiny["data"].items()}
    params = list(policy.parameters())
    got = torch.autograd.grad(family_batch_loss("kto", LOSSES, policy, batch, 0.5), params)
    with torch.no_grad():
        z0 = max(
            0.0,
            (logprob(policy, batch["prompt"], batch["mismatched"]) - batch["ref_mismatched"])
            .mean()
            .item(),
        )
    pc, pr = (
        logprob(policy, batch["prompt"], batch["chosen"]),
        logprob(policy, batch["prompt"], batch["rejected"]),
    )
    by_hand = torch.cat(
        [
            1 - torch.sigmoid(0.5 * (pc - batch["ref_chosen"] - z0)),
            1 - torch.sigmoid(0.5 * (z0 - pr + batch["ref_rejected"])),
        ]
    ).mean()
    want = torch.autograd.grad(by_hand, params)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(got, want))


def test_every_miniature_checkpoint_lies_on_or_below_the_exact_frontier(tiny):
    runs = [
        (kind, "β=0.5", partial(family_batch_loss, kind, LOSSES, beta=0.5, **kw))
        for kind, kw in (("dpo", {}), ("simpo", dict(gamma=0.5)), ("orpo", {}), ("kto", {}))
    ]
    rows, front = train_and_place(tiny, runs, TINY, seed=0)
    assert len(rows) == len(runs) * len(TINY["checkpoints"])
    for r in rows:
        assert r["reward"] <= frontier_reward(r["kl"], front.rewards, front.kls) + 1e-6
