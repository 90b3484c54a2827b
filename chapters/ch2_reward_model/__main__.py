"""Chapter 2 (report §3.3; eqs. (17)–(26)): Bradley–Terry as a sigmoid, the reward-model NLL, a
GPT-2 reward model.

    python3 -m chapters.ch2_reward_model

The GPT-2 reward model this chapter trains (`RewardModel`, `train_reward_model`, `PreferencePairs`)
lives in `chapters.ch2_reward_model.reward_head`, which later chapters (the frontier, the DPO
family) also use.
"""

import argparse
import math

import numpy as np
import torch
from tqdm import tqdm

import gpt
from chapters.ch1_preference_models.probabilities import bradley_terry
from chapters.ch2_reward_model.bradley_terry import (
    bt_probability,
    bt_sigmoid_steps,
    centred_rmse,
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
    RewardModel,
    count_task_pairs,
    pair_accuracy,
    pair_rewards,
    train_reward_model,
)
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from chapters.common.runtime import one_thread
from gpt.cli import nonnegative_int, positive_int, run, summary

# ---------------------------------------------------------------- the script


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--rm-steps",
        type=positive_int,
        default=None,
        help="training steps of the GPT-2 reward model (default 400, 100 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer data sizes and training steps (a few seconds)"
    )
    args = parser.parse_args(argv)
    args.rm_steps = args.rm_steps if args.rm_steps is not None else (100 if args.quick else 400)
    check_writable()
    with (
        one_thread()
    ):  # tiny matrices: one thread is faster than several, and leaves cores to others
        _run(args)


def _run(args):
    # the reward model's training builds on this chapter's eq. (26), so it is imported here, when
    # the script runs

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    f64 = torch.float64

    print("eqs. (17)–(23): Bradley–Terry rewritten as a sigmoid of the reward gap")
    r1, r2 = (
        torch.randn(1000, generator=gen, dtype=f64) * 3,
        torch.randn(1000, generator=gen, dtype=f64) * 3,
    )
    steps = bt_sigmoid_steps(r1, r2)
    ref = bradley_terry(r1, r2)  # chapter 1's eq. (16)
    for eq in ("(17)", "(18)", "(19)", "(21)", "(23)"):
        print(
            f"  eq. {eq} vs chapter 1's eq. (16), 1000 random pairs: max |Δ| = "
            f"{(steps[eq] - ref).abs().max():.1e}"
        )
    print(
        f"  eq. (20): max |e^r2 / e^r1 − e^(r2 − r1)| / e^(r2 − r1) = "
        f"{((steps['(20)'][0] - steps['(20)'][1]) / steps['(20)'][1]).abs().max():.1e}"
    )
    grid = torch.linspace(-30, 30, 601, dtype=f64)
    print(
        f"  eq. (22) written out vs torch.sigmoid on [−30, 30]: max |Δ| = "
        f"{(sigmoid(grid) - torch.sigmoid(grid)).abs().max():.1e}"
    )
    print(
        f"  r1 − r2 = 800: eq. (17) literally = {bt_sigmoid_steps(800.0, 0.0)['(17)']:.3f} (e^800 "
        f"overflows), eq. (23) = {bt_probability(800.0, 0.0):.3f}"
    )

    print("eqs. (24)–(26): the reward-model negative log-likelihood")
    r_w, r_l = torch.randn(50, generator=gen, dtype=f64), torch.randn(50, generator=gen, dtype=f64)
    p = bt_probability(r_w, r_l)
    print(
        f"  −log eq. (24) / N = {-preference_likelihood(p).log() / 50:.12f}, eq. (25) = "
        f"{preference_nll(p):.12f}, eq. (26) = {reward_model_loss(r_w, r_l):.12f}"
    )
    rw, rl = r_w.clone().requires_grad_(True), r_l.clone().requires_grad_(True)
    reward_model_loss(rw, rl).backward()
    gw, gl = reward_model_loss_grad(r_w, r_l)
    print(
        f"  gradient of eq. (26): autograd vs closed form ∓σ(r_l − r_w)/N, max |Δ| = "
        f"{max((rw.grad - gw).abs().max(), (rl.grad - gl).abs().max()):.1e}"
    )
    print(
        f"  descent direction: −∂L/∂r(y_w) > 0 for all {int((-gw > 0).sum())}/50 pairs, "
        f"−∂L/∂r(y_l) < 0 for "
        f"{int((-gl < 0).sum())}/50: training raises p(y_w ≻ y_l), the probability of y_w (the "
        f"report's §3.3 says y_l)"
    )
    table = torch.randn(3, 5, generator=gen, dtype=f64) + torch.tensor(
        [[5.0], [-2.0], [0.0]], dtype=f64
    )
    centred = normalize_rewards(table)
    change = bt_probability(centred[:, :1], centred) - bt_probability(table[:, :1], table)
    print(
        f"  normalisation E_y[r_φ(x, y)] = 0: per-prompt means "
        f"{[round(m, 2) for m in table.mean(-1).tolist()]} → max |mean| = "
        f"{centred.mean(-1).abs().max():.1e}; BT probabilities change by max "
        f"{change.abs().max():.1e}"
    )

    print("maximum likelihood on synthetic BT data recovers r* up to a per-prompt constant")
    P, Y = 20, 6
    true = torch.randn(P, Y, generator=gen, dtype=f64) + 3 * torch.randn(
        P, 1, generator=gen, dtype=f64
    )
    sizes = [25, 100, 400] if args.quick else [25, 50, 100, 200, 400, 800, 1600, 3200]
    repeats = 1 if args.quick else 3
    errors = np.zeros((len(sizes), repeats))
    for i, n in enumerate(tqdm(sizes, desc="MLE", leave=False)):
        for rep in range(repeats):
            fit = fit_bt_rewards(*sample_bt_comparisons(true, n, gen), true.shape)
            errors[i, rep] = centred_rmse(fit, true)
    slope = np.polyfit(np.log(sizes), np.log(errors.mean(1)), 1)[0]
    for n, e in zip(sizes, errors.mean(1)):
        print(
            f"  {n:5d} comparisons per prompt ({P} prompts × {Y} responses): centred RMSE = {e:.3f}"
        )
    print(f"  log-log slope of error vs data = {slope:.2f} (a consistent estimator: −0.5)")

    print(
        "a GPT-2 reward model (tiny config) trained with eq. (26); true reward = count of token 7 "
        "in the response"
    )
    train, _, _ = count_task_pairs(1000 if args.quick else 4000, gen)
    test, t_w, t_l = count_task_pairs(1000, gen)
    config = gpt.GPTConfig.tiny(vocab_size=16, n_positions=32)
    rm = RewardModel(gpt.GPT(config))
    before = pair_accuracy(rm, test)
    losses = train_reward_model(
        rm, train, steps=args.rm_steps, batch_size=64, lr=3e-3, generator=gen
    )
    distinct = t_w != t_l
    with torch.no_grad():
        s_w, s_l = pair_rewards(rm, test)
    truth_acc = ((s_w > s_l) == (t_w > t_l))[distinct].double().mean().item()
    truth_agrees = (
        ((t_w > t_l).double() + 0.5 * (t_w == t_l).double()).mean().item()
    )  # ties: a coin flip
    print(
        f"  {sum(q.numel() for q in rm.parameters())} parameters, {args.rm_steps} steps of batch "
        f"64: "
        f"loss {losses[0]:.3f} at step 1 → {np.mean(losses[-20:]):.3f} (mean of the last 20 steps)"
    )
    floor = reward_model_loss(t_w.double(), t_l.double()).item()
    print(
        f"  eq. (26) on held-out pairs: r_φ {reward_model_loss(s_w, s_l):.3f}; the true r* itself "
        f"scores {floor:.3f} (with noisy BT labels the expected loss is lowest at r*)"
    )
    print(
        f"  held-out pairs agreeing with their sampled label: {before:.3f} before, "
        f"{pair_accuracy(rm, test):.3f} "
        f"after training; r* itself agrees with {truth_agrees:.3f} (labels are BT-noisy)"
    )
    print(
        f"  held-out pairs with distinct true rewards ({int(distinct.sum())}), ordered as r*: "
        f"{truth_acc:.3f}"
    )
    rs = torch.cat([s_w, s_l]).numpy()
    ts = torch.cat([t_w, t_l]).numpy()
    print(
        f"  correlation of r_φ with r* over held-out responses: {np.corrcoef(rs, ts)[0, 1]:.3f}; "
        f"slope of r_φ on r* = "
        f"{np.polyfit(ts, rs, 1)[0]:.2f} (BT labels fix the reward's scale: the labels were drawn "
        f"with slope 1)"
    )

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(sizes, errors.mean(1), "o-", lw=2,
              label=f"MLE (eq. (26)), mean of {repeats} data sets")
    ax.fill_between(sizes, errors.min(1), errors.max(1), alpha=0.25, label="min–max over data sets")
    ax.loglog(sizes, errors.mean(1)[0] * np.sqrt(sizes[0] / np.array(sizes)), "k--", label="∝ 1/√n")
    ax.set(xlabel="comparisons per prompt n", ylabel="RMSE of centred rewards vs r*",
           title=f"BT maximum likelihood recovers r* up to a per-prompt constant\n"
           f"({P} prompts × {Y} responses; fitted slope {slope:.2f})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    # --quick never overwrites the committed figure
    save(fig, "ch2_mle_recovery" + ("_quick" if args.quick else ""))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(losses, alpha=0.35, label="minibatch loss")
    window = min(20, len(losses))
    ax.plot(np.arange(window - 1, len(losses)),
            np.convolve(losses, np.ones(window) / window, mode="valid"), lw=2,
            label=f"moving average ({window} steps)")
    ax.axhline(math.log(2), color="gray", ls=":", label="log 2 (no preference)")
    ax.axhline(floor, color="k", ls="--", label="r* itself, held-out pairs")
    ax.set(xlabel="step", ylabel="eq. (26) loss",
           title="Training the GPT-2 reward model on eq. (26)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    counts = np.arange(ts.max() + 1)
    ax.boxplot([rs[ts == c] for c in counts], positions=counts, widths=0.6)
    ax.set(xlabel="true reward r*(x, y) = count of token 7", ylabel="learned reward r_φ(x, y)",
           title=f"Held-out responses: r_φ orders {truth_acc:.1%} of pairs as r*")
    ax.grid(alpha=0.3)
    save(fig, "ch2_reward_model" + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    run(main)
