"""Chapter 4 (report §4.2–§4.4, eqs. (38)–(41)): each check computes its closed form independently,
by hand or by enumeration, in float64 (tabular) or float32 (the tiny GPT-2)."""

import itertools
import math

import pytest
import torch
from scipy.optimize import brentq

from chapters.ch4_dpo.__main__ import main
from chapters.ch4_dpo.loss import (
    dpo_gradient,
    dpo_loss,
    dpo_metrics,
    fit_tabular_dpo,
    implicit_reward,
    plackett_luce_dpo_loss,
    preference_counts,
    preference_probabilities,
    random_tiny_gpt2,
    response_logprobs,
    tabular_dpo_loss,
    unshifted_logprobs,
)
from chapters.common.rows import prompt_response_rows

LN2 = math.log(2)
F64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see chapters.common.one_thread


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def by_prefixes(model, prompt, response):
    """Σ_t log π(y_t | x, y_<t), one unpadded forward pass per prefix: the definition, independent
    of response_logprobs."""
    total = 0.0
    for t in range(len(response)):
        logits = model(torch.cat([prompt, response[:t]])[None])[
            0, -1
        ]  # (V,): next token after the prefix
        total = total + torch.log_softmax(logits, -1)[response[t]]
    return total


def tokens(*ids):
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------- eq. (38)
def test_eq38_loss_is_ln2_when_policy_equals_reference():
    lp = torch.randn(2, 16, **F64) * 10
    loss = dpo_loss(lp[0], lp[1], lp[0], lp[1], beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, LN2), atol=1e-15, rtol=0)


def test_eq38_equals_hand_computed_minus_log_sigmoid_of_beta_margin():
    pc, pr, rc, rr, beta = -4.0, -6.5, -5.0, -5.5, 0.3
    by_hand = -math.log(sigmoid(beta * (pc - rc) - beta * (pr - rr)))
    got = dpo_loss(*(torch.tensor([v], **F64) for v in (pc, pr, rc, rr)), beta).item()
    assert got == pytest.approx(by_hand, abs=1e-15)


def test_eq38_large_margins_give_finite_loss_and_gradients():
    margin = torch.tensor([1e4, -1e4], dtype=torch.float32, requires_grad=True)
    zeros = torch.zeros(2)
    loss = dpo_loss(margin, zeros, zeros, zeros, beta=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(margin.grad).all()
    assert loss.tolist() == pytest.approx(
        [0.0, 1e4], abs=1e-3
    )  # −log σ(z): → 0 as z → ∞, → −z as z → −∞
    assert margin.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)  # d/dz −log σ(z) = −σ(−z)
    naive = -torch.log(torch.sigmoid(margin.detach()))  # what the stable form avoids
    assert torch.isinf(naive[1])


def test_eq38_depends_on_the_policy_only_through_the_two_log_ratios():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(8, generator=g, **F64) for _ in range(4))
    a, b = torch.randn(8, generator=g, **F64) * 5, torch.randn(8, generator=g, **F64) * 5
    base = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # the same ratios π/π_ref for y_w and y_l, from other policies and references: the same loss
    assert torch.allclose(
        dpo_loss(pc + a, pr + b, rc + a, rr + b, beta=0.5), base, atol=1e-14, rtol=0
    )
    # a different ratio: a different loss (so the check above can fail)
    assert not torch.allclose(dpo_loss(pc + a, pr, rc, rr, beta=0.5), base, atol=1e-3)


def test_eq38_tabular_policies_differing_off_the_pair_give_the_same_loss():
    g = torch.Generator().manual_seed(2)
    ref = torch.softmax(torch.randn(6, generator=g, **F64), -1)
    pi1 = torch.softmax(torch.randn(6, generator=g, **F64), -1)
    pi2 = pi1.clone()
    rest = torch.tensor(
        [2, 3, 4, 5]
    )  # y_w = 0, y_l = 1 keep their probabilities; the others are reshuffled
    pi2[rest] = pi1[rest].sum() * torch.softmax(torch.randn(4, generator=g, **F64), -1)
    assert not torch.allclose(pi1, pi2)
    losses = [dpo_loss(p[0].log(), p[1].log(), ref[0].log(), ref[1].log(), 0.2) for p in (pi1, pi2)]
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-15)


def test_implicit_reward_and_trainer_metrics_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0], **F64), torch.tensor([-3.0, -1.0], **F64)
    rc, rr = torch.tensor([-2.0, -2.0], **F64), torch.tensor([-2.0, -2.0], **F64)
    beta = 0.5
    assert implicit_reward(pc, rc, beta).tolist() == [0.5, 0.0]
    m = dpo_metrics(pc, pr, rc, rr, beta)
    # r̂_w = [0.5, 0], r̂_l = [−0.5, 0.5], margins [1, −0.5]
    assert m["rewards/chosen"] == pytest.approx(0.25, abs=1e-15)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-15)
    assert m["rewards/margins"] == pytest.approx(0.25, abs=1e-15)
    assert m["rewards/accuracies"] == 0.5
    assert m["loss"] == pytest.approx(
        (-math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))) / 2, abs=1e-15
    )
    tie = dpo_metrics(
        pc, pc, rc, rc, beta
    )  # policy = reference: margins 0, counted as not yet right (as TRL does)
    assert tie["rewards/accuracies"] == 0.0 and tie["loss"] == pytest.approx(LN2, abs=1e-15)


# ----------------------------------------------------------------------------------- eqs. (39)–(40)
def pl_probability_by_hand(scores, ranking):
    """Plackett–Luce: Π_k exp(s_τ(k)) / Σ_{j≥k} exp(s_τ(j)), float64 by enumeration of the sums."""
    p = 1.0
    for k in range(len(ranking)):
        p *= math.exp(scores[ranking[k]]) / sum(
            math.exp(scores[ranking[j]]) for j in range(k, len(ranking))
        )
    return p


def test_eq40_with_two_responses_equals_eq38():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(10, generator=g, **F64) for _ in range(4))
    pl = plackett_luce_dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.7)
    assert torch.allclose(pl, dpo_loss(pc, pr, rc, rr, beta=0.7), atol=1e-14, rtol=0)


def test_eq40_is_minus_log_plackett_luce_of_implicit_rewards_and_sums_to_one():
    g = torch.Generator().manual_seed(4)
    K, beta = 4, 0.5
    pol, ref = torch.randn(K, generator=g, **F64), torch.randn(K, generator=g, **F64)
    scores = (beta * (pol - ref)).tolist()
    total = 0.0
    for tau in itertools.permutations(range(K)):
        loss = plackett_luce_dpo_loss(pol[list(tau)][None], ref[list(tau)][None], beta).item()
        assert math.exp(-loss) == pytest.approx(pl_probability_by_hand(scores, tau), abs=1e-14)
        total += math.exp(-loss)
    assert total == pytest.approx(1.0, abs=1e-13)


def test_eq39_partition_function_cancels():
    g = torch.Generator().manual_seed(5)
    K, beta = 4, 0.3
    pi_ref = torch.softmax(torch.randn(K, generator=g, **F64), -1)
    r = torch.randn(K, generator=g, **F64)
    Z = (pi_ref * torch.exp(r / beta)).sum()
    pi_star = pi_ref * torch.exp(r / beta) / Z  # eq. (36), by hand
    assert torch.allclose(
        beta * torch.log(pi_star / pi_ref) + beta * torch.log(Z), r, atol=1e-14
    )  # eq. (37)
    for tau in itertools.permutations(range(K)):
        # first line of (39) with exp(r*), against its second line (β·log π*/π_ref, no Z)
        order = list(tau)
        second_line = math.exp(
            -plackett_luce_dpo_loss(
                pi_star.log()[order][None], pi_ref.log()[order][None], beta
            ).item()
        )
        assert second_line == pytest.approx(pl_probability_by_hand(r.tolist(), tau), abs=1e-13)


def test_eq39_as_printed_without_exp_is_not_a_ranking_distribution():
    """Erratum: eq. (39) prints r*(y_τ(k)) / Σ_j r*(y_τ(j)); Plackett–Luce needs exp(r*) in both."""
    r = [1.0, -0.5, 0.3]

    def printed(tau):
        return math.prod(r[tau[k]] / sum(r[tau[j]] for j in range(k, 3)) for k in range(3))

    rankings = list(itertools.permutations(range(3)))
    assert min(printed(t) for t in rankings) < 0  # a negative "probability"
    # the step to the second line needs invariance to r + β·log Z(x); the printed form lacks it
    shifted = [v + 1.0 for v in r]
    assert printed((0, 1, 2)) != pytest.approx(
        math.prod(shifted[k] / sum(shifted[j] for j in range(k, 3)) for k in range(3)), abs=1e-3
    )
    assert pl_probability_by_hand(r, (0, 1, 2)) == pytest.approx(
        pl_probability_by_hand(shifted, (0, 1, 2)), abs=1e-15
    )


# ----------------------------------------------------------------------------------------- eq. (41)
def test_eq41_autograd_equals_closed_form_tabular():
    g = torch.Generator().manual_seed(6)
    X, Y, beta = 3, 5, 0.4
    theta = torch.randn(X, Y, generator=g, **F64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(X, Y, generator=g, **F64), -1)
    x, w, l = tokens(0, 1, 2, 2, 0), tokens(0, 3, 1, 4, 2), tokens(2, 1, 0, 3, 4)
    logp = torch.log_softmax(theta, -1)
    dpo_loss(logp[x, w], logp[x, l], log_ref[x, w], log_ref[x, l], beta).mean().backward()
    # by hand: ∇_θ log π(y|x) = e_{x,y} − π(·|x) e_x, so ∇log π(y_w) − ∇log π(y_l) = e_{x,w} −
    # e_{x,l}
    closed = torch.zeros(X, Y, **F64)
    lp = logp.detach()
    for i in range(len(x)):
        r_w = beta * (lp[x[i], w[i]] - log_ref[x[i], w[i]]).item()
        r_l = beta * (lp[x[i], l[i]] - log_ref[x[i], l[i]]).item()
        closed[x[i], w[i]] -= beta * sigmoid(r_l - r_w) / len(x)
        closed[x[i], l[i]] += beta * sigmoid(r_l - r_w) / len(x)
    assert torch.allclose(theta.grad, closed, atol=1e-15, rtol=0)

    # the chapter's eq. (41) function, fed the per-example gradients by hand, gives the same
    def grad_logp(xs, ys):  # (B, X*Y): ∇_θ log π(y|x) = e_{x,y} − π(·|x) in row x
        grads = torch.zeros(len(xs), X, Y, **F64)
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            grads[i, xi] = -lp[xi].exp()
            grads[i, xi, yi] += 1
        return grads.flatten(1)

    got = dpo_gradient(
        grad_logp(x, w), grad_logp(x, l), lp[x, w], lp[x, l], log_ref[x, w], log_ref[x, l], beta
    )
    assert torch.allclose(got, closed.flatten(), atol=1e-15, rtol=0)


def test_eq41_autograd_equals_closed_form_gpt2_parameters():
    """dpo_gradient fed the per-example gradients of the prefix-by-prefix log π(y|x) equals autograd
    of eq. (38)."""
    policy, ref = random_tiny_gpt2(0), random_tiny_gpt2(1)
    beta = 0.5
    pairs = [
        (tokens(5, 9, 2), tokens(7, 1, 3), tokens(8)),
        (tokens(4, 4), tokens(10, 11), tokens(12, 13, 14, 15)),
    ]
    B = len(pairs)
    prompts = [p for p, _, _ in pairs] * 2
    ids, attn, resp = prompt_response_rows(
        prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    )
    with torch.no_grad():
        ref_lp = response_logprobs(ref(ids, attn), ids, resp)
    lp = response_logprobs(policy(ids, attn), ids, resp)
    params = list(policy.parameters())
    auto = torch.autograd.grad(
        dpo_loss(lp[:B], lp[B:], ref_lp[:B], ref_lp[B:], beta).mean(), params
    )
    auto = torch.cat([a.flatten() for a in auto])  # (P,)

    def flat_grad(value):  # (P,): ∇_θ of one scalar
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])

    # eq. (41)'s ingredients from the definition (one unpadded forward pass per prefix), not from
    # response_logprobs
    lp_w, lp_l = (
        [by_prefixes(policy, x, y) for x, y in zip(prompts[:B], ys)]
        for ys in ([c for _, c, _ in pairs], [r for _, _, r in pairs])
    )
    grad_w, grad_l = (
        torch.stack([flat_grad(v) for v in lp_w]),
        torch.stack([flat_grad(v) for v in lp_l]),
    )  # (B, P)
    with torch.no_grad():
        ref_w = torch.stack([by_prefixes(ref, x, c) for x, c, _ in pairs])
        ref_l = torch.stack([by_prefixes(ref, x, r) for x, _, r in pairs])
    lp_w, lp_l = torch.stack(lp_w).detach(), torch.stack(lp_l).detach()
    got = dpo_gradient(grad_w, grad_l, lp_w, lp_l, ref_w, ref_l, beta)
    # and eq. (41) by hand: −β/B Σ_i σ(r̂_l − r̂_w)(∇log π(y_w) − ∇log π(y_l))
    by_hand = (
        sum(
            -beta
            * sigmoid(beta * ((lp_l[i] - ref_l[i]) - (lp_w[i] - ref_w[i])).item())
            * (grad_w[i] - grad_l[i])
            for i in range(B)
        )
        / B
    )
    scale = auto.abs().max().item()
    assert scale > 1e-3  # a non-trivial gradient
    assert torch.allclose(got, auto, atol=1e-5 * scale, rtol=1e-4)
    assert torch.allclose(by_hand, auto, atol=1e-5 * scale, rtol=1e-4)
    wrong_sign = dpo_gradient(
        grad_l, grad_w, lp_l, lp_w, ref_l, ref_w, beta
    )  # winner and loser swapped
    assert not torch.allclose(wrong_sign, auto, atol=1e-2 * scale)


# ------------------------------------------------------------------------------ response log-probs
def test_response_logprobs_on_gpt2_equals_token_by_token_sum():
    model = random_tiny_gpt2(0)
    prompts = [tokens(5, 9, 2), tokens(4), tokens(8, 8, 8, 8)]
    responses = [
        tokens(7, 1, 3),
        tokens(10, 11, 12, 13, 14),
        tokens(6),
    ]  # rows right-padded to different lengths
    ids, attn, resp = prompt_response_rows(prompts, responses, pad_id=63)
    with torch.no_grad():
        got = response_logprobs(model(ids, attn), ids, resp)
        want = torch.stack([by_prefixes(model, p, r) for p, r in zip(prompts, responses)])
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 1.0  # the rows really differ


def test_gpt2_first_step_loss_is_ln2():
    model = random_tiny_gpt2(0)
    ids, attn, resp = prompt_response_rows([tokens(3, 4)] * 2, [tokens(5, 6), tokens(7, 8, 9)])
    with torch.no_grad():
        lp = response_logprobs(model(ids, attn), ids, resp)
    assert dpo_loss(lp[:1], lp[1:], lp[:1], lp[1:], 0.1).item() == pytest.approx(LN2, abs=1e-7)


def test_per_token_mean_divides_by_the_number_of_response_tokens():
    model = random_tiny_gpt2(0)
    prompts, responses = [tokens(3, 4), tokens(2)], [tokens(5, 6, 7), tokens(9)]
    ids, attn, resp = prompt_response_rows(prompts, responses)
    with torch.no_grad():
        logits = model(ids, attn)
        mean = response_logprobs(logits, ids, resp, per_token_mean=True)
        want = torch.stack([by_prefixes(model, p, r) / len(r) for p, r in zip(prompts, responses)])
    assert torch.allclose(mean, want, atol=1e-5, rtol=1e-5)


def test_per_token_mean_moves_the_optimum_to_length_scaled_rewards():
    """With log π/π_ref divided by |y|, DPO's optimum is π_ref·exp(|y|(r*/β + c)), not π* (eq.
    (36)): a length bias."""
    g = torch.Generator().manual_seed(7)
    Y, beta = 4, 0.5
    pi_ref = torch.softmax(torch.randn(1, Y, generator=g, **F64), -1)
    r = torch.randn(1, Y, generator=g, **F64)
    lengths = torch.tensor([1.0, 2.0, 3.0, 5.0], **F64)
    fit = fit_tabular_dpo(pi_ref, preference_probabilities(pi_ref, r), beta, lengths=lengths)[0]
    c = brentq(
        lambda c: (pi_ref[0] * torch.exp(lengths * (r[0] / beta + c))).sum().item() - 1,
        -50,
        50,
        xtol=1e-15,
    )
    predicted = pi_ref[0] * torch.exp(lengths * (r[0] / beta + c))
    pi_star = pi_ref[0] * torch.exp(r[0] / beta) / (pi_ref[0] * torch.exp(r[0] / beta)).sum()
    assert torch.allclose(fit, predicted, atol=1e-9, rtol=0)
    assert (fit - pi_star).abs().max() > 0.05


def test_response_logprobs_rejects_bad_input():
    logits, ids = torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(logits, ids, torch.tensor([[True, True, False, False]]))
    with pytest.raises(ValueError, match="shapes disagree"):
        response_logprobs(logits, ids, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no response tokens"):
        response_logprobs(logits, ids, torch.zeros(1, 4, dtype=torch.bool), per_token_mean=True)


# ----------------------------------------------------------------------- the report authors' code
def test_authors_unshifted_logprob_is_not_a_probability_of_the_response():
    """Σ over all V² two-token responses of π(y|x) is 1; of the unshifted score it is not."""
    model = random_tiny_gpt2(0)
    V = model.config.vocab_size
    prompt = tokens(5, 9, 2)
    responses = torch.cartesian_prod(
        torch.arange(V), torch.arange(V)
    )  # (V², 2): every response of length 2
    ids = torch.cat([prompt.expand(len(responses), -1), responses], 1)  # (V², 5)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad():
        logits = model(ids)
        correct = response_logprobs(logits, ids, mask).double().exp().sum().item()
        unshifted = unshifted_logprobs(logits, ids, mask).double().exp().sum().item()
    assert correct == pytest.approx(1.0, abs=1e-4)
    assert abs(unshifted - 1.0) > 0.1


def test_authors_hidden_response_cannot_see_its_own_earlier_tokens():
    """attention_mask = 0 on the response: log π(y_3 | ...) no longer depends on y_1; the real one
    does."""
    model = random_tiny_gpt2(0)
    prompt = tokens(5, 9, 2)
    a, b = tokens(7, 1, 3), tokens(40, 1, 3)  # differ only in the first response token
    ids, attn, resp = prompt_response_rows([prompt, prompt], [a, b])
    hide = attn * ~resp
    only_last = torch.zeros_like(resp)
    only_last[:, -1] = True  # score y_3 alone
    with torch.no_grad():
        real = response_logprobs(model(ids, attn), ids, only_last)
        hidden = response_logprobs(model(ids, hide), ids, only_last)
        full_hidden = response_logprobs(model(ids, hide), ids, resp)
        want = torch.stack([by_prefixes(model, prompt, r) for r in (a, b)])
    assert (real[0] - real[1]).abs() > 0.1
    assert (hidden[0] - hidden[1]).abs() < 1e-6
    assert (full_hidden - want).abs().min() > 0.1  # not log π(y|x)


def test_authors_padding_inside_logprob_makes_the_loss_depend_on_the_batch():
    policy, ref = random_tiny_gpt2(0), random_tiny_gpt2(1)
    beta = 0.5
    p, c, r = tokens(5, 9), tokens(7, 1), tokens(3, 4)  # the example under study
    p2, c2, r2 = (
        tokens(6),
        tokens(11, 12, 13, 14, 15, 16),
        tokens(17),
    )  # a batch-mate with a long response

    def losses(triples, mask_of):
        B = len(triples)
        prompts = [t[0] for t in triples] * 2
        ids, attn, resp = prompt_response_rows(
            prompts, [t[1] for t in triples] + [t[2] for t in triples]
        )
        mask = mask_of(ids, attn, resp)
        with torch.no_grad():
            lp, rl = (response_logprobs(m(ids, attn), ids, mask) for m in (policy, ref))
        return dpo_loss(lp[:B], lp[B:], rl[:B], rl[B:], beta)

    def correct(ids, attn, resp):
        return resp

    def everything_but_first(ids, attn, resp):  # prompt and padding inside
        return torch.ones_like(resp).index_fill(1, tokens(0), False)

    def prompt_inside(ids, attn, resp):  # the prompt inside, padding still out
        return attn.bool().index_fill(1, tokens(0), False)

    alone, batched = losses([(p, c, r)], correct)[0], losses([(p, c, r), (p2, c2, r2)], correct)[0]
    assert alone.item() == pytest.approx(batched.item(), abs=1e-6)
    assert abs(alone.item() - LN2) > 0.05  # policy ≠ reference: a loss with something to lose
    bad_alone = losses([(p, c, r)], everything_but_first)[0]
    bad_batched = losses([(p, c, r), (p2, c2, r2)], everything_but_first)[0]
    assert (
        abs(bad_batched.item() - bad_alone.item()) > 0.05
    )  # the example's loss now depends on its batch-mate
    # the prompt alone cancels in a summed margin (same prompt for y_w and y_l); padding does not
    assert losses([(p, c, r), (p2, c2, r2)], prompt_inside)[0].item() == pytest.approx(
        batched.item(), abs=1e-5
    )


# ------------------------------------------------------------------- the central claim, tabular
def tabular_problem(seed, X=2, Y=4, beta=0.5):
    g = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(0.5 * torch.randn(X, Y, generator=g, **F64), -1)
    r = torch.randn(X, Y, generator=g, **F64)
    pi_star = pi_ref * torch.exp(r / beta)
    return pi_ref, r, pi_star / pi_star.sum(-1, keepdim=True), beta  # eq. (36) by hand


def test_preference_probabilities_are_bradley_terry_on_pairs_from_the_reference():
    pi_ref, r, _, _ = tabular_problem(8)
    P = preference_probabilities(pi_ref, r)
    assert P.sum().item() == pytest.approx(1.0, abs=1e-14)
    for x, w, l in itertools.product(range(2), range(4), range(4)):
        if w == l:
            assert P[x, w, l] == 0
            continue
        bt = sigmoid((r[x, w] - r[x, l]).item())
        assert (P[x, w, l] / (P[x, w, l] + P[x, l, w])).item() == pytest.approx(bt, abs=1e-14)
        pair = (
            pi_ref[x, w] * pi_ref[x, l] / (1 - (pi_ref[x] ** 2).sum()) / 2
        )  # x uniform over 2, unordered pair
        assert (P[x, w, l] + P[x, l, w]).item() == pytest.approx(2 * pair.item(), abs=1e-14)


def test_tabular_loss_on_counts_equals_mean_over_rows():
    pi_ref, r, _, beta = tabular_problem(9)
    theta = torch.randn(2, 4, generator=torch.Generator().manual_seed(9), **F64)
    rows = [(0, 1, 2), (0, 1, 2), (1, 3, 0), (0, 2, 1), (1, 3, 0), (1, 0, 3)]
    counts = torch.zeros(2, 4, 4, **F64)
    for row in rows:
        counts[row] += 1
    lp, lr = torch.log_softmax(theta, -1), pi_ref.log()
    margins = [beta * ((lp[x, w] - lr[x, w]) - (lp[x, l] - lr[x, l])).item() for x, w, l in rows]
    by_hand = sum(-math.log(sigmoid(m)) for m in margins) / len(rows)
    assert tabular_dpo_loss(theta, pi_ref, counts, beta).item() == pytest.approx(by_hand, abs=1e-14)


def test_dpo_on_infinite_bt_data_recovers_the_optimal_policy():
    pi_ref, r, pi_star, beta = tabular_problem(10)
    fit = fit_tabular_dpo(pi_ref, preference_probabilities(pi_ref, r), beta)
    assert (pi_ref - pi_star).abs().max() > 0.1  # there is somewhere to go
    assert (fit - pi_star).abs().max() < 1e-10


def test_dpo_on_finite_bt_data_approaches_the_optimal_policy_as_data_grows():
    pi_ref, r, pi_star, beta = tabular_problem(11)
    probs = preference_probabilities(pi_ref, r)

    def error(n, seed):
        return (
            (fit_tabular_dpo(pi_ref, preference_counts(probs, n, seed), beta) - pi_star)
            .abs()
            .max()
            .item()
        )

    small = sorted(error(1_000, s) for s in range(5))[2]  # medians of 5 data sets
    large = sorted(error(1_000_000, s) for s in range(5))[2]
    assert large < small / 10  # ≈ 1/√N: 1000× the data, ≈ 30× smaller error
    assert max(error(10_000_000, s) for s in range(3)) <= 0.01


def test_main_rejects_nonpositive_beta_and_repeats_with_one_argparse_line(capsys):
    for argv, message in (
        (["--beta", "0"], "--beta: must be > 0"),
        (["--beta", "nan"], "not a finite number"),
        (["--repeats", "0"], "--repeats: must be at least 1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and message in err[-1], (argv, err)


def test_dpo_loss_and_response_logprobs_refuse_bad_beta_and_shapes_with_one_line():
    lp = torch.zeros(3, **F64)
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0") as err:
            dpo_loss(lp, lp, lp, lp, beta)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match="do not broadcast") as err:
        dpo_loss(lp, torch.zeros(4, **F64), lp, lp, 0.1)
    assert len(str(err.value).splitlines()) == 1
    logits, ids, mask = (
        torch.zeros(1, 4, 8),
        torch.zeros(1, 4, dtype=torch.long),
        torch.zeros(1, 4, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="shapes disagree"):
        response_logprobs(logits[0], ids, mask)  # (T, V) logits, no batch axis
    with pytest.raises(ValueError, match="torch.long"):
        response_logprobs(logits, ids.float(), mask)


def test_prompt_response_rows_mark_prompt_response_and_padding_by_hand():
    ids, attn, resp = prompt_response_rows([tokens(5, 6), [7]], [[8], tokens(9, 10, 11)], pad_id=63)
    assert ids.tolist() == [[5, 6, 8, 63], [7, 9, 10, 11]]
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert resp.tolist() == [[False, False, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_response_rows([[]], [[1]])
