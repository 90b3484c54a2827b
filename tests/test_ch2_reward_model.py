"""Chapter 2: BT as a sigmoid (eqs. (17)–(23)), the reward-model NLL and its gradient (eqs.
(24)–(26)), reward normalisation, maximum likelihood on synthetic data, and the GPT-2 reward model.
"""

import math

import pytest
import torch

import gpt
from chapters.ch2_reward_model.__main__ import main
from chapters.ch2_reward_model.bradley_terry import (
    bt_probability,
    bt_sigmoid_steps,
    fit_bt_rewards,
    normalize_rewards,
    preference_likelihood,
    preference_nll,
    reward_model_loss,
    reward_model_loss_grad,
    sample_bt_comparisons,
    sigmoid,
)
from chapters.ch2_reward_model.reward_head import (
    PreferencePairs,
    RewardModel,
    count_task_pairs,
    pair_accuracy,
    pair_rewards,
    train_reward_model,
)
from chapters.common.files import plots_dir

F64 = torch.float64


def hand_bt(a, b):
    return math.exp(a) / (math.exp(a) + math.exp(b))


PAIRS = [(0.7, -0.4), (-2.0, 3.0), (0.0, 0.0), (5.5, 5.4), (-10.0, -12.5)]


def test_eq17_to_eq23_each_rewriting_step_equals_bradley_terry():
    steps = bt_sigmoid_steps(*(torch.tensor(v, dtype=F64) for v in zip(*PAIRS)))
    expected = torch.tensor([hand_bt(a, b) for a, b in PAIRS], dtype=F64)
    for eq in ("(17)", "(18)", "(19)", "(21)", "(23)"):
        torch.testing.assert_close(steps[eq], expected, rtol=1e-13, atol=0, msg=f"eq. {eq}")


def test_eq20_ratio_of_exponentials_is_exponential_of_the_difference():
    r1, r2 = (torch.tensor(v, dtype=F64) for v in zip(*PAIRS))
    lhs, rhs = bt_sigmoid_steps(r1, r2)["(20)"]
    expected = torch.tensor([math.exp(b) / math.exp(a) for a, b in PAIRS], dtype=F64)
    torch.testing.assert_close(lhs, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(rhs, expected, rtol=1e-13, atol=0)


def test_eq22_sigmoid_hand_values_and_symmetry():
    z = torch.tensor([0.0, math.log(3), -math.log(3)], dtype=F64)
    torch.testing.assert_close(
        sigmoid(z), torch.tensor([0.5, 0.75, 0.25], dtype=F64), rtol=1e-14, atol=0
    )
    z = torch.linspace(-20, 20, 81, dtype=F64)
    torch.testing.assert_close(sigmoid(-z), 1 - sigmoid(z), rtol=0, atol=1e-15)


def test_eq23_bt_is_sigmoid_of_reward_gap():
    for a, b in PAIRS:
        assert bt_probability(a, b).item() == pytest.approx(hand_bt(a, b), rel=1e-13)
    assert bt_probability(800.0, 0.0).item() == 1.0  # where eq. (17) computed literally overflows
    assert torch.isnan(bt_sigmoid_steps(800.0, 0.0)["(17)"])


def test_eq24_likelihood_is_the_product_over_comparisons():
    p = [0.9, 0.6, 0.75, 0.2]
    assert preference_likelihood(p).item() == pytest.approx(0.9 * 0.6 * 0.75 * 0.2, rel=1e-14)


def test_eq25_nll_is_minus_mean_log_of_eq24():
    p = [0.9, 0.6, 0.75, 0.2]
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.75) + math.log(0.2)) / 4
    assert preference_nll(p).item() == pytest.approx(expected, rel=1e-14)
    assert preference_nll(p).item() == pytest.approx(
        -math.log(preference_likelihood(p).item()) / 4, rel=1e-13
    )


def test_eq26_loss_is_eq25_with_bt_substituted():
    r_w, r_l = (torch.tensor(v, dtype=F64) for v in zip(*PAIRS))
    expected = -sum(math.log(hand_bt(a, b)) for a, b in PAIRS) / len(PAIRS)
    assert reward_model_loss(r_w, r_l).item() == pytest.approx(expected, rel=1e-13)
    assert (
        reward_model_loss(torch.tensor([800.0], dtype=F64), torch.tensor([0.0], dtype=F64)).item()
        == 0.0
    )
    assert (
        reward_model_loss(torch.tensor([0.0], dtype=F64), torch.tensor([800.0], dtype=F64)).item()
        == 800.0
    )


def test_eq26_gradient_autograd_equals_closed_form():
    r_w = torch.randn(64, dtype=F64, requires_grad=True)
    r_l = torch.randn(64, dtype=F64, requires_grad=True)
    reward_model_loss(r_w, r_l).backward()
    g_w, g_l = reward_model_loss_grad(r_w.detach(), r_l.detach())
    torch.testing.assert_close(r_w.grad, g_w, rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(r_l.grad, g_l, rtol=1e-12, atol=1e-18)
    # and by hand for one pair: ∂/∂r_w of −log σ(r_w − r_l) = −(1 − σ(r_w − r_l)) = −σ(r_l − r_w)
    g_w1, g_l1 = reward_model_loss_grad(
        torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64)
    )
    assert g_w1.item() == pytest.approx(-1 / (1 + math.e), rel=1e-14)
    assert g_l1.item() == pytest.approx(1 / (1 + math.e), rel=1e-14)


def test_sec33_descent_on_eq26_raises_the_probability_of_y_w_not_y_l():
    """Erratum: §3.3 says training 'increases the probability of answering … with answer y_l'; it is
    y_w."""
    r_w = torch.zeros(8, dtype=F64, requires_grad=True)
    r_l = torch.zeros(8, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([r_w, r_l], lr=1.0)
    p_before = bt_probability(r_w, r_l).detach()
    reward_model_loss(r_w, r_l).backward()
    opt.step()
    assert (r_w > 0).all() and (r_l < 0).all()
    assert (bt_probability(r_w, r_l) > p_before).all()


def test_normalisation_centres_each_prompt_and_keeps_bt_probabilities():
    table = torch.randn(4, 6, dtype=F64) + 10 * torch.randn(4, 1, dtype=F64)
    centred = normalize_rewards(table)
    for row, out in zip(table.tolist(), centred.tolist()):
        mean = sum(row) / len(row)
        assert out == pytest.approx([v - mean for v in row], rel=1e-12, abs=1e-13)
    torch.testing.assert_close(
        bt_probability(centred[:, :1], centred),
        bt_probability(table[:, :1], table),
        rtol=1e-12,
        atol=1e-15,
    )
    # the flat form: rewards (N,) with the prompt of each
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0, -4.0], dtype=F64)
    prompt = torch.tensor([0, 0, 1, 1, 1, 2])
    torch.testing.assert_close(
        normalize_rewards(rewards, prompt),
        torch.tensor([-1.0, 1.0, -10.0, 0.0, 10.0, 0.0], dtype=F64),
        rtol=0,
        atol=1e-14,
    )


def test_bt_samples_follow_eq23():
    true = torch.tensor([[1.0, 0.0]], dtype=F64)
    prompt, winner, loser = sample_bt_comparisons(true, 20_000, torch.Generator().manual_seed(0))
    assert (winner != loser).all() and (prompt == 0).all()
    share = (winner == 0).double().mean().item()
    assert share == pytest.approx(hand_bt(1.0, 0.0), abs=0.01)  # 0.731, binomial s.d. 0.003


def test_mle_recovers_true_rewards_up_to_a_per_prompt_constant():
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(10, 5, generator=gen, dtype=F64) + 5 * torch.randn(
        10, 1, generator=gen, dtype=F64
    )
    truth = true - true.mean(-1, keepdim=True)
    errors = {}
    for n in (50, 3000):
        fit = fit_bt_rewards(*sample_bt_comparisons(true, n, gen), true.shape)
        torch.testing.assert_close(fit.mean(-1), torch.zeros(10, dtype=F64), rtol=0, atol=1e-12)
        errors[n] = (fit - truth).pow(2).mean().sqrt().item()
    # with 3000 comparisons per prompt (300 per pair) the s.d. of a reward is about 0.07
    assert errors[3000] < 0.1
    assert errors[3000] < errors[50] / 3  # error shrinks roughly as 1/√n (√60 ≈ 7.7)


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    return RewardModel(gpt.GPT(gpt.GPTConfig.tiny(vocab_size=16, n_positions=32))).eval()


def test_reward_head_reads_the_last_real_token_under_padding():
    rm = tiny_reward_model()
    seqs = [[3, 5, 7, 7, 2], [4, 1], [9, 9, 9, 9, 9, 9, 9, 8], [6]]
    T = max(map(len, seqs))
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([s])) for s in seqs])  # no padding at all
        right = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        right_mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        left = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
        left_mask = right_mask.flip(-1)
        torch.testing.assert_close(rm(right, right_mask), alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(rm(left, left_mask), alone, rtol=0, atol=1e-5)
        # by hand: the head on the hidden state at index len − 1
        hidden = rm.backbone.hidden_states(right, right_mask)  # (B, T, C)
        by_hand = torch.stack(
            [rm.head(hidden[b, len(s) - 1]).squeeze() for b, s in enumerate(seqs)]
        )
        torch.testing.assert_close(rm(right, right_mask), by_hand, rtol=0, atol=1e-6)
        # pad ids do not matter; the last real token does
        torch.testing.assert_close(
            rm(right.masked_fill(right_mask == 0, 13), right_mask), alone, rtol=0, atol=1e-5
        )
        changed = right.clone()
        changed[0, len(seqs[0]) - 1] = 11
        assert (rm(changed, right_mask)[0] - alone[0]).abs() > 1e-4


def test_reward_model_rejects_a_row_of_padding_only():
    rm = tiny_reward_model()
    with pytest.raises(ValueError, match="no real token"):
        rm(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_preference_pairs_right_pad_chosen_and_rejected_to_one_length():
    pairs = PreferencePairs.from_token_lists([[1, 2, 3], [4]], [[5], [6, 7, 8, 9]], pad_id=0)
    assert pairs.chosen_ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert pairs.rejected_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert len(pairs) == 2 and pairs[[1]].rejected_ids.tolist() == [[6, 7, 8, 9]]


def test_training_on_eq26_learns_the_count_reward(one_thread):
    gen = torch.Generator().manual_seed(0)
    train, _, _ = count_task_pairs(1500, gen)
    test, t_w, t_l = count_task_pairs(500, gen)
    rm = tiny_reward_model()
    losses = train_reward_model(
        rm, train, steps=150, batch_size=32, lr=3e-3, generator=gen, progress=False
    )
    assert sum(losses[-20:]) / 20 < 0.6 < losses[0]
    with torch.no_grad():
        s_w, s_l = pair_rewards(rm, test)
    distinct = t_w != t_l
    assert ((s_w > s_l) == (t_w > t_l))[
        distinct
    ].double().mean() > 0.9  # orders held-out pairs as r* does
    assert pair_accuracy(rm, test) > 0.65  # agreement with BT-noisy labels (at most ~0.76 here)


def test_script_prints_claims_and_writes_figures(capsys):
    main(["--quick", "--rm-steps", "30"])
    out = capsys.readouterr().out
    assert (
        "eq. (23) vs chapter 1's eq. (16)" in out
        and "centred RMSE" in out
        and "held-out pairs" in out
    )
    for name in ("ch2_mle_recovery", "ch2_reward_model"):
        assert (plots_dir() / f"{name}_quick.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["--rm-steps", "0"])
    assert "--rm-steps: must be at least 1, got 0" in capsys.readouterr().err
