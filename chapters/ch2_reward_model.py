"""Chapter 2 (report §3.3; eqs. (17)–(26)): Bradley–Terry as a sigmoid, the reward-model NLL, a GPT-2 reward model.

    python3 -m chapters.ch2_reward_model

The GPT-2 reward model this chapter trains (`RewardModel`, `train_reward_model`, `PreferencePairs`) lives in
`chapters.reward_model`, which later chapters (the frontier, the DPO family) also use.
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import gpt
from chapters import one_thread, plotting
from chapters.ch1_preference_models import as_tensor, bradley_terry
from gpt.cli import positive_int, run


# ---------------------------------------------------------------- eqs. (17)–(23): BT as a sigmoid of the gap

def sigmoid(z) -> torch.Tensor:
    """Report eq. (22): σ(z) = 1 / (1 + exp(−z)), written out (torch.sigmoid is its stable twin)."""
    return 1 / (1 + torch.exp(-as_tensor(z)))


def bt_sigmoid_steps(r1, r2) -> dict:
    """Report eqs. (17)–(23), each line as printed, from BT's ratio of exponentials to σ of the reward gap.

    Returns {"(17)": p, "(18)": p, "(19)": p, "(20)": (left side, right side), "(21)": p, "(23)": p},
    computed literally (plain exp), so use moderate rewards; eq. (22) is `sigmoid`.
    """
    r1, r2 = as_tensor(r1), as_tensor(r2)
    e1, e2 = r1.exp(), r2.exp()
    return {
        "(17)": e1 / (e1 + e2),
        "(18)": e1 / (e1 * (1 + e2 / e1)),  # e^{r1} factored out of the denominator
        "(19)": 1 / (1 + e2 / e1),  # e^{r1} cancelled
        "(20)": (e2 / e1, torch.exp(r2 - r1)),  # e^{r2} / e^{r1} = e^{r2 − r1}
        "(21)": 1 / (1 + torch.exp(r2 - r1)),
        "(23)": sigmoid(r1 - r2),  # eq. (21) is eq. (22) at z = r1 − r2
    }


def bt_probability(r1, r2) -> torch.Tensor:
    """Report eq. (23): p*(y1 ≻ y2 | x) = σ(r*(x, y1) − r*(x, y2)); stable for any reward scale."""
    return torch.sigmoid(as_tensor(r1) - as_tensor(r2))


# ---------------------------------------------------------------- eqs. (24)–(26): the reward-model NLL

def preference_likelihood(p_w_over_l) -> torch.Tensor:
    """Report eq. (24): Π_{(x, y_w, y_l) ∈ D} p_φ(y_w ≻ y_l | x), the quantity maximised over φ.

    p_w_over_l (N,) holds p_φ(y_w ≻ y_l | x) for each comparison. Underflows for large N: use eq. (25).
    """
    return as_tensor(p_w_over_l).prod(-1)


def preference_nll(p_w_over_l) -> torch.Tensor:
    """Report eq. (25): L_R = −E_{(x, y_w, y_l) ∼ D} log p(y_w ≻ y_l | x), the mean over the comparisons."""
    return -as_tensor(p_w_over_l).log().mean(-1)


def reward_model_loss(r_w, r_l) -> torch.Tensor:
    """Report eq. (26): L_R(r_φ, D) = −E_{(x, y_w, y_l) ∼ D} log σ(r_φ(x, y_w) − r_φ(x, y_l)).

    r_w, r_l (N,): rewards of the preferred and the dispreferred response. Returns the mean, a scalar.
    """
    return -F.logsigmoid(as_tensor(r_w) - as_tensor(r_l)).mean()


def reward_model_loss_grad(r_w, r_l) -> tuple:
    """Report eq. (26), its gradient: ∂L_R/∂r_φ(x, y_w) = −σ(r_l − r_w)/N and ∂L_R/∂r_φ(x, y_l) = +σ(r_l − r_w)/N.

    Descent raises r_φ(x, y_w) and lowers r_φ(x, y_l), more strongly the more the model misorders them.
    """
    r_w, r_l = as_tensor(r_w), as_tensor(r_l)
    weight = torch.sigmoid(r_l - r_w) / r_w.shape[-1]  # (N,)
    return -weight, weight


def normalize_rewards(rewards, prompt_index=None) -> torch.Tensor:
    """Report §3.3: shift rewards so that E_{y}[r_φ(x, y)] = 0 for every prompt x (BT probabilities don't change).

    With `prompt_index` (N,) (the prompt of each of the N rewards), rewards (N,) are centred per prompt.
    Without it, rewards (..., Y) are a table of Y responses per prompt, centred over the last axis.
    """
    rewards = as_tensor(rewards)
    if prompt_index is None:
        return rewards - rewards.mean(-1, keepdim=True)
    prompt_index = torch.as_tensor(prompt_index, dtype=torch.long)
    if prompt_index.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and prompt_index {tuple(prompt_index.shape)} must both be (N,)")
    n = int(prompt_index.max()) + 1
    sums = torch.zeros(n, dtype=rewards.dtype).index_add_(0, prompt_index, rewards)  # (P,)
    counts = torch.zeros(n, dtype=rewards.dtype).index_add_(0, prompt_index, torch.ones_like(rewards))  # (P,)
    return rewards - (sums / counts.clamp(min=1))[prompt_index]


# ---------------------------------------------------------------- maximum likelihood on synthetic BT data

def sample_bt_comparisons(true_rewards, num_per_prompt: int, generator=None):
    """Comparisons drawn from eq. (23): for each prompt, `num_per_prompt` pairs of distinct responses,
    the winner drawn with probability σ(r*(x, y1) − r*(x, y2)).

    true_rewards (P, Y) -> (prompt, winner, loser), three (P·num_per_prompt,) long tensors.
    """
    true_rewards = as_tensor(true_rewards)
    P, Y = true_rewards.shape
    if Y < 2:
        raise ValueError("need at least 2 responses per prompt to compare")
    prompt = torch.arange(P).repeat_interleave(num_per_prompt)  # (N,)
    a = torch.randint(0, Y, prompt.shape, generator=generator)
    b = (a + torch.randint(1, Y, prompt.shape, generator=generator)) % Y  # a different response
    p_a_wins = bt_probability(true_rewards[prompt, a], true_rewards[prompt, b])  # (N,)
    a_wins = torch.rand(prompt.shape, generator=generator, dtype=p_a_wins.dtype) < p_a_wins
    return prompt, torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def fit_bt_rewards(prompt, winner, loser, shape, l2: float = 1.0) -> torch.Tensor:
    """Report eqs. (24)–(26): the maximum-likelihood table r_φ(x, y) from comparisons, by L-BFGS on eq. (26).

    Returns rewards (P, Y) in float64, centred per prompt (the likelihood cannot see a per-prompt constant).
    A ridge `l2`·Σ r²/2, weighing as much as a single comparison, keeps the estimate finite when some
    response never loses (then the plain MLE is at infinity); its pull fades as 1/N with N comparisons.
    """
    theta = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = reward_model_loss(theta[prompt, winner], theta[prompt, loser])  # eq. (26), a mean over N
        loss = nll + l2 / 2 * theta.pow(2).sum() / len(prompt)
        loss.backward()
        return loss

    opt.step(closure)
    return normalize_rewards(theta.detach())


def centred_rmse(estimate, truth) -> float:
    """Root-mean-square error between two (P, Y) reward tables after centring each prompt (§3.3)."""
    return (normalize_rewards(estimate) - normalize_rewards(truth)).pow(2).mean().sqrt().item()


# ---------------------------------------------------------------- the script

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m chapters.ch2_reward_model", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--rm-steps", type=positive_int, default=None,
                        help="training steps of the GPT-2 reward model (default 400, 100 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer data sizes and training steps (a few seconds)")
    args = parser.parse_args(argv)
    args.rm_steps = args.rm_steps if args.rm_steps is not None else (100 if args.quick else 400)
    plotting.check_writable()
    with one_thread():  # tiny matrices: one thread is faster than several, and leaves cores to others
        _run(args)


def _run(args):
    # the reward model's training builds on this chapter's eq. (26), so it is imported here, when the script runs
    from chapters.reward_model import RewardModel, count_task_pairs, pair_accuracy, pair_rewards, train_reward_model

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    f64 = torch.float64

    print("eqs. (17)–(23): Bradley–Terry rewritten as a sigmoid of the reward gap")
    r1, r2 = torch.randn(1000, generator=gen, dtype=f64) * 3, torch.randn(1000, generator=gen, dtype=f64) * 3
    steps = bt_sigmoid_steps(r1, r2)
    ref = bradley_terry(r1, r2)  # chapter 1's eq. (16)
    for eq in ("(17)", "(18)", "(19)", "(21)", "(23)"):
        print(f"  eq. {eq} vs chapter 1's eq. (16), 1000 random pairs: max |Δ| = {(steps[eq] - ref).abs().max():.1e}")
    print(f"  eq. (20): max |e^r2 / e^r1 − e^(r2 − r1)| / e^(r2 − r1) = "
          f"{((steps['(20)'][0] - steps['(20)'][1]) / steps['(20)'][1]).abs().max():.1e}")
    print(f"  eq. (22) written out vs torch.sigmoid on [−30, 30]: max |Δ| = "
          f"{(sigmoid(torch.linspace(-30, 30, 601, dtype=f64)) - torch.sigmoid(torch.linspace(-30, 30, 601, dtype=f64))).abs().max():.1e}")
    print(f"  r1 − r2 = 800: eq. (17) literally = {bt_sigmoid_steps(800.0, 0.0)['(17)']:.3f} (e^800 overflows), "
          f"eq. (23) = {bt_probability(800.0, 0.0):.3f}")

    print("eqs. (24)–(26): the reward-model negative log-likelihood")
    r_w, r_l = torch.randn(50, generator=gen, dtype=f64), torch.randn(50, generator=gen, dtype=f64)
    p = bt_probability(r_w, r_l)
    print(f"  −log eq. (24) / N = {-preference_likelihood(p).log() / 50:.12f}, eq. (25) = {preference_nll(p):.12f}, "
          f"eq. (26) = {reward_model_loss(r_w, r_l):.12f}")
    rw, rl = r_w.clone().requires_grad_(True), r_l.clone().requires_grad_(True)
    reward_model_loss(rw, rl).backward()
    gw, gl = reward_model_loss_grad(r_w, r_l)
    print(f"  gradient of eq. (26): autograd vs closed form ∓σ(r_l − r_w)/N, max |Δ| = "
          f"{max((rw.grad - gw).abs().max(), (rl.grad - gl).abs().max()):.1e}")
    print(f"  descent direction: −∂L/∂r(y_w) > 0 for all {int((-gw > 0).sum())}/50 pairs, −∂L/∂r(y_l) < 0 for "
          f"{int((-gl < 0).sum())}/50: training raises p(y_w ≻ y_l), the probability of y_w (the report's §3.3 says y_l)")
    table = torch.randn(3, 5, generator=gen, dtype=f64) + torch.tensor([[5.0], [-2.0], [0.0]], dtype=f64)
    centred = normalize_rewards(table)
    print(f"  normalisation E_y[r_φ(x, y)] = 0: per-prompt means {[round(m, 2) for m in table.mean(-1).tolist()]} → max |mean| = "
          f"{centred.mean(-1).abs().max():.1e}; BT probabilities change by max "
          f"{(bt_probability(centred[:, :1], centred) - bt_probability(table[:, :1], table)).abs().max():.1e}")

    print("maximum likelihood on synthetic BT data recovers r* up to a per-prompt constant")
    P, Y = 20, 6
    true = torch.randn(P, Y, generator=gen, dtype=f64) + 3 * torch.randn(P, 1, generator=gen, dtype=f64)
    sizes = [25, 100, 400] if args.quick else [25, 50, 100, 200, 400, 800, 1600, 3200]
    repeats = 1 if args.quick else 3
    errors = np.zeros((len(sizes), repeats))
    for i, n in enumerate(tqdm(sizes, desc="MLE", leave=False)):
        for rep in range(repeats):
            fit = fit_bt_rewards(*sample_bt_comparisons(true, n, gen), true.shape)
            errors[i, rep] = centred_rmse(fit, true)
    slope = np.polyfit(np.log(sizes), np.log(errors.mean(1)), 1)[0]
    for n, e in zip(sizes, errors.mean(1)):
        print(f"  {n:5d} comparisons per prompt ({P} prompts × {Y} responses): centred RMSE = {e:.3f}")
    print(f"  log-log slope of error vs data = {slope:.2f} (a consistent estimator: −0.5)")

    print("a GPT-2 reward model (tiny config) trained with eq. (26); true reward = count of token 7 in the response")
    train, _, _ = count_task_pairs(1000 if args.quick else 4000, gen)
    test, t_w, t_l = count_task_pairs(1000, gen)
    config = gpt.GPTConfig.tiny(vocab_size=16, n_positions=32)
    rm = RewardModel(gpt.GPT(config))
    before = pair_accuracy(rm, test)
    losses = train_reward_model(rm, train, steps=args.rm_steps, batch_size=64, lr=3e-3, generator=gen)
    distinct = t_w != t_l
    with torch.no_grad():
        s_w, s_l = pair_rewards(rm, test)
    truth_acc = ((s_w > s_l) == (t_w > t_l))[distinct].double().mean().item()
    truth_agrees = ((t_w > t_l).double() + 0.5 * (t_w == t_l).double()).mean().item()  # ties: a coin flip
    print(f"  {sum(q.numel() for q in rm.parameters())} parameters, {args.rm_steps} steps of batch 64: "
          f"loss {losses[0]:.3f} at step 1 → {np.mean(losses[-20:]):.3f} (mean of the last 20 steps)")
    floor = reward_model_loss(t_w.double(), t_l.double()).item()
    print(f"  eq. (26) on held-out pairs: r_φ {reward_model_loss(s_w, s_l):.3f}; the true r* itself scores {floor:.3f} "
          f"(with noisy BT labels the expected loss is lowest at r*)")
    print(f"  held-out pairs agreeing with their sampled label: {before:.3f} before, {pair_accuracy(rm, test):.3f} "
          f"after training; r* itself agrees with {truth_agrees:.3f} (labels are BT-noisy)")
    print(f"  held-out pairs with distinct true rewards ({int(distinct.sum())}), ordered as r*: {truth_acc:.3f}")
    rs = torch.cat([s_w, s_l]).numpy()
    ts = torch.cat([t_w, t_l]).numpy()
    print(f"  correlation of r_φ with r* over held-out responses: {np.corrcoef(rs, ts)[0, 1]:.3f}; slope of r_φ on r* = "
          f"{np.polyfit(ts, rs, 1)[0]:.2f} (BT labels fix the reward's scale: the labels were drawn with slope 1)")

    fig, ax = plotting.plt.subplots(figsize=(6, 4.2))
    ax.loglog(sizes, errors.mean(1), "o-", lw=2, label=f"MLE (eq. (26)), mean of {repeats} data sets")
    ax.fill_between(sizes, errors.min(1), errors.max(1), alpha=0.25, label="min–max over data sets")
    ax.loglog(sizes, errors.mean(1)[0] * np.sqrt(sizes[0] / np.array(sizes)), "k--", label="∝ 1/√n")
    ax.set(xlabel="comparisons per prompt n", ylabel="RMSE of centred rewards vs r*",
           title=f"BT maximum likelihood recovers r* up to a per-prompt constant\n"
                 f"({P} prompts × {Y} responses; fitted slope {slope:.2f})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    plotting.save(fig, "ch2_mle_recovery" + ("_quick" if args.quick else ""))  # --quick never overwrites the committed figure

    fig, axes = plotting.plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(losses, alpha=0.35, label="minibatch loss")
    window = min(20, len(losses))
    ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, mode="valid"), lw=2,
            label=f"moving average ({window} steps)")
    ax.axhline(math.log(2), color="gray", ls=":", label="log 2 (no preference)")
    ax.axhline(floor, color="k", ls="--", label="r* itself, held-out pairs")
    ax.set(xlabel="step", ylabel="eq. (26) loss", title="Training the GPT-2 reward model on eq. (26)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    counts = np.arange(ts.max() + 1)
    ax.boxplot([rs[ts == c] for c in counts], positions=counts, widths=0.6)
    ax.set(xlabel="true reward r*(x, y) = count of token 7", ylabel="learned reward r_φ(x, y)",
           title=f"Held-out responses: r_φ orders {truth_acc:.1%} of pairs as r*")
    ax.grid(alpha=0.3)
    plotting.save(fig, "ch2_reward_model" + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    run(main)
