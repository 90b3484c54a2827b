"""Chapter 11: likelihood displacement, its fixes, gradient asymmetry and R-DPO, exactly in float64.

Each closed form is computed here independently: softmax scores and inner products in numpy,
losses with math on floats, optima as π_ref·exp(·/β) normalised by hand. Newton's and autograd's
answers are checked against them. Tolerances are stated where they are used.
"""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch11_dpo_pitfalls.__main__ as ch11_main
from chapters.ch4_dpo import dpo_loss, response_logprobs
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo.__main__ import parse_args as ch8_parse_args
from chapters.ch8_instruction_dpo.data import Pair
from chapters.ch8_instruction_dpo.dpo_step import dpo_batches
from chapters.ch8_instruction_dpo.reference_store import pairs_sha256
from chapters.ch8_instruction_dpo.scaled_run import Scale
from chapters.ch8_instruction_dpo.trainers import train_dpo
from chapters.ch8_instruction_dpo.win_rates import generate_responses
from chapters.ch11_dpo_pitfalls import (
    FeaturePair,
    ches_score,
    descent_path,
    displacement_example,
    dpo_logprob_gradients,
    dpop_logprob_gradients,
    dpop_loss,
    fit_r_dpo,
    miniature_runs,
    predicted_chosen_change,
    probability_gradients,
    r_dpo_loss,
    r_dpo_optimal_policy,
    r_dpo_population_loss,
    realised_chosen_change,
    rpo_logprob_gradients,
    rpo_loss,
    smallest_fix,
    step_readings,
)
from chapters.ch11_dpo_pitfalls.__main__ import main
from chapters.ch11_dpo_pitfalls.miniature_runs import (
    SETTINGS,
    Objective,
    greedy_responses,
    objective_step,
    train_objective,
)
from chapters.ch11_dpo_pitfalls.pair_readings import (
    displacement_summary,
    pair_readings,
    spearman,
)
from chapters.common.rows import pair_rows
from chapters.training.checkpoints import save_gpt2
from gpt import GPT, GPTConfig

F64 = dict(dtype=torch.float64)
LN2 = math.log(2.0)
DISPLACED = torch.tensor([-2.0, 1.0], **F64)  # θ ten DPO-directions along: π(y_w) below π_ref(y_w)


def t(*v):
    return torch.tensor(v, **F64)


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def hand_scores(pair, theta):
    """∇_θ log π(y) = φ_y − Σ_y' π(y')·φ_y', with the softmax written out in numpy."""
    phi = pair.features.numpy()
    logits = phi @ theta.numpy()
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    return phi - pi @ phi, np.log(pi)


def hand_terms(pair, theta, beta):
    """(‖g_w‖², ⟨g_w, g_l⟩, σ(−z), log π(y_w) − log π_ref(y_w)) by hand."""
    g, logp = hand_scores(pair, theta)
    ref = pair.ref_logps.numpy()
    gw, gl = g[pair.chosen], g[pair.rejected]
    h = (logp[pair.chosen] - ref[pair.chosen]) - (logp[pair.rejected] - ref[pair.rejected])
    return gw @ gw, gw @ gl, sigmoid(-beta * h), logp[pair.chosen] - ref[pair.chosen]


def gibbs(pi_ref, reward, beta):
    """Eq. (36) written out: π_ref·exp(reward/β), normalised per prompt (numpy)."""
    w = pi_ref * np.exp(reward / beta)
    return w / w.sum(-1, keepdims=True)


# ----------------------------------------------------------------------- likelihood displacement
def test_feature_scores_match_autograd():
    pair, _ = displacement_example()
    theta = t(0.7, -1.3)
    jac = torch.autograd.functional.jacobian(pair.logprobs, theta)  # (Y, d)
    assert torch.allclose(pair.scores(theta), jac, atol=1e-15, rtol=0)


@pytest.mark.parametrize("theta", [torch.zeros(2, **F64), DISPLACED], ids=["at_ref", "displaced"])
def test_predicted_change_is_eta_beta_sigma_times_inner_product(theta):
    pair, _ = displacement_example()
    beta, lr = 0.5, 1e-2
    gw_gw, gw_gl, s, _ = hand_terms(pair, theta, beta)
    by_hand = lr * beta * s * (gw_gw - gw_gl)  # η·β·σ(−z)·⟨g_w, g_w − g_l⟩
    assert by_hand < 0  # the example displaces here
    got = predicted_chosen_change(pair, theta, beta, lr).item()
    assert got == pytest.approx(by_hand, rel=1e-13, abs=0)


@pytest.mark.parametrize("kind, weight", [("dpo", 0.0), ("dpop", 1.0), ("rpo", 0.5)])
@pytest.mark.parametrize("theta", [torch.zeros(2, **F64), DISPLACED], ids=["at_ref", "displaced"])
def test_first_order_change_matches_real_step_as_lr_shrinks(kind, weight, theta):
    pair, _ = displacement_example()
    errors = []
    for lr in (1e-3, 1e-5):
        predicted = predicted_chosen_change(pair, theta, 1.0, lr, kind, weight)
        real, _ = realised_chosen_change(pair, theta, 1.0, lr, kind, weight)
        errors.append(abs((predicted / real).item() - 1))
        assert errors[-1] <= 0.2 * lr  # the Taylor remainder is O(η²) against a change O(η)
    assert errors[1] <= errors[0] / 50  # and it shrinks with η: first order, not a coincidence


def test_dpo_lowers_the_chosen_logprob_while_the_loss_falls():
    pair, theta0 = displacement_example()
    d_chosen, d_loss = realised_chosen_change(pair, theta0, 1.0, 1.0)
    assert d_chosen < 0 and d_loss < 0  # one real step: y_w less likely, loss lower
    path = descent_path(pair, theta0, beta=1.0, lr=1.0, steps=300)
    ref_w, ref_l = pair.ref_logps[pair.chosen], pair.ref_logps[pair.rejected]
    assert bool((path["loss"].diff() < 0).all())  # the loss falls at every step ...
    assert bool((path["chosen"].diff() < 0).all())  # ... and so does log π(y_w), at every step
    assert path["chosen"][-1] < ref_w - 10  # by more than 10 nats below the reference
    margin = (path["chosen"][-1] - ref_w) - (path["rejected"][-1] - ref_l)
    assert margin > 2  # the pair is ordered: the implicit reward calls this a success
    # every DPO step moves θ along −(φ_w − φ_l) = (−0.2, 0.1): θ stays on that ray
    end = path["theta"]
    assert end[0] < 0 and abs(end[0] / end[1] + 2.0) < 1e-12


@pytest.mark.parametrize("theta", [torch.zeros(2, **F64), DISPLACED], ids=["at_ref", "displaced"])
def test_dpop_lambda_above_threshold_stops_the_chosen_logprob_falling(theta):
    pair, _ = displacement_example()
    beta, lr = 1.0, 1e-4
    gw_gw, gw_gl, _, below = hand_terms(pair, theta, beta)
    assert below <= 0  # π(y_w) ≤ π_ref(y_w): DPOP's penalty is active (at the kink, by convention)
    lam_star = gw_gl / gw_gw - 1  # Δℓ_w ∝ (1 + λ)‖g_w‖² − ⟨g_w, g_l⟩
    assert lam_star > 0.1
    assert smallest_fix(pair, theta, beta, "dpop") == pytest.approx(lam_star, rel=1e-13)
    assert abs(predicted_chosen_change(pair, theta, beta, lr, "dpop", lam_star)) < 1e-18
    for lam, sign in ((0.0, -1), (lam_star - 0.1, -1), (lam_star + 0.1, 1)):
        predicted = predicted_chosen_change(pair, theta, beta, lr, "dpop", lam)
        real, _ = realised_chosen_change(pair, theta, beta, lr, "dpop", lam)
        assert sign * predicted > 0 and sign * real > 0, (lam, predicted, real)


@pytest.mark.parametrize("theta", [torch.zeros(2, **F64), DISPLACED], ids=["at_ref", "displaced"])
def test_rpo_alpha_above_threshold_stops_the_chosen_logprob_falling(theta):
    pair, _ = displacement_example()
    beta, lr = 1.0, 1e-4
    gw_gw, gw_gl, s, _ = hand_terms(pair, theta, beta)
    # Δℓ_w ∝ β·σ(−z)·(‖g_w‖² − ⟨g_w, g_l⟩) + (α/|y_w|)·‖g_w‖²
    alpha_star = pair.chosen_length * beta * s * (gw_gl - gw_gw) / gw_gw
    assert alpha_star > 0.1
    assert smallest_fix(pair, theta, beta, "rpo") == pytest.approx(alpha_star, rel=1e-13)
    assert abs(predicted_chosen_change(pair, theta, beta, lr, "rpo", alpha_star)) < 1e-18
    for alpha, sign in ((0.0, -1), (alpha_star - 0.1, -1), (alpha_star + 0.1, 1)):
        predicted = predicted_chosen_change(pair, theta, beta, lr, "rpo", alpha)
        real, _ = realised_chosen_change(pair, theta, beta, lr, "rpo", alpha)
        assert sign * predicted > 0 and sign * real > 0, (alpha, predicted, real)


def test_fixes_keep_the_chosen_logprob_near_the_reference_over_a_run():
    pair, theta0 = displacement_example()
    ref_w = pair.ref_logps[pair.chosen]
    dpo = descent_path(pair, theta0, 1.0, 1.0, 300)
    dpop = descent_path(pair, theta0, 1.0, 1.0, 300, "dpop", 5.0)
    rpo = descent_path(pair, theta0, 1.0, 1.0, 300, "rpo", 2.0)
    assert dpo["chosen"].min() < ref_w - 10
    # DPOP steps across its kink at π(y_w) = π_ref(y_w): one step of size η = 1 can overshoot it by
    # a few hundredths of a nat (0.06 measured), against DPO's 14.7 nats
    assert dpop["chosen"].min() > ref_w - 0.1 and dpop["chosen"][-1] > ref_w
    assert rpo["chosen"].min() >= ref_w - 1e-12 and rpo["chosen"][-1] > ref_w + 0.5
    for path in (dpop, rpo):  # and both still order the pair
        margin = (path["chosen"][-1] - ref_w) - (path["rejected"][-1] - pair.ref_logps[1])
        assert margin > 0.5


def test_tabular_softmax_never_displaces_a_single_pair():
    # one-hot features: g_y = e_y − π, so ⟨g_w, g_w − g_l⟩ = 1 − π_w + π_l > 0 for every π
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = torch.randn(5, generator=gen, **F64) * 2
        pair = FeaturePair(torch.eye(5, **F64), torch.log_softmax(torch.randn(5, **F64), -1), 1, 3)
        pi = torch.softmax(theta, -1)
        s = torch.sigmoid(
            -(
                pair.logprobs(theta)[1]
                - pair.ref_logps[1]
                - pair.logprobs(theta)[3]
                + pair.ref_logps[3]
            )
        )
        by_hand = 0.1 * 1.0 * s * (1 - pi[1] + pi[3])  # η = 0.1, β = 1
        assert predicted_chosen_change(pair, theta, 1.0, 0.1).item() == pytest.approx(
            by_hand.item(), rel=1e-12
        )
        assert smallest_fix(pair, theta, 1.0, "dpop") == 0.0
        assert smallest_fix(pair, theta, 1.0, "rpo") == 0.0


def test_dpop_cannot_help_while_the_chosen_response_is_above_reference():
    pair, _ = displacement_example()
    above = t(1.0, 0.0)  # lifts y_w above π_ref; the features still displace there
    gw_gw, gw_gl, _, lift = hand_terms(pair, above, 1.0)
    assert lift > 0 and gw_gl > gw_gw
    assert smallest_fix(pair, above, 1.0, "dpop") == math.inf
    assert predicted_chosen_change(pair, above, 1.0, 1e-3, "dpop", 100.0) == pytest.approx(
        predicted_chosen_change(pair, above, 1.0, 1e-3).item(), rel=1e-15
    )  # DPOP = DPO there


# ----------------------------------------------------------------------- CHES
def test_ches_matches_hand_computation():
    chosen = t(1, 2, 0, 1, -1, 3).reshape(1, 3, 2)  # T_w = 3, d = 2
    rejected = t(2, 0, 1, 1).reshape(1, 2, 2)  # T_l = 2
    s_w, s_l = (1 + 0 - 1, 2 + 1 + 3), (2 + 1, 0 + 1)  # (0, 6) and (3, 1)
    by_hand = (s_w[0] * s_l[0] + s_w[1] * s_l[1]) - (s_w[0] ** 2 + s_w[1] ** 2)  # 6 − 36
    assert ches_score(chosen, rejected).tolist() == [by_hand]


def test_ches_ignores_masked_padding_on_either_side():
    gen = torch.Generator().manual_seed(1)
    chosen = [torch.randn(n, 4, generator=gen, **F64) for n in (3, 5)]
    rejected = [torch.randn(n, 4, generator=gen, **F64) for n in (4, 2)]
    unpadded = torch.stack([ches_score(c[None], r[None])[0] for c, r in zip(chosen, rejected)])

    def pad(rows, width, left):
        out = torch.full((len(rows), width, 4), 1e3, **F64)  # garbage at the padding
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            out[i, span], mask[i, span] = r, True
        return out, mask

    for left in (False, True):
        (cw, cm), (rw, rm) = pad(chosen, 6, left), pad(rejected, 5, left)
        got = ches_score(cw, rw, cm, rm)
        assert torch.allclose(got, unpadded, rtol=1e-14, atol=1e-12)
    # and leading dims: (2, B, T, d) gives (2, B)
    stacked = ches_score(
        torch.stack([cw, cw]), torch.stack([rw, rw]), torch.stack([cm, cm]), torch.stack([rm, rm])
    )
    assert stacked.shape == (2, 2) and torch.allclose(stacked[1], unpadded, rtol=1e-14, atol=1e-12)


# ----------------------------------------------------------------------- DPOP and DPO + NLL
def test_dpop_loss_is_eq38_above_reference_and_penalised_below():
    beta, lam = 0.3, 2.0
    pr, rc, rr = -6.5, -5.0, -5.5
    for pc in (-4.0, -5.0, -6.0):  # above, at and below π_ref(y_w)
        h = (pc - rc) - (pr - rr)
        by_hand = -math.log(sigmoid(beta * (h - lam * max(0.0, rc - pc))))
        got = dpop_loss(t(pc), t(pr), t(rc), t(rr), beta, lam).item()
        assert got == pytest.approx(by_hand, rel=1e-14)
    gen = torch.Generator().manual_seed(2)
    lp = torch.randn(4, 16, generator=gen, **F64) * 3
    # λ = 0 is eq. (38), up to rounding (β·(a − b) against β·a − β·b)
    assert torch.allclose(dpop_loss(*lp, beta, 0.0), dpo_loss(*lp, beta), rtol=1e-14, atol=1e-15)


def test_rpo_loss_adds_alpha_times_the_per_token_nll():
    beta, alpha, length = 0.3, 0.7, 12.0
    pc, pr, rc, rr = -14.0, -16.5, -15.0, -15.5
    by_hand = -math.log(sigmoid(beta * ((pc - rc) - (pr - rr)))) + alpha * (-pc / length)
    got = rpo_loss(t(pc), t(pr), t(rc), t(rr), t(length), beta, alpha).item()
    assert got == pytest.approx(by_hand, rel=1e-14)


def test_logprob_gradients_match_autograd():
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(64, generator=gen, **F64) * 2 for _ in range(4))
    pc[:4] = rc[:4]  # DPOP's kink: the penalty's derivative is taken as 1 there (torch.clamp's)
    lengths = torch.randint(1, 30, (64,), generator=gen).to(torch.float64)
    beta, lam, alpha = 0.7, 1.5, 0.4
    cases = [
        (lambda a, b: dpo_loss(a, b, rc, rr, beta), dpo_logprob_gradients(pc, pr, rc, rr, beta)),
        (
            lambda a, b: dpop_loss(a, b, rc, rr, beta, lam),
            dpop_logprob_gradients(pc, pr, rc, rr, beta, lam),
        ),
        (
            lambda a, b: rpo_loss(a, b, rc, rr, lengths, beta, alpha),
            rpo_logprob_gradients(pc, pr, rc, rr, lengths, beta, alpha),
        ),
    ]
    assert bool((pc < rc).any() and (pc > rc).any())  # both sides of the kink are covered
    for loss_fn, (a_w, a_l) in cases:
        w, l_ = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        grad_w, grad_l = torch.autograd.grad(loss_fn(w, l_).sum(), (w, l_))
        assert torch.allclose(a_w, grad_w, rtol=1e-13, atol=1e-15)
        assert torch.allclose(a_l, grad_l, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------- gradient asymmetry
def test_probability_gradients_match_autograd():
    gen = torch.Generator().manual_seed(4)
    probs = [torch.rand(32, generator=gen, **F64) * 0.98 + 0.01 for _ in range(4)]
    beta = 0.4
    leaves = [p.clone().requires_grad_(True) for p in probs[:2]]
    pw, pl = leaves
    rw, rl = probs[2:]
    loss = -F.logsigmoid(beta * (torch.log(pw / rw) - torch.log(pl / rl)))  # eq. (38), by hand
    grad_w, grad_l = torch.autograd.grad(loss.sum(), leaves)
    got_w, got_l = probability_gradients(*probs, beta)
    assert torch.allclose(got_w, grad_w, rtol=1e-13, atol=0)
    assert torch.allclose(got_l, grad_l, rtol=1e-13, atol=0)


def test_probability_gradient_ratio_is_chosen_over_rejected_probability():
    pw, pl, rw, rl = t(0.5, 0.2), t(0.01, 0.4), t(0.3, 0.3), t(0.05, 0.3)
    g_w, g_l = probability_gradients(pw, pl, rw, rl, beta=0.1)
    assert bool((g_w < 0).all() and (g_l > 0).all())  # raise π(y_w), lower π(y_l)
    ratio = (g_l.abs() / g_w.abs()).tolist()
    assert ratio == pytest.approx([50.0, 0.5], rel=1e-14)  # π(y_w)/π(y_l)


def test_first_step_reads_ln2_zero_margin_and_zero_accuracy():
    gen = torch.Generator().manual_seed(5)
    ref_w, ref_l = (torch.randn(32, generator=gen, **F64) * 10 for _ in range(2))
    beta = 0.1
    first = step_readings(ref_w, ref_l, ref_w, ref_l, beta)  # policy = reference
    assert first["loss"] == pytest.approx(LN2, abs=1e-15)
    assert first["margin"] == 0.0 and first["accuracy"] == 0.0
    assert first["chosen_gradient"] == pytest.approx(-beta / 2, abs=1e-17)
    moved = step_readings(ref_w + 1e-3, ref_l, ref_w, ref_l, beta)  # a step raising every y_w
    assert moved["accuracy"] == 1.0 and moved["loss"] < LN2


# ----------------------------------------------------------------------- length and R-DPO
def test_r_dpo_loss_hand_value_and_its_sign():
    beta, alpha = 0.2, 0.05
    pc, pr, rc, rr, lw, ll = -30.0, -20.0, -31.0, -20.5, 40.0, 25.0
    h = (pc - rc) - (pr - rr)
    by_hand = -math.log(sigmoid(beta * h + alpha * (lw - ll)))
    args = (t(pc), t(pr), t(rc), t(rr), t(lw), t(ll))
    assert r_dpo_loss(*args, beta, alpha).item() == pytest.approx(by_hand, rel=1e-14)
    # a longer chosen response already counts toward the preference: less loss, less push
    assert r_dpo_loss(*args, beta, alpha) < dpo_loss(*args[:4], beta)
    assert torch.allclose(
        r_dpo_loss(*args, beta, 0.0), dpo_loss(*args[:4], beta), rtol=1e-14, atol=1e-15
    )  # α = 0 is eq. (38)


def _length_world(seed=6, prompts=2, responses=5):
    gen = np.random.default_rng(seed)
    pi_ref = gen.dirichlet(np.ones(responses), size=prompts)  # (X, Y)
    quality = gen.normal(size=(prompts, responses))  # (X, Y)
    lengths = gen.integers(1, 9, size=responses).astype(float)  # (Y,)
    return pi_ref, quality, lengths


def test_r_dpo_optimum_matches_newton_for_any_pair_weights():
    pi_ref, rewards, lengths = _length_world()
    beta, alpha = 0.5, 0.2
    by_hand = gibbs(pi_ref, rewards - alpha * lengths, beta)  # (X, Y)
    args = [torch.from_numpy(a) for a in (pi_ref, rewards, lengths)]
    closed = r_dpo_optimal_policy(*args, beta, alpha).numpy()
    assert np.abs(closed - by_hand).max() < 1e-14
    x, y = pi_ref.shape
    off_diagonal = torch.ones(x, y, y, **F64) - torch.eye(y, **F64)
    random_weights = torch.from_numpy(np.random.default_rng(7).uniform(0.1, 2.0, (x, y, y)))
    for weights in (None, off_diagonal, random_weights):  # π_ref·π_ref, uniform, arbitrary > 0
        fitted = fit_r_dpo(*args, beta, alpha, pair_weights=weights).numpy()
        assert np.abs(fitted - by_hand).max() < 1e-8
        # and the fit is a real minimum: nudging it raises the loss
        theta = torch.log(torch.from_numpy(fitted))
        base = r_dpo_population_loss(theta, *args, beta, alpha, weights)
        nudged = theta.clone()
        nudged[0, 0] += 1e-3
        assert r_dpo_population_loss(nudged, *args, beta, alpha, weights) > base


def test_alpha_equal_to_gamma_removes_the_length_bias_exactly():
    pi_ref, quality, lengths = _length_world(seed=8)
    beta, gamma = 0.5, 0.3
    biased = quality + gamma * lengths  # a labeller that also likes length
    unbiased_optimum = gibbs(pi_ref, quality, beta)  # eq. (36) under q
    args = [torch.from_numpy(a) for a in (pi_ref, biased, lengths)]
    dpo_optimum = fit_r_dpo(*args, beta, 0.0).numpy()  # DPO on the biased labels
    assert np.abs(dpo_optimum - gibbs(pi_ref, biased, beta)).max() < 1e-8
    assert (dpo_optimum @ lengths > unbiased_optimum @ lengths + 0.5).all()  # longer answers
    r_dpo = fit_r_dpo(*args, beta, gamma).numpy()  # α = γ
    assert np.abs(r_dpo - unbiased_optimum).max() < 1e-8
    assert np.abs(r_dpo_optimal_policy(*args, beta, gamma).numpy() - unbiased_optimum).max() < 1e-14
    half = r_dpo_optimal_policy(*args, beta, gamma / 2).numpy()  # α = γ/2 removes half of it
    assert np.abs(half - unbiased_optimum).max() > 1e-2


# ----------------------------------------------------------------------- bad input
def _v(*values):
    return torch.tensor(values, **F64)


ONE, THREE, FOUR = _v(-1.0), _v(-1.0, -2.0, -3.0), _v(-1.0, -2.0, -3.0, -4.0)
PAIR, THETA = displacement_example()

BAD = [
    ("dpop_beta_zero", lambda: dpop_loss(ONE, ONE, ONE, ONE, 0.0, 1.0), "beta must be"),
    ("dpop_beta_nan", lambda: dpop_loss(ONE, ONE, ONE, ONE, math.nan, 1.0), "beta must be"),
    ("dpop_lam_negative", lambda: dpop_loss(ONE, ONE, ONE, ONE, 0.1, -0.5), "lam .* >= 0"),
    ("dpop_shapes", lambda: dpop_loss(THREE, FOUR, THREE, THREE, 0.1, 1.0), "do not broadcast"),
    ("rpo_alpha_negative", lambda: rpo_loss(ONE, ONE, ONE, ONE, _v(5), 0.1, -1.0), "alpha .* >= 0"),
    ("rpo_length_zero", lambda: rpo_loss(ONE, ONE, ONE, ONE, _v(0), 0.1, 1.0), "lengths > 0"),
    (
        "rpo_length_shape",
        lambda: rpo_loss(THREE, THREE, THREE, THREE, _v(4, 5), 0.1, 1.0),
        "do not broadcast",
    ),
    ("rpo_beta_negative", lambda: rpo_loss(ONE, ONE, ONE, ONE, _v(5), -1.0, 1.0), "beta must be"),
    (
        "r_dpo_alpha_negative",
        lambda: r_dpo_loss(ONE, ONE, ONE, ONE, _v(3), _v(4), 0.1, -0.1),
        "alpha .* >= 0",
    ),
    (
        "r_dpo_length_negative",
        lambda: r_dpo_loss(ONE, ONE, ONE, ONE, _v(3), _v(-4), 0.1, 0.1),
        "lengths > 0",
    ),
    (
        "r_dpo_shapes",
        lambda: r_dpo_loss(THREE, THREE, THREE, THREE, FOUR, THREE, 0.1, 0.1),
        "do not broadcast",
    ),
    (
        "r_dpo_optimum_alpha",
        lambda: r_dpo_optimal_policy(_v(0.5, 0.5), _v(0, 1), _v(1, 2), 1.0, -1.0),
        "alpha .* >= 0",
    ),
    (
        "r_dpo_optimum_lengths",
        lambda: r_dpo_optimal_policy(_v(0.5, 0.5), _v(0, 1), _v(0, 2), 1.0, 0.1),
        "lengths > 0",
    ),
    (
        "r_dpo_optimum_beta",
        lambda: r_dpo_optimal_policy(_v(0.5, 0.5), _v(0, 1), _v(1, 2), 0.0, 0.1),
        "beta must be",
    ),
    (
        "r_dpo_optimum_shapes",
        lambda: r_dpo_optimal_policy(_v(0.5, 0.5), _v(0, 1), THREE, 1.0, 0.1),
        "do not broadcast",
    ),
    (
        "population_weights",
        lambda: r_dpo_population_loss(
            torch.zeros(1, 2, **F64),
            _v(0.5, 0.5)[None],
            _v(0, 1)[None],
            _v(1, 2),
            1.0,
            0.1,
            -torch.ones(1, 2, 2, **F64),
        ),
        "pair_weights must be",
    ),
    (
        "probability_zero",
        lambda: probability_gradients(_v(0.0), _v(0.5), _v(0.5), _v(0.5), 0.1),
        "probabilities in",
    ),
    (
        "probability_above_one",
        lambda: probability_gradients(_v(0.5), _v(1.5), _v(0.5), _v(0.5), 0.1),
        "probabilities in",
    ),
    (
        "probability_beta",
        lambda: probability_gradients(_v(0.5), _v(0.5), _v(0.5), _v(0.5), -2),
        "beta must be",
    ),
    (
        "probability_shapes",
        lambda: probability_gradients(_v(0.5, 0.4), _v(0.5, 0.2, 0.1), _v(0.5), _v(0.5), 0.1),
        "do not broadcast",
    ),
    ("readings_beta", lambda: step_readings(ONE, ONE, ONE, ONE, 0), "beta must be"),
    (
        "dpop_gradients_lam",
        lambda: dpop_logprob_gradients(ONE, ONE, ONE, ONE, 0.1, -1),
        "lam .* >= 0",
    ),
    (
        "rpo_gradients_length",
        lambda: rpo_logprob_gradients(ONE, ONE, ONE, ONE, _v(0), 0.1, 1),
        "lengths > 0",
    ),
    (
        "ches_mask_shape",
        lambda: ches_score(
            torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
        ),
        "chosen_mask must",
    ),
    ("ches_width", lambda: ches_score(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), "one d"),
    (
        "ches_empty_row",
        lambda: ches_score(
            torch.zeros(2, 3, 4),
            torch.zeros(2, 3, 4),
            None,
            torch.tensor([[True] * 3, [False] * 3]),
        ),
        "no response",
    ),
    (
        "ches_batch",
        lambda: ches_score(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4)),
        "do not broadcast",
    ),
    ("kind_unknown", lambda: PAIR.loss(THETA, 0.1, "ipo"), "unknown kind"),
    ("kind_dpo_weight", lambda: PAIR.loss(THETA, 0.1, "dpo", 1.0), "takes none"),
    ("smallest_fix_kind", lambda: smallest_fix(PAIR, THETA, 0.1, "dpo"), "'dpop' or 'rpo'"),
]


@pytest.mark.parametrize("call, expected", [pytest.param(c, e, id=i) for i, c, e in BAD])
def test_bad_input_raises_a_one_line_value_error(call, expected):
    with pytest.raises(ValueError, match=expected) as err:
        call()
    assert "\n" not in str(err.value) and len(str(err.value)) <= 200, str(err.value)


# ----------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m chapters.ch11_dpo_pitfalls --quick`, once per module: (stdout, plots folder)."""
    with pytest.MonkeyPatch.context() as mp:
        out = tmp_path_factory.mktemp("ch11_plots")
        mp.setenv("DPO_PLOTS_DIR", str(out))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main(["--quick"])
        return printed.getvalue(), out


def _number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"no line matches {pattern!r}"
    return [float(g) for g in match.groups()]


def test_quick_run_prints_each_claim_beside_a_number_that_checks_it(quick_run):
    text, _ = quick_run
    for title in (
        "1. likelihood displacement",
        "2. the fixes",
        "3. gradient asymmetry",
        "loss stuck at 0.693",
        "4. length",
    ):
        assert f"--- {title}" in text or f'--- "{title}' in text, title
    # 1: the first-order change against the real step, as η → 0, and the descent path
    rows = re.findall(r"^\s+1e-05\s+\S+\s+\S+\s+\S+\s+(\S+)", text, re.M)
    assert rows and abs(float(rows[0]) - 1) < 1e-5
    falls, steps = _number(r"log π\(y_w\) falls in (\d+) of (\d+)", text)
    assert falls == steps
    agree, total = _number(r"first-order sign equals the real step's in (\d+) of (\d+)", text)
    assert agree == total
    # 2: the thresholds, and above them y_w no longer falls (DPOP: never from below π_ref(y_w))
    lam, by_hand = _number(r"c = (\S+): smallest λ = (\S+) \(= c\)", text)
    assert lam == by_hand > 0
    assert re.search(r"^DPOP λ = 2λ\*\s+\S+\s+\d+ of \d+\s+\S+\s+0\s", text, re.M)
    assert re.search(r"^RPO α = 2α\*\s+\S+\s+0 of \d+", text, re.M)
    # 3: ∂L/∂π against autograd; the first step reads ln 2, margin 0, accuracy 0
    (rel,) = _number(r"max relative \|formula − autograd\| = (\S+)", text)
    assert rel < 1e-12
    loss, ln2 = _number(r"policy = reference .*?loss = (\S+) \(ln 2 = (\S+)\)", text)
    assert loss == ln2 == pytest.approx(LN2, abs=1e-12)
    assert "margin = 0, accuracy = 0," in text
    (stuck,) = _number(r"live policy \(bug\) : after \d+ steps of η = 1: loss = (\S+),", text)
    assert stuck == pytest.approx(LN2, abs=1e-12)
    # 4: R-DPO's optimum against Newton, and α = γ removing the length bias
    (newton,) = _number(r"against Newton on its population loss.*max \|Δ\| = (\S+)", text)
    assert newton < 1e-10
    closed, fitted = _number(r"max \|π_R-DPO − π\*_q\| = (\S+) \(closed form\), (\S+)", text)
    assert closed < 1e-12 and fitted < 1e-10
    (longer,) = _number(r"DPO's answers are \+(\S+) tokens longer", text)
    assert longer > 1


def test_quick_run_writes_its_figures_and_is_deterministic(quick_run):
    text, out = quick_run
    for name in ("ch11_displacement_quick.png", "ch11_length_quick.png"):
        assert (out / name).stat().st_size > 10_000, name
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        main(["--quick"])

    def stable(t):  # the wall time and the plots folder differ between runs
        return [line for line in t.splitlines() if not line.startswith(("done in", "figure:"))]

    assert stable(again.getvalue()) == stable(text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "x"], "'x' is not an integer"),
        (["--steps", "3"], "unrecognized arguments"),
    ],
)
def test_main_refuses_a_bad_flag_with_one_argparse_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1], err


# ----------------------------------------------------------------------- on a GPT-2 (section 5)
EOS = 12  # the tiny vocabulary's end-of-text (and padding) id
LN2_FLOAT32 = float(torch.tensor(LN2, dtype=torch.float32))  # 0.6931471824645996


def _tiny_pairs(n, seed=0):
    """n preference pairs of random tokens: prompts of 2-5 tokens, responses of 1-4 + EOS."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(0, EOS, (k,), generator=gen).tolist()

    return [Pair(i, tokens(2, 5), tokens(1, 4) + [EOS], tokens(1, 4) + [EOS]) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_gpt(one_thread):
    """A tiny random GPT-2 (vocabulary 13, width 16, one block), frozen, float32; the module's
    tests run on one thread from here on (tiny matrices: more threads only wait on each other)."""
    torch.manual_seed(0)
    config = GPTConfig.tiny(vocab_size=13, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return GPT(config).eval().requires_grad_(False)


def _train(model, pairs, objective, epochs=1, lr=1e-3, val=None):
    """`train_objective` on `pairs` (batch 4) against `model` as π_SFT; the train cache in the
    first epoch's batches."""
    splits = {"train": pairs, **({"validation": val} if val else {})}
    caches = Scale().reference_caches(model, splits, EOS, 4, 32, seed=0)
    settings = dict(epochs=epochs, lr=lr, batch_size=4, seed=0, device="cpu", pad_id=EOS)
    policy, history = train_objective(
        model, pairs, caches, objective, eos_id=EOS, tracked={}, every=1000, **settings
    )
    return policy, history, caches, settings


def _plain(model, pairs):
    """Full logits and final hidden states of chosen then rejected rows, laid out apart: (ids,
    response mask, logits, hidden states), each (2B, T, ...)."""
    ids, att, resp = pair_rows(pairs, EOS)
    return ids, resp, model(ids, att).double(), model.hidden_states(ids, att).double()


def test_pair_readings_match_full_logits_and_hidden_states_by_hand(tiny_gpt):
    """Packed rows (pair_readings) against unpacked rows and full logits, hand sums in numpy."""
    pairs = _tiny_pairs(7)
    got = pair_readings(tiny_gpt, pairs, EOS, EOS, batch_size=3, hidden=True)
    ids, resp, logits, hidden = _plain(tiny_gpt, pairs)
    logp = torch.log_softmax(logits, -1).numpy()
    h = hidden.numpy()
    B = len(pairs)
    hand = {k: [] for k in got}
    for b in range(B):
        sums = []
        for r in (b, B + b):
            where = np.flatnonzero(resp[r].numpy())  # the response tokens' positions
            token = [logp[r, p - 1, ids[r, p]] for p in where]  # predicted from the one before
            hand["chosen" if r < B else "rejected"].append(sum(token))
            hand["chosen_eos" if r < B else "rejected_eos"].append(logp[r, where[-1] - 1, EOS])
            if r < B:
                early = [np.exp(logp[r, p - 1, EOS]) for p in where[:-1]]
                hand["chosen_early_eos"].append(np.mean(early))
            sums.append((h[r, where - 1], len(where)))
        (hw, nw), (hl, nl) = sums
        sw, sl = hw.sum(0), hl.sum(0)
        hand["ches"].append(sw @ sl - sw @ sw)
        hand["ches_per_token"].append((sw / nw) @ (sl / nl) - (sw / nw) @ (sw / nw))
        unit_w = hw / np.linalg.norm(hw, axis=1, keepdims=True)
        unit_l = hl / np.linalg.norm(hl, axis=1, keepdims=True)
        hand["end_cosine"].append(unit_w[-1] @ unit_l[-1])
        hand["cross_cosine"].append(np.mean(unit_w @ unit_l.T))
    for k, values in hand.items():
        np.testing.assert_allclose(got[k].numpy(), values, rtol=1e-4, atol=1e-5, err_msg=k)


def test_displacement_count_equals_a_hand_count(tiny_gpt):
    """Pairs whose log π(y_w) fell, counted by hand from full logits before and after DPO."""
    pairs = _tiny_pairs(16, seed=3)
    policy, _, _, _ = _train(tiny_gpt, pairs, Objective("dpo", 0.5), epochs=3, lr=3e-2)
    ids, att, resp = pair_rows(pairs, EOS)
    B = len(pairs)

    def chosen_and_rejected(model):
        lp = response_logprobs(model(ids, att).double(), ids, resp)  # (2B,)
        return lp[:B], lp[B:]

    (w0, l0), (w1, l1) = chosen_and_rejected(tiny_gpt), chosen_and_rejected(policy)
    assert (w1 - w0).abs().min() > 1e-3  # no pair near a tie: float32 layouts agree on the sign
    summary = displacement_summary(
        pair_readings(tiny_gpt, pairs, EOS, EOS), pair_readings(policy, pairs, EOS, EOS)
    )
    fell = sum(float(a) < float(b) for a, b in zip(w1, w0))
    assert 0 < fell < B  # the count tells the two kinds apart
    assert summary["displaced"] == fell and summary["pairs"] == B
    assert summary["both_fell"] == sum((w1 < w0) & (l1 < l0)).item()
    assert summary["chosen_change"] == pytest.approx((w1 - w0).mean().item(), abs=1e-4)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 12, 57, 300):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = np.round(rng.normal(size=n) + 0.3 * x, 1)  # ties too
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: spearman([1.0, 2.0], [1.0]), "one length"),
        (lambda: spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), "constant"),
        (lambda: spearman([1.0, math.nan], [1.0, 2.0]), "NaN"),
        (lambda: Objective("ipo", 0.1), "unknown kind"),
        (lambda: Objective("dpop", 0.1, -1.0), ">= 0"),
        (lambda: Objective("dpo", 0.1, 1.0), "takes no weight"),
        (lambda: Objective("rpo", 0.0, 1.0), "beta must be"),
    ],
)
def test_miniature_bad_input_raises_a_one_line_value_error(call, expected):
    with pytest.raises(ValueError, match=expected) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kind, weight, without_eos",
    [("dpo", 0.0, False), ("dpo", 0.0, True), ("dpop", 50.0, False), ("rpo", 1.0, False)]
    + [("r-dpo", 0.2, False)],
)
def test_first_step_of_each_loss_reads_ln2_at_policy_equal_reference(
    tiny_gpt, kind, weight, without_eos
):
    """π_θ = π_SFT at the first step: eq. (38) reads ln 2 (float32's), margin 0, accuracy 0, for
    every loss; the loss trained on adds what its own term gives at margin 0, by hand."""
    pairs = _tiny_pairs(8)
    _, history, _, _ = _train(tiny_gpt, pairs, Objective(kind, 0.5, weight, without_eos))
    first = history["steps"][0]
    assert first["loss"] == LN2_FLOAT32
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    batch = [pairs[i] for i in dpo_batches(pairs, 4, 0)(1)[0]]  # the pairs of the first step
    ids, att, resp = pair_rows(batch, EOS)
    chosen = response_logprobs(tiny_gpt(ids, att).double(), ids, resp)[: len(batch)]
    gap = [len(p.chosen) - len(p.rejected) for p in batch]
    extra = {
        "dpo": 0.0,
        "dpop": 0.0,  # π_θ(y_w) = π_ref(y_w): the penalty max(0, ·) is 0
        "rpo": weight * np.mean([-c / len(p.chosen) for c, p in zip(chosen.tolist(), batch)]),
        "r-dpo": np.mean([math.log1p(math.exp(-weight * g)) - LN2 for g in gap]),
    }[kind]
    assert first["objective"] == pytest.approx(LN2 + extra, abs=1e-5)


def test_without_eos_the_margin_leaves_out_each_responses_last_token(tiny_gpt):
    """The step's margin with `without_eos`, against full logits by hand: every response token but
    the final EOS, for the policy and the reference alike (policy ≠ reference here)."""
    pairs = _tiny_pairs(6)
    policy, _, caches, _ = _train(tiny_gpt, pairs, Objective("dpo", 0.5), epochs=1, lr=3e-2)
    idx = [4, 0, 2]
    step = objective_step(Objective("dpo", 0.5, without_eos=True))
    _, metrics = step(policy, pairs, idx, caches["train"], 0.5, "cpu", EOS)
    batch = [pairs[i] for i in idx]
    ids, att, resp = pair_rows(batch, EOS)
    last = resp & ~torch.roll(resp, -1, dims=1)  # each row's final response token: its EOS
    B = len(batch)

    def logps(model):
        full = response_logprobs(model(ids, att).double(), ids, resp)
        return full - response_logprobs(model(ids, att).double(), ids, last)  # (2B,)

    h = logps(policy) - logps(tiny_gpt)  # log π/π_ref without EOS
    hand = 0.5 * (h[:B] - h[B:]).mean().item()
    assert metrics["rewards/margins"] == pytest.approx(hand, abs=1e-5)
    assert abs(hand) > 1e-3  # the policy moved: the check is not 0 = 0


def test_the_dpo_loss_trains_exactly_as_chapter8s_train_dpo(tiny_gpt):
    """`train_objective` with eq. (38) is chapter 8's DPO phase: the same weights, bit for bit."""
    pairs, val = _tiny_pairs(8), _tiny_pairs(4, seed=1)
    mine, _, caches, settings = _train(tiny_gpt, pairs, Objective("dpo", 0.5), 2, 1e-2, val)
    theirs, _, _ = train_dpo(tiny_gpt, pairs, val, caches, 0.5, **settings)
    for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_greedy_responses_are_chapter8s_at_temperature_zero(tiny_gpt):
    class Digits:  # a tokenizer whose text shows every token
        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    pairs = _tiny_pairs(5)
    settings = dict(max_new_tokens=6, batch_size=2, device="cpu", eos_id=EOS, tokenizer=Digits())
    texts, stopped = greedy_responses(tiny_gpt, pairs, **settings)
    assert texts == generate_responses(tiny_gpt, pairs, 0.0, seed=0, **settings)
    assert stopped == [len(t.split()) < 6 for t in texts]


def test_the_miniature_settings_are_chapter8s():
    args = ch8_parse_args(["--miniature"])
    assert {k: getattr(args, k) for k in SETTINGS} == SETTINGS


def test_a_saved_sft_model_is_reused_only_with_the_miniatures_settings(
    tiny_gpt, tmp_path, monkeypatch
):
    """A chapter 8 run folder's models/sft/ (history.json as chapter 8 writes it) is taken as it is;
    another learning rate is not."""
    pairs = _tiny_pairs(8)
    data = {"sft_pairs": {"train": pairs}}
    folder = tmp_path / "ch8_miniature"
    save_gpt2(tiny_gpt.state_dict(), tiny_gpt.config, folder / "models" / "sft")
    run = dict(model="miniature", seed=0, max_length=128, batch_size=8, warmup_steps=0)
    run.update(lr_schedule="constant", mistakes_on="")
    loss = "chapters.ch8_instruction_dpo.trainers.sft_loss"

    def write(phase, **fields):
        fp = {**run, "phase": phase, "loss": loss, "start_sha256": "…", **fields}
        path = folder / "models" / phase / "history.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fp, "history": []}))

    write("base", lr=2e-3, epochs=6, pairs_sha256="…")
    write("sft", lr=3e-4, epochs=1, pairs_sha256=pairs_sha256(pairs))
    monkeypatch.setattr(miniature_runs, "SFT_FOLDERS", (folder,))
    model, source = miniature_runs.miniature_sft(data, seed=0)
    assert source.startswith("reused from") and not model.training
    for a, b in zip(model.state_dict().values(), tiny_gpt.state_dict().values()):
        assert torch.equal(a, b)
    write("sft", lr=1e-3, epochs=1, pairs_sha256=pairs_sha256(pairs))
    assert miniature_runs._saved_fingerprint(folder) != miniature_runs._fingerprint(data, 0)


def test_the_miniature_section_says_in_one_line_when_the_data_set_is_missing(monkeypatch, capsys):
    def missing(seed):
        raise pdata.DownloadError("cannot download instruction-data-with-preference.json")

    monkeypatch.setattr(ch11_main, "miniature_data", missing)
    ch11_main._miniature_section("default", 0, quick=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("--- 5.") and len(lines) == 2 and lines[1].startswith("skipped: ")


def test_quick_run_skips_the_miniature_sections_in_one_line_each(quick_run):
    text, _ = quick_run
    after = [line for line in text.split("--- 5.")[1].splitlines() if line.strip()]
    assert after[1].startswith("--quick: skipped") and after[2].startswith("--- 6. LoRA")
    assert after[3].startswith("--quick: skipped") and after[4].startswith("done in")
