"""Bradley–Terry as a sigmoid of the reward gap and the reward model's loss (report eqs. (17)–(26)):
the NLL, its gradient, reward normalisation, and the maximum-likelihood fit of tabular rewards.
"""

import torch
import torch.nn.functional as F

from chapters.ch1_preference_models.probabilities import as_tensor
from chapters.common.lbfgs import lbfgs_minimise

# ------------------------------------------------------- eqs. (17)–(23): BT as a sigmoid of the gap


def sigmoid(z) -> torch.Tensor:
    """Report eq. (22): σ(z) = 1 / (1 + exp(−z)), written out (torch.sigmoid is its stable twin)."""
    return 1 / (1 + torch.exp(-as_tensor(z)))


def bt_sigmoid_steps(r1, r2) -> dict:
    """Report eqs. (17)–(23), each line as printed, from BT's ratio of exponentials to σ of the
    reward gap.

    Returns {"(17)": p, "(18)": p, "(19)": p, "(20)": (left side, right side), "(21)": p, "(23)":
    p}, computed literally (plain exp), so use moderate rewards; eq. (22) is `sigmoid`.
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


# ------------------------------------------------------------- eqs. (24)–(26): the reward-model NLL


def preference_likelihood(p_w_over_l) -> torch.Tensor:
    """Report eq. (24): Π_{(x, y_w, y_l) ∈ D} p_φ(y_w ≻ y_l | x), the quantity maximised over φ.

    p_w_over_l (N,) holds p_φ(y_w ≻ y_l | x) for each comparison. Underflows for large N: use eq.
    (25).
    """
    return as_tensor(p_w_over_l).prod(-1)


def preference_nll(p_w_over_l) -> torch.Tensor:
    """Report eq. (25): L_R = −E_{(x, y_w, y_l) ∼ D} log p(y_w ≻ y_l | x), the mean over the
    comparisons."""
    return -as_tensor(p_w_over_l).log().mean(-1)


def reward_model_loss(r_w, r_l) -> torch.Tensor:
    """Report eq. (26): L_R(r_φ, D) = −E_{(x, y_w, y_l) ∼ D} log σ(r_φ(x, y_w) − r_φ(x, y_l)).

    r_w, r_l (N,): rewards of the preferred and the dispreferred response. Returns the mean, a
    scalar.
    """
    return -F.logsigmoid(as_tensor(r_w) - as_tensor(r_l)).mean()


def reward_model_loss_grad(r_w, r_l) -> tuple:
    """Report eq. (26), its gradient: ∂L_R/∂r_φ(x, y_w) = −σ(r_l − r_w)/N and ∂L_R/∂r_φ(x, y_l) =
    +σ(r_l − r_w)/N.

    Descent raises r_φ(x, y_w) and lowers r_φ(x, y_l), more strongly the more the model misorders
    them.
    """
    r_w, r_l = as_tensor(r_w), as_tensor(r_l)
    weight = torch.sigmoid(r_l - r_w) / r_w.shape[-1]  # (N,)
    return -weight, weight


def normalize_rewards(rewards, prompt_index=None) -> torch.Tensor:
    """Report §3.3: shift rewards so that E_{y}[r_φ(x, y)] = 0 for every prompt x (BT probabilities
    don't change).

    With `prompt_index` (N,) (the prompt of each of the N rewards), rewards (N,) are centred per
    prompt. Without it, rewards (..., Y) are a table of Y responses per prompt, centred over the
    last axis.
    """
    rewards = as_tensor(rewards)
    if prompt_index is None:
        return rewards - rewards.mean(-1, keepdim=True)
    prompt_index = torch.as_tensor(prompt_index, dtype=torch.long)
    if prompt_index.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and prompt_index {tuple(prompt_index.shape)} must "
            f"both be (N,)"
        )
    n = int(prompt_index.max()) + 1
    sums = torch.zeros(n, dtype=rewards.dtype).index_add_(0, prompt_index, rewards)  # (P,)
    counts = torch.zeros(n, dtype=rewards.dtype).index_add_(
        0, prompt_index, torch.ones_like(rewards)
    )  # (P,)
    return rewards - (sums / counts.clamp(min=1))[prompt_index]


# ---------------------------------------------------------- maximum likelihood on synthetic BT data


def sample_bt_comparisons(true_rewards, num_per_prompt: int, generator=None):
    """Comparisons drawn from eq. (23): for each prompt, `num_per_prompt` pairs of distinct
    responses, the winner drawn with probability σ(r*(x, y1) − r*(x, y2)).

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
    """Report eqs. (24)–(26): the maximum-likelihood table r_φ(x, y) from comparisons, by L-BFGS on
    eq. (26).

    Returns rewards (P, Y) in float64, centred per prompt (the likelihood cannot see a per-prompt
    constant). A ridge `l2`·Σ r²/2, weighing as much as a single comparison, keeps the estimate
    finite when some response never loses (then the plain MLE is at infinity); its pull fades as 1/N
    with N comparisons.
    """
    theta = torch.zeros(shape, dtype=torch.float64, requires_grad=True)

    def loss():
        nll = reward_model_loss(theta[prompt, winner], theta[prompt, loser])  # eq. (26), a mean
        return nll + l2 / 2 * theta.pow(2).sum() / len(prompt)

    lbfgs_minimise([theta], loss, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14)
    return normalize_rewards(theta.detach())


def centred_rmse(estimate, truth) -> float:
    """Root-mean-square error between two (P, Y) reward tables after centring each prompt (§3.3)."""
    return (normalize_rewards(estimate) - normalize_rewards(truth)).pow(2).mean().sqrt().item()
