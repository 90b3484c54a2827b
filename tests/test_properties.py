"""The report's identities that hold for all inputs, checked on inputs hypothesis draws (and
shrinks, when one fails) rather than on a few picked by hand. Each right-hand side is computed apart
from the code under test: in plain Python floats, or by autograd where the identity is about a
gradient.

- eq. (41): the DPO gradient weight is σ(−margin), on both log-probs, with opposite signs;
- eqs. (16), (23) and §3.3: Bradley–Terry's probability, and eq. (11)'s Plackett–Luce, do not change
  when a constant is added to every reward;
- eq. (36): π* = π_ref·exp(r/β)/Z is a distribution, and its log-ratio to π_ref is r/β − log Z;
- eq. (5): GAE with λ = 1 is the discounted return minus V (the episode ending after the last step).
"""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from chapters.ch1_preference_models import bradley_terry, plackett_luce
from chapters.ch2_reward_model import bt_probability
from chapters.ch3_kl_optimum import optimal_policy
from chapters.ch4_dpo import dpo_loss
from chapters.ch6_ppo import gae

# tens of examples a property, the same ones each run (derandomize): each runs in microseconds, the
# whole file in about a second; hypothesis keeps its caches out of the repository
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dpo-from-scratch-hypothesis")
settings.register_profile(
    "report", max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False
)
settings.load_profile("report")

logp = st.floats(-50.0, 0.0)  # log-probabilities of whole responses
reward = st.floats(-20.0, 20.0)
beta = st.floats(0.01, 10.0)
shift = st.floats(-100.0, 100.0)


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


@given(logp, logp, logp, logp, beta)
def test_eq41_dpo_gradient_weight_is_sigmoid_of_minus_the_margin(pc, pr, rc, rr, b):
    """∂L/∂log π(y_w) = −β·σ(−m) and ∂L/∂log π(y_l) = +β·σ(−m), m = β·((pc − rc) − (pr − rr))."""
    policy = torch.tensor([pc, pr], dtype=torch.float64, requires_grad=True)
    loss = dpo_loss(policy[0], policy[1], f64(rc), f64(rr), b)
    loss.backward()
    weight = b * sigmoid(-b * ((pc - rc) - (pr - rr)))
    assert policy.grad[0].item() == pytest.approx(-weight, rel=1e-12, abs=1e-300)
    assert policy.grad[1].item() == pytest.approx(weight, rel=1e-12, abs=1e-300)
    margin = b * ((pc - rc) - (pr - rr))  # and the loss itself, −log σ(m)
    assert loss.item() == pytest.approx(-math.log(sigmoid(margin)), rel=1e-12)


@given(reward, reward, shift)
def test_eq16_eq23_bradley_terry_ignores_a_constant_added_to_both_rewards(r1, r2, c):
    expected = sigmoid(r1 - r2)  # eq. (23) in plain floats
    for bt in (bradley_terry, bt_probability):
        r = torch.tensor([r1, r2, r1 + c, r2 + c], dtype=torch.float64)
        plain, shifted = bt(r[0], r[1]).item(), bt(r[2], r[3]).item()
        # r + c is rounded to float64: the gap moves by up to an ulp of |r| + |c|
        tol = 1e-13 * (abs(r1) + abs(r2) + abs(c) + 1)
        assert plain == pytest.approx(expected, rel=1e-12, abs=1e-300)
        assert shifted == pytest.approx(expected, abs=tol)


@given(st.lists(reward, min_size=2, max_size=6), shift, st.randoms(use_true_random=False))
def test_eq11_plackett_luce_ignores_a_constant_added_to_every_reward(rewards, c, rng):
    ranking = list(range(len(rewards)))
    rng.shuffle(ranking)
    expected, left = 1.0, list(ranking)  # Π_t e^{r_τ(t)} / Σ_{j≥t} e^{r_τ(j)}, shifted by max
    for i in ranking:
        top = max(rewards[j] for j in left)
        expected *= math.exp(rewards[i] - top) / sum(math.exp(rewards[j] - top) for j in left)
        left.remove(i)
    plain = plackett_luce(torch.tensor(rewards, dtype=torch.float64), ranking).item()
    shifted = plackett_luce(torch.tensor(rewards, dtype=torch.float64) + c, ranking).item()
    tol = 1e-12 * len(rewards) * (max(map(abs, rewards)) + abs(c) + 1)
    assert plain == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert shifted == pytest.approx(expected, rel=tol, abs=1e-300)


@given(
    st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8).flatmap(
        lambda w: st.tuples(st.just(w), st.lists(reward, min_size=len(w), max_size=len(w)))
    ),
    beta,
)
def test_eq36_optimal_policy_normalises_and_its_log_ratio_is_r_over_beta_minus_log_z(wr, b):
    weights, rewards = wr
    pi_ref = [w / sum(weights) for w in weights]
    pi = optimal_policy(f64(pi_ref), f64(rewards), b)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12) and bool((pi >= 0).all())
    top = max(r / b for r in rewards)  # log Z = log Σ π_ref·e^{r/β}, computed shifted by the max
    log_z = top + math.log(sum(p * math.exp(r / b - top) for p, r in zip(pi_ref, rewards)))
    for p, q, r in zip(pi.tolist(), pi_ref, rewards):
        if p > 1e-280:  # not underflowed
            assert math.log(p / q) == pytest.approx(r / b - log_z, abs=1e-9 * (abs(log_z) + 1))


@given(
    st.integers(1, 8).flatmap(
        lambda t: st.tuples(
            st.lists(reward, min_size=t, max_size=t), st.lists(reward, min_size=t, max_size=t)
        )
    ),
    st.floats(0.0, 1.0),
)
def test_eq5_gae_at_lambda_1_is_the_discounted_return_minus_the_value(rv, gamma):
    rewards, values = rv
    advantages, returns = gae(f64(rewards), f64(values), gamma, 1.0)
    T = len(rewards)
    for t in range(T):
        ret = sum(gamma**k * rewards[t + k] for k in range(T - t))  # Σ_{k≥0} γ^k r_{t+k}
        assert advantages[t].item() == pytest.approx(ret - values[t], abs=1e-9)
        assert returns[t].item() == pytest.approx(ret, abs=1e-9)
