"""Numbers the report derives, each checked against a closed form computed here by hand (plain
Python floats or a loop written out), where `mutmut` found that a changed line of the equation
modules survived every test (tests/README.md: the runs, the counts, the command). One section a
chapter; each test says which equation it pins.
"""

import itertools
import math

import pytest
import torch

from chapters.ch1_preference_models.probabilities import christiano_predictor, sample_rankings
from chapters.ch2_reward_model.bradley_terry import (
    centred_rmse,
    fit_bt_rewards,
    sample_bt_comparisons,
)
from chapters.ch3_kl_optimum.optimum import objective_rewritings, optimal_policy
from chapters.ch4_dpo.loss import (
    dpo_metrics,
    preference_counts,
    response_logprobs,
    unshifted_logprobs,
)
from chapters.ch6_ppo.objective import entropy, masked_mean, ppo_objective, value_loss, whiten
from chapters.ch7_frontier import task
from chapters.ch10_dpo_family.losses import ipo_optimal_policy, kto_loss, log1mexp, orpo_loss


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def log_softmax(row) -> list:
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def bisect(g, lo: float, hi: float) -> float:
    """The root of an increasing g on [lo, hi], to float64 precision."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------- chapter 1 (eqs. (6)–(16))


def test_eq11_gumbel_trick_draws_each_ranking_with_its_plackett_luce_probability():
    """Frequencies of the 6 rankings of K = 3 against eq. (11) by hand, within 5 standard errors
    (the chi-square test of tests/test_ch1 draws more; this one is cheap enough for mutmut)."""
    rewards, n = [1.0, 0.0, -0.5], 60_000
    draws = sample_rankings(f64(rewards), n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, 3)
    for ranking in itertools.permutations(range(3)):
        left, p = list(range(3)), 1.0
        for i in ranking:  # Π_t e^{r_τ(t)} / Σ_{j≥t} e^{r_τ(j)}
            p *= math.exp(rewards[i]) / sum(math.exp(rewards[j]) for j in left)
            left.remove(i)
        freq = (draws == torch.tensor(ranking)).all(-1).double().mean().item()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), (ranking, freq, p)
    again = sample_rankings(f64(rewards), n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # the generator seeds it: a chapter run twice prints the same


def test_sec21_predictor_sums_each_segments_rewards_row_by_row():
    """P̂(1 ≻ 2) = e^{Σ_t r̂¹_t} / (e^{Σ_t r̂¹_t} + e^{Σ_t r̂²_t}), for each of a batch of pairs."""
    seg1, seg2 = [[1.0, 0.5, -0.5], [0.0, 0.0, 2.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    want = [sigmoid(sum(a) - sum(b)) for a, b in zip(seg1, seg2)]
    assert christiano_predictor(f64(seg1), f64(seg2)).tolist() == pytest.approx(want, abs=1e-15)


# ---------------------------------------------------------------- chapter 2 (eqs. (17)–(26))


def test_eq23_comparisons_draw_each_pair_uniformly_and_its_winner_by_bradley_terry():
    rewards, n = [[1.0, 0.0, -1.0]], 30_000
    prompt, winner, loser = sample_bt_comparisons(
        f64(rewards), n, generator=torch.Generator().manual_seed(0)
    )
    assert prompt.tolist() == [0] * n and bool((winner != loser).all())
    for a, b in itertools.combinations(range(3), 2):
        pair = ((winner == a) & (loser == b)) | ((winner == b) & (loser == a))
        share, wins = pair.double().mean().item(), ((winner == a) & pair).sum() / pair.sum()
        assert abs(share - 1 / 3) < 5 * math.sqrt(2 / 9 / n), (a, b, share)  # 1/3 each pair
        p = sigmoid(rewards[0][a] - rewards[0][b])  # eq. (23)
        assert abs(wins.item() - p) < 5 * math.sqrt(p * (1 - p) / pair.sum().item()), (a, b)
    again = sample_bt_comparisons(f64(rewards), n, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip((prompt, winner, loser), again))


@pytest.mark.parametrize("wins, losses", [(7, 3), (5, 0)])
def test_eq26_ridge_mle_of_two_responses_solves_its_stationarity_equation(wins, losses):
    """Two responses, y0 beating y1 `wins` times of wins + losses: the ridge (l2 = 1, the default)
    makes θ0 = −θ1 = Δ/2 with −wins·σ(−Δ) + losses·σ(Δ) + Δ/2 = 0 (d/dθ0 of N × the loss), finite
    even when y0 never loses."""
    prompt = torch.zeros(wins + losses, dtype=torch.long)
    winner = torch.tensor([0] * wins + [1] * losses)
    fit = fit_bt_rewards(prompt, winner, 1 - winner, (1, 2))
    delta = bisect(lambda d: -wins * sigmoid(-d) + losses * sigmoid(d) + d / 2, -50.0, 50.0)
    assert fit[0].tolist() == pytest.approx([delta / 2, -delta / 2], abs=1e-7)


def test_sec33_centred_rmse_by_hand():
    estimate, truth = [[1.0, 3.0], [0.0, 4.0]], [[0.0, 1.0], [2.0, 2.0]]
    # centred per prompt: [[-1, 1], [-2, 2]] and [[-0.5, 0.5], [0, 0]]; errors ±0.5, ±2
    want = math.sqrt((0.25 + 0.25 + 4 + 4) / 4)
    assert centred_rmse(f64(estimate), f64(truth)) == pytest.approx(want, abs=1e-15)


# ---------------------------------------------------------------- chapter 3 (eqs. (27)–(37))


def test_eq36_a_response_pi_ref_never_gives_gets_no_mass_and_the_rest_renormalise():
    pi_ref, rewards, beta = [0.5, 0.0, 0.5], [1.0, 5.0, 0.0], 0.5
    tilt = [p * math.exp(r / beta) for p, r in zip(pi_ref, rewards)]  # e², 0, 1 (halved)
    got = optimal_policy(f64(pi_ref), f64(rewards), beta)
    assert got.tolist() == pytest.approx([t / sum(tilt) for t in tilt], abs=1e-15)


def test_eq29_eq30_at_a_policy_with_zero_mass_by_hand():
    """E_π[r − β log π/π_ref] and E_π[log π/π_ref − r/β], with 0·(anything) = 0 where π(y) = 0."""
    pi, pi_ref, rewards, beta = [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 2.0], 0.5
    eq29 = sum(p * (r - beta * math.log(p / q)) for p, q, r in zip(pi, pi_ref, rewards) if p > 0)
    got = objective_rewritings(f64(pi), f64(pi_ref), f64(rewards), beta)
    assert got["(29)"].item() == pytest.approx(eq29, abs=1e-14)
    assert got["(30)"].item() == pytest.approx(-eq29 / beta, abs=1e-14)


# ---------------------------------------------------------------- chapter 4 (eqs. (38)–(41))


def test_sec44_logged_margin_is_the_mean_gap_of_implicit_rewards_by_hand():
    pc, pr, rc, rr, beta = [-3.0, -1.0], [-4.0, -0.5], [-2.0, -2.0], [-3.5, -1.5], 0.5
    chosen = [beta * (p - r) for p, r in zip(pc, rc)]  # r̂(y_w) = β·log π/π_ref: −0.5, 0.5
    rejected = [beta * (p - r) for p, r in zip(pr, rr)]  # r̂(y_l): −0.25, 0.5
    m = dpo_metrics(f64(pc), f64(pr), f64(rc), f64(rr), beta)
    assert m["rewards/margins"] == pytest.approx((-0.25 + 0.0) / 2, abs=1e-15)
    assert m["rewards/chosen"] == pytest.approx(sum(chosen) / 2, abs=1e-15)
    assert m["rewards/rejected"] == pytest.approx(sum(rejected) / 2, abs=1e-15)
    assert m["rewards/accuracies"] == 0.0  # −0.5 < −0.25, and a tie is no win
    loss = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)]
    assert m["loss"] == pytest.approx(sum(loss) / 2, abs=1e-15)


def test_the_authors_unshifted_logprob_by_hand():
    """Their get_log_prob: Σ_t log softmax(logits_t)[token_t] over the masked t, with no shift."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)  # B = 2, T = 4, V = 5
    ids = torch.tensor([[1, 4, 0, 2], [3, 3, 1, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    want = [
        sum(log_softmax(logits[b, t].tolist())[ids[b, t]] for t in range(4) if mask[b, t])
        for b in range(2)
    ]
    got = unshifted_logprobs(logits, ids, mask)
    assert got.shape == (2,) and got.tolist() == pytest.approx(want, abs=1e-6)  # float32 inside


def test_response_logprobs_read_bfloat16_logits_in_float32():
    """GPT-2 under bf16 autocast gives bf16 logits: the log-softmax and the sum run in float32."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, 50, generator=g).to(torch.bfloat16)
    ids, mask = torch.tensor([[3, 7, 1, 9, 2, 4]]), torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    got = response_logprobs(logits, ids, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, response_logprobs(logits.float(), ids, mask))


def test_preference_counts_are_seeded():
    probs = f64([[0.1, 0.2], [0.3, 0.4]])
    a, b = preference_counts(probs, 1000, seed=7), preference_counts(probs, 1000, seed=7)
    assert torch.equal(a, b) and a.sum().item() == 1000 and a.dtype == torch.float64
    assert not torch.equal(a, preference_counts(probs, 1000, seed=8))


# ---------------------------------------------------------------- chapter 6 (eqs. (1)–(5))


def test_masked_means_whitening_value_loss_entropy_and_eq4_by_hand():
    x, one = f64([[2.0, 4.0, 9.0]]), f64([[0.0, 1.0, 0.0]])
    assert masked_mean(x, one).item() == 4.0  # one position: its value
    # whitening without a mask, the population variance plus eps (here 2.5e-9 + 1e-8)
    small = f64([0.0, 1e-4])
    std = math.sqrt(((0.5e-4) ** 2 + (0.5e-4) ** 2) / 2 + 1e-8)
    assert whiten(small).tolist() == pytest.approx([-0.5e-4 / std, 0.5e-4 / std], rel=1e-12)
    # eq. (2), clipped: max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)
    v, ret, old, eps = f64([0.0, 3.0]), f64([1.0, 1.0]), f64([1.0, 1.0]), 0.2
    assert value_loss(v, ret, old, eps).tolist() == pytest.approx(
        [max(1.0, (1 - 0.2 - 1) ** 2), max(4.0, (1 + 0.2 - 1) ** 2)], abs=1e-15
    )
    v, ret, old = f64([-2.0]), f64([0.0]), f64([3.0])  # V − V_old = −5: clipped to −0.2
    assert value_loss(v, ret, old, eps).item() == pytest.approx(max(4.0, 2.8**2), abs=1e-12)
    # eq. (3) per position of a (2, 2, 3) batch
    logits = f64([[[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]], [[5.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    want = [
        [-sum(math.exp(lp) * lp for lp in log_softmax(row)) for row in b] for b in logits.tolist()
    ]
    assert entropy(logits).flatten().tolist() == pytest.approx(sum(want, []), abs=1e-12)
    # eq. (4) under a mask: each term a mean over the masked positions only
    mask = f64([[1.0, 1.0, 0.0]])
    surr, vl, ent = f64([[1.0, 3.0, 100.0]]), f64([[2.0, 0.0, 100.0]]), f64([[0.5, 1.5, 100.0]])
    got = ppo_objective(surr, vl, ent, mask, vf_coef=0.5, ent_coef=0.1)
    assert got.item() == pytest.approx(2.0 - 0.5 * 1.0 + 0.1 * 1.0, abs=1e-15)


# ---------------------------------------------------------------- chapter 7 (the frontier task)


def test_the_reference_process_is_the_markov_chain_its_docstring_writes():
    """P(next = b | a) ∝ base(b)·(1 + 2·[a = b]), base: positive tokens 0.04, negative 0.16, neutral
    0.15; and sample_process draws the first response token from it."""
    base = [0.04, 0.04, 0.16, 0.16, 0.15, 0.15, 0.15, 0.15]
    want = [
        [base[b] * (3 if a == b else 1) / (sum(base) + 2 * base[a]) for b in range(8)]
        for a in range(8)
    ]
    assert task.transition_matrix().flatten().tolist() == pytest.approx(sum(want, []), abs=1e-15)
    prompts, n = torch.tensor([[5, 0], [7, 3]]), 40_000
    seq = task.sample_process(prompts, n, torch.Generator().manual_seed(0))
    assert seq.shape == (n, task.SEQ_LEN)
    for last in (0, 3):
        rows = seq[seq[:, 1] == last]
        for b in range(8):
            freq, p = (rows[:, 2] == b).double().mean().item(), want[last][b]
            assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(rows)) + 1e-12, (last, b)
    assert torch.equal(seq, task.sample_process(prompts, n, torch.Generator().manual_seed(0)))
    assert torch.equal(task.task_prompts(5), task.task_prompts(5))  # a fixed order, not a draw


def test_exact_reward_and_kl_give_a_response_of_probability_zero_no_weight():
    """E[r*] = Σ π r* and KL = Σ_{π > 0} π log π/π_ref, averaged over prompts: 0·log 0 = 0."""
    logp = f64([[math.log(0.75), math.log(0.25), -math.inf], [math.log(0.5)] * 2 + [-math.inf]])
    logp_ref, rewards = f64([[math.log(1 / 3)] * 3] * 2), f64([[1.0, 2.0, 9.0], [0.0, 4.0, 9.0]])
    kl = [0.75 * math.log(0.75 * 3) + 0.25 * math.log(0.25 * 3), math.log(1.5)]
    reward, got_kl = task.exact_reward_and_kl(logp, logp_ref, rewards)
    assert reward == pytest.approx((1.25 + 2.0) / 2, abs=1e-15)
    assert got_kl == pytest.approx(sum(kl) / 2, abs=1e-15)


def test_true_reward_fn_and_preference_pairs_by_hand(one_thread):
    ids = torch.tensor([[0, 5, 0, 2, 4, 1, 0], [3, 3, 3, 2, 6, 7, 1]])  # prompt 2 tokens + 5
    # Σ_t s(y_t)·(1 + [y_t ∈ x]); s = +1 for 0, 1, −1 for 2, 3: row 1: 0 echoes the prompt (+2),
    # 2 (−1), 4 (0), 1 (+1), 0 again (+2) = 4; row 2: 3 echoes (−2), 2 (−1), 6, 7 (0), 1 (+1) = −2
    assert task.true_reward_fn(ids).tolist() == [4.0, -2.0]
    ref = task.new_model(0).eval()
    prompts, draws, k = torch.tensor([[0, 1], [2, 3]]), 2, 3

    def pairs():
        return task.preference_pairs(ref, prompts, draws, k, torch.Generator().manual_seed(1))

    data = pairs()
    assert data["chosen"].shape == (2 * draws * k * (k - 1) // 2, task.RESPONSE_LEN)  # i < j
    assert all(torch.equal(a, b) for a, b in zip(data.values(), pairs().values()))


def test_preferred_ft_loss_is_minus_the_mean_log_likelihood_of_y_w_by_hand(one_thread):
    model = task.new_model(0).eval()
    batch = {
        "prompt": torch.tensor([[0, 1], [4, 2]]),
        "chosen": torch.tensor([[1] * 5, [2, 3, 4, 5, 6]]),
    }
    ids = torch.cat([batch["prompt"], batch["chosen"]], 1)
    with torch.no_grad():
        logits = model(ids).double().tolist()
    total = 0.0
    for b in range(2):
        for t in range(task.PROMPT_LEN, task.SEQ_LEN):  # token t read from the logits at t − 1
            total += log_softmax(logits[b][t - 1])[ids[b, t]]
    with torch.no_grad():
        got = task.preferred_ft_loss(model, batch).item()
    assert got == pytest.approx(-total / 2, abs=1e-5)  # float32 model


# ---------------------------------------------------------------- chapter 10 (the family)


def test_log1mexp_keeps_its_digits_next_to_zero():
    a = f64([-1e-10, -0.5, -3.0])
    want = [math.log(-math.expm1(v)) for v in a.tolist()]  # log(1 − e^a), e^a − 1 without loss
    assert log1mexp(a).tolist() == pytest.approx(want, rel=1e-14)


def test_orpo_at_lambda_zero_is_its_sft_term_and_kto_weighs_both_sides_one_by_default():
    chosen, rejected = f64([-0.5, -1.0]), f64([-2.0, -0.25])
    assert orpo_loss(chosen, rejected, 0.0).tolist() == [0.5, 1.0]  # L_SFT = −mean log-prob
    r, z0, beta = [0.5, -0.25], 0.1, 2.0  # log π/π_ref of a desirable and an undesirable y
    got = kto_loss(f64(r), f64([0.0, 0.0]), [True, False], beta, z0)
    want = [1 - sigmoid(beta * (r[0] - z0)), 1 - sigmoid(beta * (z0 - r[1]))]  # λ_D = λ_U = 1
    assert got.tolist() == pytest.approx(want, abs=1e-15)


def test_ipo_optimum_tilts_pi_ref_by_the_win_rate_against_pi_ref():
    """π ∝ π_ref·exp(p(y ≻ π_ref)/β), p(y ≻ π_ref) = Σ_y' π_ref(y')·p(y ≻ y')."""
    pi_ref, beta = [0.5, 0.3, 0.2], 0.25
    p = [[0.5, 0.9, 0.6], [0.1, 0.5, 0.3], [0.4, 0.7, 0.5]]  # p(y ≻ y'), ½ on the diagonal
    win = [sum(pi_ref[j] * p[i][j] for j in range(3)) for i in range(3)]
    tilt = [pi_ref[i] * math.exp(win[i] / beta) for i in range(3)]
    got = ipo_optimal_policy(f64([pi_ref]), f64([p]), beta)
    assert got[0].tolist() == pytest.approx([t / sum(tilt) for t in tilt], abs=1e-15)
