"""Chapter 6: PPO's loss pieces (eqs. (1)–(5)) and the RLHF reward (eq. (28)) against closed forms,
float64."""

import math

import pytest
import torch

import gpt
from chapters.ch4_dpo.loss import response_logprobs
from chapters.ch6_ppo import markov_task
from chapters.ch6_ppo import trainer as ppo_trainer
from chapters.ch6_ppo.__main__ import main
from chapters.ch6_ppo.objective import (
    clipped_surrogate,
    entropy,
    gae,
    kl_k1,
    kl_k3,
    ppo_objective,
    value_loss,
    whiten,
)

F64 = dict(dtype=torch.float64)
TOL = 1e-12  # float64 sums of ~10 terms of order 1


def random_episode(batch=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, generator=g, **F64), torch.randn(batch, T, generator=g, **F64)


def td_errors(r, v, gamma):
    """δ_t = r_t + γ·V(s_{t+1}) − V(s_t), with V(s_T) = 0 after the last step."""
    T = r.shape[-1]
    return [r[..., t] + gamma * (v[..., t + 1] if t + 1 < T else 0.0) - v[..., t] for t in range(T)]


def test_eq5_gae_recursion_equals_explicit_sum_to_segment_end():
    r, v = random_episode()
    gamma, lam, T = 0.9, 0.7, r.shape[-1]
    delta = td_errors(r, v, gamma)
    # eq. (5) with the sum stopping at the segment's last step, l = T − t − 1 (the report writes T)
    explicit = torch.stack(
        [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)], -1
    )
    adv, _ = gae(r, v, gamma, lam)
    assert torch.allclose(adv, explicit, atol=TOL, rtol=0)


def test_eq5_gae_cut_off_segment_bootstraps_from_last_value():
    """A segment cut off before its episode ends: δ_(T−1) = r_(T−1) + γ·V(s_T) − V(s_(T−1)), then
    eq. (5)'s sum."""
    r, v = random_episode()
    v_T = torch.randn(3, generator=torch.Generator().manual_seed(9), **F64)
    gamma, lam, T = 0.9, 0.7, r.shape[-1]
    delta = [r[:, t] + gamma * (v[:, t + 1] if t + 1 < T else v_T) - v[:, t] for t in range(T)]
    explicit = torch.stack(
        [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)], -1
    )
    adv, ret = gae(r, v, gamma, lam, last_value=v_T)
    assert torch.allclose(adv, explicit, atol=TOL, rtol=0)
    assert torch.allclose(ret, explicit + v, atol=TOL, rtol=0)
    assert (
        adv - gae(r, v, gamma, lam)[0]
    ).abs().min() > 1e-6  # V(s_T) reaches every step of the segment


def test_eq5_gae_bootstrapped_with_the_rest_of_the_episode_recovers_the_uncut_advantages():
    """λ = 1: cutting an episode at T and bootstrapping V(s_T) = Σ_k γ^k r_(T+k) gives the whole
    episode's A_t for t < T."""
    r, v = random_episode(batch=2, T=9)
    gamma, T = 0.8, 5
    rest = sum(
        gamma**k * r[:, T + k] for k in range(r.shape[-1] - T)
    )  # the exact return after the cut
    whole, _ = gae(r, v, gamma, 1.0)
    cut, _ = gae(r[:, :T], v[:, :T], gamma, 1.0, last_value=rest)
    assert torch.allclose(cut, whole[:, :T], atol=TOL, rtol=0)


def test_eq5_gae_bootstraps_only_rows_still_running_at_the_cut():
    r, v = random_episode(batch=2, T=5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2], **F64)
    v_T = torch.tensor([2.0, 5.0], **F64)
    boot, _ = gae(r, v, 0.9, 0.8, mask, last_value=v_T)
    ended, _ = gae(r, v, 0.9, 0.8, mask)
    assert torch.equal(boot[1], ended[1])  # row 1 ended at its mask's last 1: V(s_T) plays no part
    # row 0 runs to the cut: A_t moves by (γλ)^(T−1−t)·γ·V(s_T), by hand
    shift = torch.tensor([(0.9 * 0.8) ** (4 - t) * 0.9 * 2.0 for t in range(5)], **F64)
    assert torch.allclose(boot[0] - ended[0], shift, atol=TOL, rtol=0)


def test_eq5_gae_lambda0_is_td_error():
    r, v = random_episode()
    adv, _ = gae(r, v, 0.95, 0.0)
    assert torch.allclose(adv, torch.stack(td_errors(r, v, 0.95), -1), atol=TOL, rtol=0)


def test_eq5_gae_lambda1_is_discounted_return_minus_value():
    r, v = random_episode()
    gamma, T = 0.8, r.shape[-1]
    discounted_return = torch.stack(
        [sum(gamma**k * r[..., t + k] for k in range(T - t)) for t in range(T)], -1
    )
    adv, _ = gae(r, v, gamma, 1.0)
    assert torch.allclose(adv, discounted_return - v, atol=TOL, rtol=0)


def test_eq5_gae_returns_are_td_lambda_returns():
    r, v = random_episode()
    gamma, lam, T = 0.9, 0.6, r.shape[-1]

    def n_step(t, n):  # G_t^(n) = Σ_{k<n} γ^k r_{t+k} + γ^n V(s_{t+n}), V = 0 past the end
        g = sum(gamma**k * r[..., t + k] for k in range(min(n, T - t)))
        return g + (gamma**n * v[..., t + n] if t + n < T else 0.0)

    # G_t^λ = (1 − λ) Σ_{n=1}^{T−t−1} λ^{n−1} G_t^(n) + λ^{T−t−1} G_t (the weights of the longer
    # n-step returns collapse onto the full return)
    td_lambda = torch.stack(
        [
            (1 - lam) * sum(lam ** (n - 1) * n_step(t, n) for n in range(1, T - t))
            + lam ** (T - t - 1) * n_step(t, T - t)
            for t in range(T)
        ],
        -1,
    )
    _, returns = gae(r, v, gamma, lam)
    assert torch.allclose(returns, td_lambda, atol=TOL, rtol=0)


def test_eq5_gae_masked_positions_get_zero_advantage_and_episode_ends_at_mask():
    r, v = random_episode(batch=3, T=7)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths], **F64)
    adv, ret = gae(r, v, 0.9, 0.8, mask)
    for i, n in enumerate(lengths):
        alone, alone_ret = gae(r[i, :n], v[i, :n], 0.9, 0.8)  # the same episode cut at its end
        assert torch.allclose(adv[i, :n], alone, atol=TOL, rtol=0)
        assert torch.allclose(ret[i, :n], alone_ret, atol=TOL, rtol=0)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_whitened_advantages_have_mean0_var1_over_mask():
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), **F64) * 3 + 2
    mask = (torch.arange(9) < torch.tensor([9, 5, 2, 7])[:, None]).to(torch.float64)
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-12
    assert (
        abs((real**2).mean().item() - 1) < 1e-6
    )  # population variance; eps = 1e-8 in the denominator
    assert (w[~mask.bool()] == 0).all()


def test_eq1_clipped_gradient_is_zero_exactly_where_the_clip_binds():
    eps = 0.2
    ratio = torch.tensor([0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.6] * 2, **F64)
    adv = torch.tensor([1.5] * 7 + [-0.7] * 7, **F64)
    old_logp = torch.log(torch.linspace(0.1, 0.6, 14, **F64))
    logp = (old_logp + ratio.log()).requires_grad_()
    clipped_surrogate(logp, old_logp, adv, eps).sum().backward()
    binds = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    unclipped_grad = ratio * adv  # d(r·A)/d log π = r·A
    assert binds.sum() == 4 and (~binds).sum() == 10
    assert (logp.grad[binds] == 0).all()
    assert torch.allclose(logp.grad[~binds], unclipped_grad[~binds], atol=TOL, rtol=0)


def test_eq1_clipped_objective_is_a_pessimistic_bound():
    ratio = torch.linspace(0.3, 2.0, 50, **F64)
    for a in (1.0, -1.0):
        adv = torch.full_like(ratio, a)
        surrogate = clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, 0.2)
        assert (surrogate <= ratio * adv + TOL).all()
        inside = (ratio - 1).abs() <= 0.2
        assert torch.allclose(surrogate[inside], (ratio * adv)[inside], atol=TOL, rtol=0)


def test_eq2_value_loss_and_its_clipped_variant():
    v, target = (
        torch.tensor([0.5, 0.1, -0.3], **F64, requires_grad=True),
        torch.tensor([1.0, 0.0, 0.5], **F64),
    )
    assert torch.allclose(
        value_loss(v, target), torch.tensor([0.25, 0.01, 0.64], **F64), atol=TOL, rtol=0
    )
    old = torch.tensor([0.0, 0.0, 0.0], **F64)
    clipped = value_loss(v, target, old, 0.2)
    # by hand: V clipped to V_old ± 0.2 = [0.2, 0.1, -0.2] -> squared errors [0.64, 0.01, 0.49]; the
    # max of both
    assert torch.allclose(clipped, torch.tensor([0.64, 0.01, 0.64], **F64), atol=TOL, rtol=0)
    clipped.sum().backward()
    assert v.grad[0] == 0  # the clipped branch wins: no gradient pushes V further from V_old
    assert torch.allclose(v.grad[1:], 2 * (v - target)[1:].detach(), atol=TOL, rtol=0)


def test_eq3_entropy_of_uniform_is_log_num_actions():
    for n in (2, 5, 50257):
        assert abs(entropy(torch.zeros(n, **F64)).item() - math.log(n)) < 1e-12
    assert entropy(torch.tensor([0.0, -1e4, -1e4], **F64)).item() < 1e-12  # deterministic: H = 0


def test_eq4_objective_is_maximised_and_its_entropy_term_is_a_bonus():
    """Eq. (4) as written (L^H = E[−βH] added with +c2) lowers the entropy when maximised; PPO's
    +c2·H raises it."""
    c2, beta, steps = 0.5, 1.0, 20

    def ascend(objective):
        logits = torch.tensor([2.0, 0.0, -1.0], **F64, requires_grad=True)
        for _ in range(steps):
            (grad,) = torch.autograd.grad(objective(logits), logits)
            logits = (logits + 0.5 * grad).detach().requires_grad_()
        return entropy(logits).item()

    zero = torch.zeros(1, **F64)
    h0 = entropy(torch.tensor([2.0, 0.0, -1.0], **F64)).item()
    ours = ascend(lambda z: ppo_objective(zero, zero, entropy(z)[None], vf_coef=0.5, ent_coef=c2))
    report = ascend(lambda z: c2 * (-beta * entropy(z)))  # + c2·L^H with L^H = E[−βH], eq. (3)
    assert ours > h0 + 0.1 and report < h0 - 0.1
    # L is an objective: its gradient in the surrogate is +1 and in the value error −c1 (ascent
    # lowers the error)
    s, vl = torch.ones(4, **F64, requires_grad=True), torch.ones(4, **F64, requires_grad=True)
    ppo_objective(s, vl, torch.zeros(4, **F64), vf_coef=0.5).backward()
    assert torch.allclose(s.grad, torch.full((4,), 0.25, **F64)) and torch.allclose(
        vl.grad, torch.full((4,), -0.125, **F64)
    )


def test_eq28_rollout_rewards_sum_to_score_minus_beta_sequence_logratio(one_thread):
    trainer, _ = tiny_trainer(
        iterations=1, eos_id=7
    )  # one update, so π ≠ π_ref; eos 7 makes lengths differ
    batch = trainer.rollout(*trainer.sample_prompts(8))
    mask = batch["mask"].double()
    log_ratio = ((batch["logp"] - batch["ref_logp"]).double() * mask).sum(
        -1
    )  # log π(y|x) − log π_ref(y|x)
    expected = batch["scores"].double() - trainer.beta * log_ratio
    assert (
        log_ratio.abs().max() > 1e-3 and mask.sum(-1).min() < mask.shape[1]
    )  # a real test: KL > 0, early ends
    assert torch.allclose(
        batch["rewards"].double().sum(-1), expected, atol=1e-5, rtol=0
    )  # float32 log-probs
    assert (batch["rewards"][~batch["mask"].bool()] == 0).all()


def test_kl_estimators_k1_k3_unbiased_by_enumeration_and_k3_nonnegative():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        p = torch.softmax(torch.randn(7, generator=g, **F64) * 2, 0)
        q = torch.softmax(torch.randn(7, generator=g, **F64) * 2, 0)
        kl = sum(p[a] * math.log(p[a] / q[a]) for a in range(7))  # KL(p ‖ q) by hand
        assert abs((p * kl_k1(p.log(), q.log())).sum() - kl) < TOL
        assert abs((p * kl_k3(p.log(), q.log())).sum() - kl) < TOL
        assert (kl_k3(p.log(), q.log()) >= 0).all()
    assert (kl_k3(torch.zeros(1, **F64), torch.linspace(-30, 30, 101, **F64)) >= 0).all()


def test_eq36_chain_optimum_matches_enumeration_over_all_responses():
    """The soft-Bellman optimum on the chain equals π* ∝ π_ref·exp(r/β) enumerated over all 3^4
    responses."""
    import itertools

    start, transition = markov_task.markov_chain(3, 0.5, torch.Generator().manual_seed(4))
    token_class, length, beta = (0,), 4, 0.3
    for s0 in range(3):
        weights, rewards, log_ref = [], [], []
        for y in itertools.product(range(3), repeat=length):
            path = (s0,) + y
            lp = sum(
                math.log(transition[path[i], path[i + 1]]) for i in range(length)
            )  # log π_ref(y|x)
            r = sum(t in token_class for t in y) / length
            weights.append(math.exp(lp + r / beta))
            rewards.append(r)
            log_ref.append(lp)
        z = sum(weights)
        pi = [w / z for w in weights]
        reward = sum(p * r for p, r in zip(pi, rewards))
        kl = sum(p * (math.log(p) - lr) for p, lr in zip(pi, log_ref))
        got = markov_task.chain_kl_optimum(
            torch.tensor([s0]), transition, token_class, length, beta
        )
        assert abs(got["reward"].item() - reward) < 1e-12
        assert abs(got["kl"].item() - kl) < 1e-12
        assert abs(got["objective"].item() - beta * math.log(z)) < 1e-12


def test_adaptive_kl_controller_moves_beta_toward_target_with_capped_steps():
    # β·(1 + K·e), K = 100/1000, e = clip(KL/6 − 1, −0.2, 0.2)
    for kl, error in [(100.0, 0.2), (6.6, 0.1), (3.0, -0.2)]:
        ctl = ppo_trainer.AdaptiveKLController(beta=0.1, target=6.0, horizon=1000)
        assert abs(ctl.update(kl=kl, n_samples=100) - 0.1 * (1 + 0.1 * error)) < TOL


def test_policy_forward_logprobs_sum_to_ch4_response_logprobs_and_value_head_starts_at_zero():
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=11, n_positions=16))
    ids = torch.randint(11, (2, 9))
    head = ppo_trainer.ValueHead(model.config.n_embd)
    logits, per_token, values = ppo_trainer.policy_forward(
        model, ids, None, start=4, value_head=head
    )  # (2, 5) each
    mask = torch.zeros_like(ids)
    mask[:, 4:] = 1
    assert torch.allclose(
        per_token.sum(-1), response_logprobs(model(ids), ids, mask), atol=1e-5, rtol=0
    )
    assert logits.shape == (2, 5, 11) and values.shape == (2, 5) and (values == 0).all()


def test_response_mask_keeps_tokens_up_to_first_eos():
    resp = torch.tensor([[5, 3, 9, 1], [9, 9, 2, 2], [1, 2, 3, 4]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(ppo_trainer.response_mask(resp, eos_id=9), expected)


def tiny_trainer(seed=0, iterations=2, eos_id=None):
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=8, n_positions=16))
    ref = gpt.GPT(model.config)
    ref.load_state_dict(model.state_dict())
    prompts = [[1, 2, 3], [4, 5], [6]]
    cfg = ppo_trainer.PPOConfig(
        batch_size=8, minibatch_size=4, epochs=2, response_length=5, eos_id=eos_id, seed=seed
    )
    trainer = ppo_trainer.PPOTrainer(
        model, ref, markov_task.class_fraction_reward({0, 1}), prompts, cfg
    )
    return trainer, trainer.train(iterations, progress=False)


def test_rollout_whitens_advantages_over_each_rows_response_tokens_only(one_thread):
    """EOS-ended rows of different lengths: advantages are whitened over the response mask alone
    (mean 0, variance 1 there, 0 after each row's EOS), i.e. the raw eq. (5) advantages standardised
    by hand over the real tokens."""
    trainer, _ = tiny_trainer(iterations=1, eos_id=7)
    batch = trainer.rollout(*trainer.sample_prompts(16))
    real = batch["mask"].bool()
    assert len(set(real.sum(-1).tolist())) >= 3  # rows end at different places
    cfg = trainer.config
    raw, _ = gae(
        batch["rewards"].double(),
        (batch["values"] * batch["mask"]).double(),
        cfg.gamma,
        cfg.lam,
        batch["mask"].double(),
    )
    expected = torch.zeros_like(raw)
    expected[real] = (raw[real] - raw[real].mean()) / (raw[real].var(unbiased=False) + 1e-8).sqrt()
    adv = batch["advantages"].double()
    assert (adv[~real] == 0).all()
    assert abs(adv[real].mean().item()) < 1e-5 and abs(adv[real].pow(2).mean().item() - 1) < 1e-4
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=0)  # float32 rollout


def test_trainer_starts_on_policy_and_is_repeatable(one_thread):
    trainer, history = tiny_trainer()
    _, again = tiny_trainer()
    assert history == again  # same seed, same numbers
    assert history[0]["kl"] == 0  # policy = reference before the first update
    batch = trainer.rollout(*trainer.sample_prompts(4))
    with torch.no_grad():
        _, logp, _ = ppo_trainer.policy_forward(
            trainer.policy, batch["input_ids"], batch["attention_mask"], batch["start"]
        )
    assert torch.allclose(
        logp, batch["logp"], atol=1e-6, rtol=0
    )  # r_t(θ) = 1 at the start of each update


def test_config_rejects_bad_values_in_one_line():
    with pytest.raises(ValueError, match="minibatch_size"):
        ppo_trainer.PPOConfig(minibatch_size=0)
    with pytest.raises(ValueError, match="gamma"):
        ppo_trainer.PPOConfig(gamma=1.5)


def test_quick_run_raises_reward_with_bounded_kl(one_thread):
    out = main(["--quick"])
    before, after = out["before"], out["after"]
    gain, se = (
        after["reward"] - before["reward"],
        math.hypot(before["reward_se"], after["reward_se"]),
    )
    assert gain > 5 * se and gain > 0.1
    assert max(h["kl"] for h in out["history"]) < 10  # nats per response; β = 0.05 keeps it bounded
