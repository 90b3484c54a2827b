"""Chapter 7: exact evaluation by enumeration, the exact reward–KL frontier and a point's distance
to it (efficiency), Best-of-N, and the --quick run."""

import copy
import csv
import itertools
import math
from functools import partial

import numpy as np
import pytest
import torch

from chapters.ch3_kl_optimum.optimum import log_partition_function
from chapters.ch7_frontier import task
from chapters.ch7_frontier.__main__ import main
from chapters.ch7_frontier.methods import best_of_n_logprobs, dpo_batch_loss, unlikelihood_loss
from chapters.ch7_frontier.rlhf import learn_reward_model, ppo_checkpoints
from chapters.ch7_frontier.sweeps import Sweep, SweepPool, reward_model_state, sampled_rows
from chapters.training import finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see chapters.common.one_thread


def perturbed_pair(seed=0, scale=0.3):
    """A random reference and a policy whose weights are the reference's plus noise: two different
    distributions."""
    ref = task.new_model(seed).eval()
    policy = task.new_model(seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p += scale * torch.randn(p.shape, generator=g)
    return policy, ref


def random_problem(prompts=3, responses=40, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(
        spread * torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1
    )
    rewards = torch.randn(prompts, responses, generator=g, dtype=torch.float64)
    return logp_ref, rewards


def test_true_reward_counts_sentiment_and_doubles_echoes_of_the_prompt():
    # prompt (0, 5); response (0, 1, 2, 4, 0): +2 (echo of 0), +1, −1, 0, +2 (echo of 0) = 4
    assert task.true_reward(torch.tensor([0, 5]), torch.tensor([0, 1, 2, 4, 0])).item() == 4.0
    # prompt (2, 3): the negative tokens it contains count −2 each; positive ones +1
    assert task.true_reward(torch.tensor([2, 3]), torch.tensor([2, 3, 0, 6, 7])).item() == -3.0


def test_process_logprobs_are_the_markov_chain_by_hand_and_sum_to_one():
    prompts = task.task_prompts(3)
    responses = task.all_responses()
    logp = task.process_logprobs(prompts, responses)  # (3, 32768)
    torch.testing.assert_close(
        logp.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    T = task.transition_matrix()
    x, y = prompts[1].tolist(), responses[12345].tolist()
    by_hand = math.log(T[x[-1], y[0]]) + sum(math.log(T[a, b]) for a, b in zip(y, y[1:]))
    assert abs(logp[1, 12345].item() - by_hand) < 1e-12


def test_prefix_tree_enumeration_equals_full_forward_passes():
    """The KV-cache tree walk gives the same log π(y|x) as feeding whole sequences (float32: |Δ| <
    1e-4)."""
    policy, _ = perturbed_pair()
    prompts = task.task_prompts(3)
    logp = task.enumerate_logprobs(policy, prompts, chunk=2)  # (3, 32768)
    torch.testing.assert_close(
        logp.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    idx = torch.randint(logp.shape[1], (200,))
    responses = task.all_responses()[idx]  # (200, 5)
    for p in range(3):
        with torch.no_grad():
            direct = task.logprob(policy, prompts[p].expand(200, -1), responses).double()
        assert (direct - logp[p, idx]).abs().max().item() < 1e-4


def test_enumerated_kl_equals_monte_carlo_estimates_within_their_standard_error():
    """Exact KL(π‖π_ref) by enumeration lies within 4 standard errors of both sampled estimators."""
    policy, ref = perturbed_pair()
    prompts = task.task_prompts(4)
    logp, logp_ref = task.enumerate_logprobs(policy, prompts), task.enumerate_logprobs(ref, prompts)
    _, kl = task.exact_reward_and_kl(logp, logp_ref, torch.zeros_like(logp))
    tok, tok_se, ratio, ratio_se = task.sampled_kl(
        policy, ref, prompts, 500, torch.Generator().manual_seed(0)
    )
    assert kl > 0.5  # the two policies really differ
    assert abs(ratio - kl) < 4 * ratio_se, (kl, ratio, ratio_se)
    assert abs(tok - kl) < 4 * tok_se, (kl, tok, tok_se)
    assert tok_se < ratio_se  # the paper's per-token sum is the lower-variance estimator


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_eq36_frontier_reward_and_kl_match_the_closed_forms_of_ch3(beta):
    """E_π*[r] − β·KL(π*‖π_ref) = β·log Z (eq. (35) at π = π*), and E_π*[r] = d log Z / d(1/β)
    (finite difference)."""
    logp_ref, rewards = random_problem()
    (reward,), (kl,) = task.exact_frontier(logp_ref, rewards, [beta])
    log_z = lambda b: log_partition_function(logp_ref.exp(), rewards, b).mean().item()  # noqa: E731
    assert abs((reward - beta * kl) - beta * log_z(beta)) < 1e-12
    h = 1e-5  # central difference in t = 1/β: error O(h²)
    d_log_z = (log_z(1 / (1 / beta + h)) - log_z(1 / (1 / beta - h))) / (2 * h)
    assert abs(reward - d_log_z) < 1e-6


def test_frontier_is_monotone_and_its_slope_is_beta():
    """Along the frontier reward and KL both grow as β shrinks, and dE[r]/dKL = β (so the curve is
    concave)."""
    logp_ref, rewards = random_problem()
    betas = np.geomspace(0.05, 20, 80)
    reward, kl = task.exact_frontier(logp_ref, rewards, betas)
    assert np.all(np.diff(reward) < 0) and np.all(np.diff(kl) < 0)
    slopes = np.diff(reward) / np.diff(kl)  # between consecutive β, so between them
    assert np.all(slopes >= betas[:-1] * (1 - 1e-6)) and np.all(slopes <= betas[1:] * (1 + 1e-6))


# a frontier by hand, its points out of order: (KL, E[r*]) = (0, 0) π_ref, (1, 1), (2, 1.5), (4, 2)
HAND_KLS, HAND_REWARDS = [2.0, 0.0, 4.0, 1.0], [1.5, 0.0, 2.0, 1.0]


@pytest.mark.parametrize(
    "kl, expected", [(0.0, 0.0), (0.5, 0.5), (1.5, 1.25), (3.0, 1.75), (4.0, 2.0), (10.0, 2.0)]
)
def test_frontier_reward_interpolates_unsorted_points_linearly_and_stays_flat_past_the_last(
    kl, expected
):
    assert task.frontier_reward(kl, HAND_REWARDS, HAND_KLS) == pytest.approx(expected, abs=1e-15)
    assert task.frontier_reward(kl, np.array(HAND_REWARDS), np.array(HAND_KLS)) == pytest.approx(
        expected, abs=1e-15
    )


@pytest.mark.parametrize(
    "reward, kl, expected",
    [
        (0.25, 0.5, 0.5),  # half the frontier's gain 0.5 at KL 0.5
        (1.75, 3.0, 1.0),  # on the frontier
        (1.0, 10.0, 0.5),  # past the frontier's last KL its gain stays 2
        (
            1.0,
            0.5,
            2.0,
        ),  # above the frontier (no policy can be): reported as it is, not clipped to 1
        (-0.5, 1.0, -0.5),  # worse than π_ref
    ],
)
def test_efficiency_is_the_share_of_the_frontiers_gain_by_hand(reward, kl, expected):
    assert task.efficiency(reward, kl, HAND_REWARDS, HAND_KLS, ref_reward=0.0) == pytest.approx(
        expected, abs=1e-15
    )


def test_efficiency_measures_gains_from_the_reference_reward_and_is_nan_at_zero_kl():
    shifted = [r - 1.0 for r in HAND_REWARDS]  # π_ref at −1: the same gains
    assert task.efficiency(-0.75, 0.5, shifted, HAND_KLS, ref_reward=-1.0) == pytest.approx(
        0.5, abs=1e-15
    )
    assert math.isnan(task.efficiency(0.0, 0.0, HAND_REWARDS, HAND_KLS, ref_reward=0.0))
    assert math.isnan(task.efficiency(0.0, 1e-4, HAND_REWARDS, HAND_KLS, ref_reward=0.0))
    with pytest.raises(ValueError, match="as many rewards as KLs"):
        task.frontier_reward(1.0, [0.0, 1.0], [0.0])


# two prompts, two responses each: π_ref(y1 | x) = p, r*(x, ·) = (a, b); E_ref[r*] = 2.4 and 0.1, so
# their mean 1.25 is not 0 and a gain measured from 0 (or from |frontier|) is wrong
BANDIT = [(0.7, 3.0, 1.0), (0.2, -0.5, 0.25)]


def bandit_optimum(beta):
    """Eq. (36) for the bandit in closed form, float64: π*_β(y1 | x) = σ((a − b)/β + logit p), then
    E[r*] and KL(π*‖π_ref) by their two-term sums, each averaged over the two prompts."""
    rewards, kls = [], []
    for p, a, b in BANDIT:
        q = 1 / (1 + math.exp(-((a - b) / beta + math.log(p / (1 - p)))))
        rewards.append(q * a + (1 - q) * b)
        kls.append(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
    return sum(rewards) / 2, sum(kls) / 2


def test_efficiency_on_a_bandit_whose_frontier_is_known_in_closed_form():
    """Chapter 7's headline number, (reward − E_ref[r*]) / (frontier(KL) − E_ref[r*]), exact to 1e-9
    where E_ref[r*] ≠ 0: at a frontier point and on the chord between two."""
    logp_ref = torch.tensor([[p, 1 - p] for p, _, _ in BANDIT], dtype=torch.float64).log()
    rewards = torch.tensor([[a, b] for _, a, b in BANDIT], dtype=torch.float64)
    betas = [0.25, 0.5, 1.0, 2.0, 4.0]
    front_rewards, front_kls = task.exact_frontier(logp_ref, rewards, betas)
    closed = [bandit_optimum(beta) for beta in betas]
    assert np.allclose(front_rewards, [r for r, _ in closed], rtol=0, atol=1e-12)
    assert np.allclose(front_kls, [kl for _, kl in closed], rtol=0, atol=1e-12)
    ref_reward = sum(p * a + (1 - p) * b for p, a, b in BANDIT) / 2  # 1.25
    assert task.exact_reward_and_kl(logp_ref, logp_ref, rewards) == pytest.approx(
        (ref_reward, 0.0), abs=1e-15
    )
    front = ([ref_reward, *front_rewards], [0.0, *front_kls])  # π_ref's point at KL 0, as ch7 adds

    # at β = 1's KL the frontier is β = 1's reward: a point with 3/10 of its gain
    (r1, kl1), (r2, kl2) = bandit_optimum(1.0), bandit_optimum(0.5)
    point = ref_reward + 0.3 * (r1 - ref_reward)
    assert task.efficiency(point, kl1, *front, ref_reward=ref_reward) == pytest.approx(
        0.3, abs=1e-9
    )
    # between β = 1 and β = 0.5 the frontier is their chord
    kl = 0.25 * kl1 + 0.75 * kl2
    chord = 0.25 * r1 + 0.75 * r2
    expected = (1.5 - ref_reward) / (chord - ref_reward)
    assert task.efficiency(1.5, kl, *front, ref_reward=ref_reward) == pytest.approx(
        expected, abs=1e-9
    )
    assert task.frontier_reward(kl, *front) == pytest.approx(chord, abs=1e-12)


def best_of_n_by_brute_force(p_ref, scores, n):
    """Enumerate every n-tuple of draws; the best score wins, ties split evenly among the tied
    draws.
    """
    out = np.zeros(len(p_ref))
    for draw in itertools.product(range(len(p_ref)), repeat=n):
        prob = np.prod([p_ref[i] for i in draw])
        top = max(scores[i] for i in draw)
        winners = [i for i in draw if scores[i] == top]
        for i in winners:
            out[i] += prob / len(winners)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_distribution_matches_brute_force_with_ties(n):
    p_ref = np.array([0.1, 0.25, 0.05, 0.3, 0.2, 0.1])
    scores = np.array([1.0, 0.0, 2.0, 1.0, 0.0, 2.0])  # three levels, two responses each
    logp = best_of_n_logprobs(torch.tensor(np.log(p_ref))[None], torch.tensor(scores)[None], n)[0]
    np.testing.assert_allclose(
        logp.exp().numpy(), best_of_n_by_brute_force(p_ref, scores, n), atol=1e-14
    )


@pytest.mark.parametrize("n", [2, 16, 256])
def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n_without_ties(n):
    """With distinct scores KL(best-of-N ‖ π_ref) = log N − (N−1)/N exactly (Stiennon et al.'s
    closed form)."""
    logp_ref, rewards = random_problem(responses=20_000, spread=0.5)  # no response holds much mass
    logp = best_of_n_logprobs(logp_ref, rewards, n)
    torch.testing.assert_close(
        logp.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    _, kl = task.exact_reward_and_kl(logp, logp_ref, rewards)
    closed_form = (
        math.log(n) - (n - 1) / n
    )  # the continuous limit; a discrete π_ref sits just below it
    assert closed_form - 1e-4 < kl <= closed_form


def test_preference_labels_follow_bradley_terry_of_the_true_reward():
    """Report eq. (23): among sampled pairs whose rewards differ by 1, the better one is chosen σ(1)
    = 73% of the time."""
    ref = task.new_model(0).eval()
    data = task.preference_pairs(
        ref, task.task_prompts(4), draws=400, k=4, generator=torch.Generator().manual_seed(0)
    )
    gap = task.true_reward(data["prompt"], data["chosen"]) - task.true_reward(
        data["prompt"], data["rejected"]
    )
    unit = gap[gap.abs() == 1]
    share = (unit > 0).double().mean().item()
    se = math.sqrt(share * (1 - share) / len(unit))
    assert abs(share - torch.sigmoid(torch.tensor(1.0)).item()) < 4 * se, (share, se, len(unit))


def test_unlikelihood_loss_by_hand():
    """Report §6.1 (ref. [19]): −log π(y_w|x) − α·Σ_t log(1 − π(y_l,t|·)), computed token by token
    with softmax."""
    policy, _ = perturbed_pair()
    x, yw, yl = (
        torch.tensor([[0, 5]]),
        torch.tensor([[1, 2, 3, 4, 5]]),
        torch.tensor([[2, 2, 6, 7, 0]]),
    )
    alpha = 0.3
    with torch.no_grad():
        loss = unlikelihood_loss(policy, dict(prompt=x, chosen=yw, rejected=yl), alpha).item()
        by_hand = 0.0
        for y, sign in ((yw, "w"), (yl, "l")):
            ids = torch.cat([x, y], 1)[0]
            for t in range(5):
                p = torch.softmax(policy(ids[None, : 2 + t])[0, -1].double(), -1)[ids[2 + t]].item()
                by_hand += -math.log(p) if sign == "w" else -alpha * math.log(1 - p)
    assert abs(loss - by_hand) < 1e-5


def test_bad_sizes_fail_with_one_line():
    with pytest.raises(ValueError, match="number of prompts must be in 1..64"):
        task.task_prompts(0)
    with pytest.raises(ValueError, match="N must be >= 1"):
        best_of_n_logprobs(*random_problem(), 0)


def trained_checkpoints(sweep, start, cfg, rm):
    """(step, policy) at each checkpoint of one sweep, trained here in this process as chapter 7 did
    before `SweepPool`."""
    ref = start["ref"]
    if sweep.loss_fn is None:
        reward_fn = (
            (lambda ids, mask, response_mask: rm(ids, mask))
            if sweep.rm_state
            else task.true_reward_fn
        )  # noqa: E731
        yield from ppo_checkpoints(
            ref, reward_fn, start["prompts"], sweep.beta, cfg["ppo_checkpoints"], sweep.seed, "PPO"
        )
        return
    policy = copy.deepcopy(ref).requires_grad_(True)
    _, saved = finetune(
        policy,
        sweep.loss_fn,
        start["data"],
        cfg["steps"],
        cfg["batch_size"],
        cfg["lr"],
        torch.Generator().manual_seed(sweep.seed),
        checkpoints=cfg["checkpoints"],
        progress=False,
    )
    for step, state in saved:
        policy.load_state_dict(state)
        yield step, policy


def serial_rows(sweeps, start, cfg, rm, generator):
    """The rows of a plain serial loop: each sweep trained, each checkpoint evaluated (`evaluate`)
    with the one generator, in order; and the last checkpoint's log π of the sweep that keeps it."""
    rows, kept = [], None
    for sweep in sweeps:
        for step, policy in trained_checkpoints(sweep, start, cfg, rm):
            logp, row = task.evaluate_checkpoint(
                policy,
                start["ref"],
                start["prompts"],
                start["logp_ref"],
                start["rewards"],
                4,
                generator,
            )
            rows.append(dict(method=sweep.method, setting=sweep.setting, step=step, **row))
        kept = logp if sweep.keep_logp else kept
    return rows, kept


def test_sweeps_on_one_or_two_processes_give_exactly_the_numbers_of_a_serial_loop():
    """SweepPool + sampled_rows, on 1 and on 2 processes: the rows of `serial_rows` bit for bit
    (exact E[r*] and KL, sampled KLs drawn in the serial order), the kept log π, and the same
    weights at every checkpoint."""
    cfg = dict(
        task.QUICK,
        prompts=1,
        sft_sequences=400,
        sft_steps=5,
        draws=2,
        steps=4,
        checkpoints=(2, 4),
        ppo_checkpoints=(1, 2),
        rm_steps=3,
    )
    start = task.reference_and_pairs(cfg, 0)
    shared = dict(
        cfg=cfg, **{k: start[k] for k in ("ref", "data", "prompts", "logp_ref", "rewards")}
    )
    rm = learn_reward_model(
        start["ref"], start["data"], cfg["rm_steps"], torch.Generator().manual_seed(1)
    )
    sweeps = [
        Sweep("DPO", "beta=1.0", 0, partial(dpo_batch_loss, beta=1.0), keep_logp=True),
        Sweep("Unlikelihood", "alpha=0.5", 1, partial(unlikelihood_loss, alpha=0.5)),
        Sweep("PPO-GT", "beta=1.0", 0, beta=1.0),
        Sweep("PPO", "beta=1.0", 0, beta=1.0, rm_state=reward_model_state(rm)),
    ]
    expected, expected_logp = serial_rows(sweeps, start, cfg, rm, torch.Generator().manual_seed(2))
    runs = {}
    for workers in (1, 2):
        with SweepPool(shared, workers) as pool:
            results = list(pool.run(sweeps))
        gen = torch.Generator().manual_seed(2)
        rows = [
            row
            for sw, res in zip(sweeps, results)
            for row in sampled_rows(sw, res, start["ref"], start["prompts"], 4, gen)
        ]
        assert rows == expected, workers
        assert (
            np.array_equal(results[0][-1].logp, expected_logp.numpy())
            and results[0][0].logp is None
        )
        runs[workers] = results
    for a, b in zip(itertools.chain(*runs[1]), itertools.chain(*runs[2])):
        assert all(
            np.array_equal(a.state[k], b.state[k]) for k in a.state
        )  # the checkpoint's weights
    assert expected[4]["reward"] != expected[6]["reward"]  # PPO on r* and on r_φ are different runs
    with pytest.raises(ValueError, match="workers must be >= 1"):
        SweepPool(shared, 0)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        out = tmp_path_factory.mktemp("ch7_plots")
        mp.setenv("DPO_PLOTS_DIR", str(out))
        torch.manual_seed(0)
        return main(["--quick"]), out


def test_quick_run_writes_the_table_and_the_figure(quick_run):
    result, out = quick_run
    assert (out / "ch7_frontier_quick.png").stat().st_size > 10_000
    with open(out / "ch7_frontier_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["rows"])
    assert {"DPO", "Preferred-FT", "Unlikelihood", "Best-of-N"} <= {r["method"] for r in rows}
    assert all(math.isfinite(float(r["reward"])) and float(r["kl"]) >= -1e-9 for r in rows)


def test_every_trained_point_lies_on_or_below_the_exact_frontier(quick_run):
    """For every β, E_π[r*] − β·KL(π‖π_ref) ≤ β·E_x log Z_β(x) (eq. (35)): no point is above the
    frontier (1e-6)."""
    result, _ = quick_run
    logp_ref, rewards = result["logp_ref"], result["rewards"]
    for beta in np.geomspace(0.02, 200, 40):
        bound = beta * log_partition_function(logp_ref.exp(), rewards, beta).mean().item()
        for r in result["rows"]:
            assert r["reward"] - beta * r["kl"] <= bound + 1e-6, (r, beta)
    assert min(r["gap"] for r in result["rows"]) > -1e-6
