"""Chapter 9 (report §7; Xu et al. 2024): Π_PPO ⊂ Π_DPO, and the mass DPO may put on responses the data never showed.

The report closes on Xu et al.: every policy PPO reaches (a reward model fitted to the preference data by
eq. (26), then the KL-regularised optimum of eq. (27) for it) also minimises the DPO loss (38), but DPO has
more minimisers, some of which put probability on responses absent from the data. Here the response space is
small enough to enumerate, so every quantity is exact: a few prompts, responses = every sequence of L tokens
from a V-token vocabulary, an autoregressive reference policy, a true reward r*, and votes on a few pairs per
prompt sampled from π_ref. Tensors over responses are (P, Y): prompts × responses, float64.

    python3 -m chapters.ch9_dpo_vs_ppo [--seed 0]
"""
import argparse
import itertools
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from chapters import one_thread
from chapters.ch2_reward_model import fit_bt_rewards, reward_model_loss
from chapters.ch3_kl_optimum import kl_divergence, optimal_policy, rlhf_token_rewards
from chapters.ch4_dpo import dpo_loss
from chapters.ch6_ppo import clipped_surrogate, masked_mean, whiten

DT = torch.float64  # the whole chapter is tabular maths


# ---------------------------------------------------------------------------------------------- the example

@dataclass
class Problem:
    """A small preference problem, enumerable: every response of every prompt is a row of a (P, Y) tensor."""
    tokens: torch.Tensor  # (Y, L) long: response y is the token sequence tokens[y]
    ref_logits: list  # the reference's autoregressive logits: [(P, V), (P, V, V), ...], one per position
    pi_ref: torch.Tensor  # (P, Y): π_ref(y|x), the product of the per-token softmaxes
    true_reward: torch.Tensor  # (P, Y): r*(x, y)
    features: torch.Tensor  # (P, Y, d): φ(x, y) = [one-hot of token 1, one-hot of token 2, ...], shared across prompts
    prompt: torch.Tensor  # (N,) long: x of each vote (x, y_w, y_l)
    chosen: torch.Tensor  # (N,) long: y_w
    rejected: torch.Tensor  # (N,) long: y_l
    beta: float

    @property
    def shape(self):
        return self.pi_ref.shape


def autoregressive_logprobs(logits: list, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log softmax(logits_t[x, y_<t])[y_t] for every response y; logits as in `Problem.ref_logits`; (P, Y)."""
    total = 0.0
    for t, step in enumerate(logits):
        logp = torch.log_softmax(step, dim=-1)  # (P, V^t..., V)
        index = (slice(None),) + tuple(tokens[:, s] for s in range(t + 1))  # pick [x, y_1, ..., y_t] for all y
        total = total + logp[index]  # (P, Y)
    return total


def make_problem(seed: int = 0, prompts: int = 3, vocab: int = 4, length: int = 2, pairs: int = 3,
                 votes: int = 10, beta: float = 0.5) -> Problem:
    """The chapter's example: random reference and true reward, `pairs` pairs per prompt drawn from π_ref, `votes` votes each.

    Votes for y1 over y2: round(votes · σ(r*(x, y1) − r*(x, y2))) (eq. (23), the expected count), kept in
    [1, votes − 1] so every pair was won both ways: then the DPO loss has a finite minimiser.
    """
    if min(prompts, vocab, length, pairs) < 1 or votes < 2 or beta <= 0:
        raise ValueError("need prompts, vocab, length, pairs >= 1, votes >= 2 and beta > 0")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # (Y, L), Y = V^L
    ref_logits = [1.5 * torch.randn((prompts,) + (vocab,) * (t + 1), generator=g, dtype=DT) for t in range(length)]
    pi_ref = autoregressive_logprobs(ref_logits, tokens).exp()  # (P, Y)
    features = torch.cat([torch.nn.functional.one_hot(tokens[:, t], vocab) for t in range(length)], -1).to(DT)
    features = features.expand(prompts, -1, -1)  # (P, Y, L·V)
    token_value = torch.randn(length * vocab, generator=g, dtype=DT)
    true_reward = features @ token_value + 0.5 * torch.randn(prompts, len(tokens), generator=g, dtype=DT)  # (P, Y)
    rows = []
    for x in range(prompts):
        for _ in range(pairs):
            while True:  # two distinct responses from π_ref
                y1, y2 = torch.multinomial(pi_ref[x], 2, replacement=True, generator=g).tolist()
                if y1 != y2:
                    break
            p = torch.sigmoid(true_reward[x, y1] - true_reward[x, y2]).item()
            wins = min(max(round(votes * p), 1), votes - 1)
            rows += [(x, y1, y2)] * wins + [(x, y2, y1)] * (votes - wins)
    prompt, chosen, rejected = torch.tensor(rows).T
    return Problem(tokens, ref_logits, pi_ref, true_reward, features, prompt, chosen, rejected, beta)


def comparison_graph(problem: Problem):
    """Per prompt: the connected components of its comparison graph (responses joined by a voted pair) and the responses in no pair.

    Returns (components, unseen): components[x] is a list of sorted lists of responses, unseen[x] a sorted list.
    """
    P, Y = problem.shape
    components, unseen = [], []
    for x in range(P):
        edges = {(a, b) for p, a, b in zip(problem.prompt.tolist(), problem.chosen.tolist(), problem.rejected.tolist())
                 if p == x}
        neighbours = {}
        for a, b in edges:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
        left, comps = set(neighbours), []
        while left:  # depth-first search from any response not yet reached
            stack, comp = [left.pop()], set()
            while stack:
                y = stack.pop()
                comp.add(y)
                stack += [z for z in neighbours[y] if z not in comp and z in left]
                left -= neighbours[y]
            comps.append(sorted(comp))
        components.append(sorted(comps))
        unseen.append(sorted(set(range(Y)) - set(neighbours)))
    return components, unseen


def unseen_mask(problem: Problem) -> torch.Tensor:
    """(P, Y) bool: True where response y never appears in a vote on prompt x."""
    _, unseen = comparison_graph(problem)
    mask = torch.zeros(problem.shape, dtype=torch.bool)
    for x, us in enumerate(unseen):
        mask[x, us] = True
    return mask


# ---------------------------------------------------------------------------------------------- the two losses

def empirical_dpo_loss(logp: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Report eq. (38) on the data: the mean over votes (x, y_w, y_l) of −log σ(β·log π/π_ref(y_w) − β·log π/π_ref(y_l)).

    logp (..., P, Y): log π(y|x) of one or more policies; returns (...).
    """
    ref = problem.pi_ref.log()
    x, w, l = problem.prompt, problem.chosen, problem.rejected
    return dpo_loss(logp[..., x, w], logp[..., x, l], ref[x, w], ref[x, l], problem.beta).mean(-1)


def data_reward_loss(rewards: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Report eq. (26) on the votes (`chapters.ch2_reward_model.reward_model_loss`) for a reward table r (P, Y)."""
    x = problem.prompt
    return reward_model_loss(rewards[x, problem.chosen], rewards[x, problem.rejected])


def fit_reward_model(problem: Problem, linear: bool = False) -> torch.Tensor:
    """Report eq. (26) minimised from r = 0: a table r(x, y) (ch2's `fit_bt_rewards`, no ridge), or r = φ(x, y)·ψ when `linear`.

    Returns r (P, Y). Started at 0, L-BFGS stays in the span of the loss's gradients: the table keeps r equal on
    every response in no pair, and ψ stays in the span of the vote differences φ(x, y_w) − φ(x, y_l).
    """
    if not linear:
        return fit_bt_rewards(problem.prompt, problem.chosen, problem.rejected, problem.shape, l2=0.0)
    psi = torch.zeros(problem.features.shape[-1], dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([psi], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = data_reward_loss(problem.features @ psi, problem)
        loss.backward()
        return loss
    opt.step(closure)
    return problem.features @ psi.detach()  # (P, Y)


# ---------------------------------------------------------------------------------------------- the minimiser set

def dpo_flat_directions(problem: Problem) -> torch.Tensor:
    """Report §7 (Xu et al. 2024), made exact: the directions of the logits θ (π = softmax θ) along which eq. (38) is constant.

    With h(x, y) = β·log π(y|x)/π_ref(y|x), eq. (38) on the data is eq. (26) at r = h: it sees h only through
    h(x, y_w) − h(x, y_l) on voted pairs. So it is unchanged by adding to θ(x, ·) any vector that is constant on
    each connected component of prompt x's comparison graph and arbitrary on responses in no pair (the
    per-prompt shift from the softmax is constant on everything, so it is one of them). Returns an orthonormal
    basis (k, P·Y) of that span V: one normalised indicator per component, one unit vector per unseen response.
    """
    P, Y = problem.shape
    components, unseen = comparison_graph(problem)
    rows = []
    for x in range(P):
        for group in components[x] + [[u] for u in unseen[x]]:
            v = torch.zeros(P, Y, dtype=DT)
            v[x, group] = 1 / math.sqrt(len(group))
            rows.append(v.flatten())
    return torch.stack(rows)  # (k, P·Y), orthonormal: disjoint supports


def dpo_minimiser(problem: Problem, rewards: torch.Tensor, direction=None) -> torch.Tensor:
    """Report eq. (36) for the reward r̂ + β·v: a member of Π_DPO when r̂ minimises eq. (26) and v (P, Y) lies in span V.

    r̂ + β·v differs from r̂ by a constant on each component and anything on unseen responses, so it minimises
    eq. (26) too; its eq. (36) policy has β·log π/π_ref = r̂ + β·v − β·log Z and so minimises eq. (38). With
    v = 0 (the default) it is π*, the KL-regularised optimum for r̂ that PPO aims at. Returns π (P, Y).
    """
    v = 0.0 if direction is None else direction
    return optimal_policy(problem.pi_ref, rewards + problem.beta * v, problem.beta)


def loglinear_flat_directions(problem: Problem) -> torch.Tensor:
    """Report §7 for π_θ ∝ π_ref·exp(θ·φ): eq. (38) sees θ only through θ·(φ(x, y_w) − φ(x, y_l)), so it is constant along
    the null space of the vote-difference matrix; returns an orthonormal basis (k, d) of it (SVD, singular values < 1e-10).
    """
    diffs = problem.features[problem.prompt, problem.chosen] - problem.features[problem.prompt, problem.rejected]  # (N, d)
    _, sing, vh = torch.linalg.svd(diffs, full_matrices=True)
    rank = int((sing > 1e-10 * sing.max()).sum())
    return vh[rank:]  # (d − rank, d)


def logit_hessian(problem: Problem, logits: torch.Tensor) -> torch.Tensor:
    """Report eq. (38), its Hessian with respect to the flat logits θ (P·Y) of π = softmax θ, at `logits` (P, Y); (P·Y, P·Y)."""
    P, Y = problem.shape

    def loss(flat):
        return empirical_dpo_loss(torch.log_softmax(flat.view(P, Y), -1), problem)
    return torch.autograd.functional.hessian(loss, logits.flatten())


def unseen_shift(problem: Problem, rewards: torch.Tensor, target: float) -> torch.Tensor:
    """The v in span V that raises the logits of each prompt's unseen responses by s_x so they carry mass `target`: (P, Y).

    Unseen mass m(s) = a·e^s / (a·e^s + b) with a, b the unseen and seen mass at s = 0, so s = log(target·b / ((1 − target)·a)).
    """
    mask = unseen_mask(problem)
    base = dpo_minimiser(problem, rewards)
    a, b = (base * mask).sum(-1), (base * ~mask).sum(-1)  # (P,)
    s = torch.log(target * b / ((1 - target) * a))  # (P,)
    return torch.where(mask, s[:, None], 0.0)


# ---------------------------------------------------------------------------------------------- policies

class Tabular:
    """π(y|x) = softmax(θ(x, ·)): one free logit per (prompt, response), started at log π_ref. No sharing."""
    name = "tabular"

    def __init__(self, problem: Problem):
        self.params = [problem.pi_ref.log().clone().requires_grad_()]

    def logp(self):
        return torch.log_softmax(self.params[0], -1)  # (P, Y)


class LogLinear:
    """π_θ(y|x) ∝ π_ref(y|x)·exp(θ·φ(x, y)), θ = 0 at the start: a parameter per (position, token), shared by every response and prompt."""
    name = "log-linear"

    def __init__(self, problem: Problem):
        self.problem = problem
        self.params = [torch.zeros(problem.features.shape[-1], dtype=DT, requires_grad=True)]

    def logp(self):
        return torch.log_softmax(self.problem.pi_ref.log() + self.problem.features @ self.params[0], -1)  # (P, Y)


class Autoregressive:
    """π(y|x) = Π_t softmax(θ_t[x, y_<t])[y_t], started at the reference's logits: a language model in miniature.

    Responses sharing a prefix share its next-token softmax, so lowering π(y_l) hands mass to y_l's siblings.
    """
    name = "autoregressive"

    def __init__(self, problem: Problem):
        self.tokens = problem.tokens
        self.params = [step.clone().requires_grad_() for step in problem.ref_logits]

    def logp(self):
        return autoregressive_logprobs(self.params, self.tokens)  # (P, Y)


POLICIES = (Tabular, LogLinear, Autoregressive)


# ---------------------------------------------------------------------------------------------- training

def measure(logp: torch.Tensor, problem: Problem, mask: torch.Tensor) -> dict:
    """Exact, by enumeration: mass on unseen responses, E_π[r*], KL(π ‖ π_ref) and eq. (38), each averaged over prompts."""
    pi = logp.exp()
    return dict(unseen=(pi * mask).sum(-1).mean().item(), true_reward=(pi * problem.true_reward).sum(-1).mean().item(),
                kl=kl_divergence(pi, problem.pi_ref).mean().item(), dpo=empirical_dpo_loss(logp, problem).item())


def train_dpo(policy, problem: Problem, steps: int, lr: float) -> list:
    """Report eq. (38) minimised by full-batch Adam over the votes, from π = π_ref; a `measure` dict at the start and after each step."""
    opt = torch.optim.Adam(policy.params, lr=lr)
    mask = unseen_mask(problem)
    history = [measure(policy.logp().detach(), problem, mask)]
    for _ in range(steps):
        opt.zero_grad()
        empirical_dpo_loss(policy.logp(), problem).backward()
        opt.step()
        history.append(measure(policy.logp().detach(), problem, mask))
    return history


def minimise_dpo_lbfgs(policy, problem: Problem):
    """Report eq. (38) minimised by L-BFGS from π = π_ref; returns the policy, trained in place.

    Like plain gradient descent its steps stay in the span of the gradients, so it lands on the minimiser gradient
    flow picks (Adam's per-parameter scaling leaves that span)."""
    opt = torch.optim.LBFGS(policy.params, lr=1, max_iter=3000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = empirical_dpo_loss(policy.logp(), problem)
        loss.backward()
        return loss
    opt.step(closure)
    return policy


def train_ppo(policy, problem: Problem, rewards: torch.Tensor, iterations: int, lr: float, batch: int = 64,
              epochs: int = 4, clip_eps: float = 0.2, generator=None) -> list:
    """Report eqs. (1), (28): KL-regularised PPO on whole responses, from π = π_ref.

    Each round: sample `batch` responses per prompt from π_old, score them with
    eq. (28), r̂(x, y) − β·log π_old/π_ref(y|x), advantage = score − its per-prompt batch mean (whitened), then
    `epochs` Adam steps on eq. (1), the learning rate annealed linearly to 0 over the rounds (as in Schulman et
    al.'s PPO runs). The whole response is one action, so a one-step episode. Returns `measure` dicts, one per
    optimiser step (plus the start).
    """
    opt = torch.optim.Adam(policy.params, lr=lr)
    anneal = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / iterations)
    mask = unseen_mask(problem)
    ref_logp = problem.pi_ref.log()
    P, _ = problem.shape
    history = [measure(policy.logp().detach(), problem, mask)]
    for _ in range(iterations):
        with torch.no_grad():
            logp_all = policy.logp()  # (P, Y)
            ys = torch.multinomial(logp_all.exp(), batch, replacement=True, generator=generator)  # (P, B)
            old_logp = logp_all.gather(1, ys)  # (P, B)
            score = rlhf_token_rewards(rewards.gather(1, ys).reshape(-1), old_logp.reshape(-1, 1),
                                       ref_logp.gather(1, ys).reshape(-1, 1), torch.ones(P * batch, 1),
                                       problem.beta).reshape(P, batch)  # one-token episodes: (P·B, 1) -> (P, B)
            advantages = whiten(score - score.mean(1, keepdim=True))  # (P, B)
        for _ in range(epochs):
            opt.zero_grad()
            logp = policy.logp().gather(1, ys)  # (P, B)
            (-masked_mean(clipped_surrogate(logp, old_logp, advantages, clip_eps))).backward()
            opt.step()
            history.append(measure(policy.logp().detach(), problem, mask))
        anneal.step()
    return history


# ---------------------------------------------------------------------------------------------- the script

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def response_name(problem: Problem, y: int) -> str:
    return "".join(LETTERS[t] for t in problem.tokens[y].tolist())


def minimiser_set_checks(problem: Problem, rewards: torch.Tensor, generator) -> dict:
    """The characterisation checked at π* (logits log π*): flat along V, Hessian null space = V, loss rises off V."""
    star = dpo_minimiser(problem, rewards).log()  # (P, Y) logits of a minimiser
    base = empirical_dpo_loss(star, problem).item()
    basis = dpo_flat_directions(problem)  # (k, P·Y)
    steps = torch.linspace(-3, 3, 7, dtype=DT)
    flat = max(abs(empirical_dpo_loss(torch.log_softmax(star + t * v.view(problem.shape), -1), problem).item() - base)
               for v in basis for t in steps)
    combo = torch.randn(len(basis), generator=generator, dtype=DT) @ basis  # a random direction inside V
    flat_combo = abs(empirical_dpo_loss(torch.log_softmax(star + 2 * combo.view(problem.shape), -1), problem).item() - base)
    hess = logit_hessian(problem, star)
    eig, vec = torch.linalg.eigh(hess)
    null = vec[:, eig.abs() < 1e-10]  # (P·Y, k')
    projector_gap = (null @ null.T - basis.T @ basis).abs().max().item()
    off = torch.randn(basis.shape[1], generator=generator, dtype=DT)
    off = off - basis.T @ (basis @ off)  # remove the part in V
    off = off / off.norm()
    rises = [empirical_dpo_loss(torch.log_softmax(star + t * off.view(problem.shape), -1), problem).item() - base
             for t in (-0.5, 0.5)]
    return dict(loss=base, dim=len(basis), flat=max(flat, flat_combo), null_dim=null.shape[1],
                projector_gap=projector_gap, min_curvature=eig[eig.abs() >= 1e-10].min().item(),
                quad=0.5 * 0.25 * (off @ hess @ off).item(), rises=rises)


def family_along_unseen(problem: Problem, rewards: torch.Tensor, masses) -> list:
    """Members of Π_DPO with unseen mass m on every prompt: (m, eq. (38) − its minimum, E_π[r*], KL(π ‖ π_ref))."""
    base = empirical_dpo_loss(dpo_minimiser(problem, rewards).log(), problem).item()
    rows = []
    for m in masses:
        pi = dpo_minimiser(problem, rewards, unseen_shift(problem, rewards, m))
        rows.append((m, empirical_dpo_loss(pi.log(), problem).item() - base,
                     (pi * problem.true_reward).sum(-1).mean().item(), kl_divergence(pi, problem.pi_ref).mean().item()))
    return rows


def run_all(problem: Problem, steps: int, seed: int, progress: bool = True) -> dict:
    """DPO and PPO from π_ref for each policy of `POLICIES`.

    Returns {name: dict(dpo=history, ppo=history, dpo_pi=π, ppo_pi=π (P, Y) at the end, target=π* of its reward model)}.
    """
    rewards = {"table": fit_reward_model(problem), "linear": fit_reward_model(problem, linear=True)}
    runs = {}
    for cls in tqdm(POLICIES, desc="DPO and PPO runs", disable=not progress):
        r_hat = rewards["linear" if cls is LogLinear else "table"]
        dpo_policy, ppo_policy = cls(problem), cls(problem)
        dpo = train_dpo(dpo_policy, problem, steps, lr=0.05)
        ppo = train_ppo(ppo_policy, problem, r_hat, steps // 4, lr=0.05, batch=256, epochs=4,
                        generator=torch.Generator().manual_seed(seed))
        lbfgs_pi = minimise_dpo_lbfgs(cls(problem), problem).logp().detach().exp()
        runs[cls.name] = dict(dpo=dpo, ppo=ppo, dpo_pi=dpo_policy.logp().detach().exp(), lbfgs_pi=lbfgs_pi,
                              ppo_pi=ppo_policy.logp().detach().exp(), target=dpo_minimiser(problem, r_hat))
    return runs


def plot_unseen_mass(problem: Problem, runs: dict):
    """Mass on unseen responses and true reward over training, DPO vs PPO, one column per policy parameterisation."""
    import matplotlib.pyplot as plt
    from chapters import plotting

    mask = unseen_mask(problem)
    ref = measure(problem.pi_ref.log(), problem, mask)
    fig, axes = plt.subplots(2, len(runs), figsize=(4.6 * len(runs), 7), sharex=True)
    for col, (name, run) in enumerate(runs.items()):
        dpo, ppo, goal = run["dpo"], run["ppo"], measure(run["target"].log(), problem, mask)
        for row, key, label in ((0, "unseen", "mass on responses absent from the data"), (1, "true_reward", "E_π[r*] (true reward)")):
            ax = axes[row, col]
            ax.plot([h[key] for h in dpo], color="C0", label="DPO (eq. 38)")
            ax.plot([h[key] for h in ppo], color="C3", alpha=0.8, label="PPO (eqs. 1, 28) on fitted r̂")
            ax.axhline(measure(run["lbfgs_pi"].log(), problem, mask)[key], color="C0", ls="-.", lw=1,
                       label="DPO minimised by L-BFGS (end point)")
            ax.axhline(goal[key], color="C3", ls="--", lw=1, label="π* = eq. (36) for r̂ (PPO's target)")
            ax.axhline(ref[key], color="gray", ls=":", lw=1, label="π_ref")
            ax.set(ylabel=label)
            if row == 0:
                ax.set_title(f"{name} policy")
            else:
                ax.set_xlabel("optimiser step (Adam)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=9)
    fig.suptitle(f"Chapter 9: where DPO and PPO put probability the preference data never covered (β = {problem.beta:g})")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return plotting.save(fig, "ch9_unseen_mass")


def plot_minimiser_set(problem: Problem, rewards: torch.Tensor, runs: dict, checks_basis_t=3.0):
    """Left: eq. (38) along a flat direction vs off the set. Right: true reward and KL across Π_DPO vs mass on unseen responses."""
    import matplotlib.pyplot as plt
    from chapters import plotting

    star = dpo_minimiser(problem, rewards).log()
    base = empirical_dpo_loss(star, problem).item()
    basis = dpo_flat_directions(problem)
    components, unseen = comparison_graph(problem)
    comp_dir = basis[0]  # the first component of prompt 0
    unseen_dir = basis[len(components[0])]  # the first unseen response of prompt 0
    off = torch.zeros(problem.shape, dtype=DT)
    a, b = components[0][0][:2]
    off[0, a], off[0, b] = 2 ** -0.5, -(2 ** -0.5)  # raise y_a, lower y_b: changes a voted difference
    ts = torch.linspace(-checks_basis_t, checks_basis_t, 121, dtype=DT)

    def along(v):
        return [empirical_dpo_loss(torch.log_softmax(star + t * v.view(problem.shape), -1), problem).item() - base for t in ts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    ax1.plot(ts, along(comp_dir), lw=3, label=f"+t on component {{{', '.join(response_name(problem, y) for y in components[0][0])}}} (in V)")
    ax1.plot(ts, along(unseen_dir), ls="--", lw=2,
             label=f"+t on unseen response {response_name(problem, unseen[0][0])} (in V)")
    ax1.plot(ts, along(off.flatten()), label=f"+t on {response_name(problem, a)}, −t on {response_name(problem, b)} (off V)")
    ax1.set(xlabel="step t along the direction (logits of prompt 0)", ylabel="eq. (38) − its minimum",
            title="DPO loss is flat exactly along V")
    ax1.legend(fontsize=8)

    masses = torch.linspace(0.01, 0.99, 99).tolist()
    fam = family_along_unseen(problem, rewards, masses)
    ax2.plot([f[0] for f in fam], [f[2] for f in fam], color="C2", label="E_π[r*] across Π_DPO (loss = minimum)")
    ax3 = ax2.twinx()
    ax3.plot([f[0] for f in fam], [f[3] for f in fam], color="C4", ls="--", label="KL(π ‖ π_ref) across Π_DPO")
    mask = unseen_mask(problem)
    for marker, name in (("o", "tabular"), ("D", "autoregressive")):  # log-linear has another r̂: another slice
        for key, fill, how in (("dpo_pi", "C0", "Adam"), ("lbfgs_pi", "none", "L-BFGS")):
            h = measure(runs[name][key].log(), problem, mask)
            ax2.plot(h["unseen"], h["true_reward"], marker, color="C0", mfc=fill, ms=8, label=f"DPO ({how}), {name} policy")
    goal = measure(dpo_minimiser(problem, rewards).log(), problem, mask)
    ax2.plot(goal["unseen"], goal["true_reward"], "*", ms=14, color="C3", label="π*, PPO's target (tabular r̂)")
    ref = measure(problem.pi_ref.log(), problem, mask)
    ax2.plot(ref["unseen"], ref["true_reward"], "x", ms=10, color="gray", label="π_ref (not a minimiser)")
    ax2.set(xlabel="probability mass on responses absent from the data (mean over prompts)", ylabel="E_π[r*]",
            title="Same DPO loss, any mass on unseen responses (a slice of Π_DPO)")
    ax3.set_ylabel("KL(π ‖ π_ref)")
    lines = ax2.get_legend_handles_labels(), ax3.get_legend_handles_labels()
    ax2.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper center",
               bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle("Chapter 9: the set of DPO minimisers Π_DPO on the example (report §7)")
    fig.tight_layout()
    return plotting.save(fig, "ch9_minimiser_set")


def _fmt(h: dict) -> str:
    return f"unseen {h['unseen']:.3f}  E[r*] {h['true_reward']:+.3f}  KL {h['kl']:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m chapters.ch9_dpo_vs_ppo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the example's seed (reference, reward, pairs) and PPO's sampler")
    parser.add_argument("--beta", type=float, default=0.5, help="β of eqs. (28), (36), (38)")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps per training run (PPO: steps/4 rounds of 4 epochs)")
    parser.add_argument("--sweep", type=int, default=5, help="further examples (seeds seed+1, ...) for the DPO-vs-π* table")
    args = parser.parse_args(argv)
    if args.beta <= 0:
        raise SystemExit(f"error: --beta must be > 0, got {args.beta}")
    if args.steps < 4 or args.sweep < 0:
        raise SystemExit("error: --steps must be >= 4 and --sweep >= 0")
    with one_thread():  # (P, Y) tensors are tiny: extra threads only add overhead on a busy machine
        return _run(args)


def _run(args):
    problem = make_problem(seed=args.seed, beta=args.beta)
    P, Y = problem.shape
    components, unseen = comparison_graph(problem)
    mask = unseen_mask(problem)
    print(f"The example: {P} prompts, responses = every {problem.tokens.shape[1]}-token sequence over "
          f"{{{', '.join(LETTERS[:int(problem.tokens.max()) + 1])}}} ({Y} per prompt), β = {problem.beta:g}, "
          f"{len(problem.prompt)} votes (10 per pair, pairs drawn from π_ref)")
    for x in range(P):
        comps = "  ".join("{" + ", ".join(response_name(problem, y) for y in c) + "}" for c in components[x])
        print(f"  prompt {x}: comparison-graph components {comps}; {len(unseen[x])} of {Y} responses in no pair, "
              f"π_ref mass on them {(problem.pi_ref[x] * mask[x]).sum().item():.3f}")

    print("\n1. The DPO minimisers (tabular logits θ, π = softmax θ; as a set of policies this holds for any policy class "
          "that can express every full-support π)")
    print("   derivation: eq. (38) = eq. (26) at r = β·log π/π_ref, which sees r only through r(x, y_w) − r(x, y_l), so")
    print("   Π_DPO = {π : β·log π/π_ref = r̂ + c_(x,k) on component k of prompt x, anything on responses in no pair}")
    r_hat = fit_reward_model(problem)
    checks = minimiser_set_checks(problem, r_hat, torch.Generator().manual_seed(args.seed))
    dim = checks["dim"]
    print(f"   V = span(component indicators, unseen unit vectors): dim {dim} "
          f"(= {sum(map(len, components))} components + {sum(map(len, unseen))} unseen); Π_DPO has dimension {dim - P} "
          f"(one normalisation per prompt)")
    print(f"   along V (7 steps t ∈ [−3, 3] on each basis vector, one random combination): max |Δ loss| = {checks['flat']:.1e}")
    print(f"   Hessian of eq. (38) in θ at a minimiser: null space dim {checks['null_dim']} (claim {dim}), "
          f"|projector − projector onto V| = {checks['projector_gap']:.1e}, smallest curvature off V {checks['min_curvature']:.2e}")
    print(f"   off V (unit direction ⟂ V, t = ∓0.5): loss rises by {checks['rises'][0]:.2e}, {checks['rises'][1]:.2e} "
          f"(quadratic model ½t²·vᵀHv = {checks['quad']:.2e})")

    print("\n2. Π_PPO ⊆ Π_DPO: reward model r̂ fitted by eq. (26) (ch2, table, no ridge), π* = eq. (36) for r̂")
    star = dpo_minimiser(problem, r_hat)
    rm_min = data_reward_loss(r_hat, problem).item()
    logits = star.log().clone().requires_grad_()
    loss = empirical_dpo_loss(torch.log_softmax(logits, -1), problem)
    (grad,) = torch.autograd.grad(loss, logits)
    print(f"   report: every PPO policy is a DPO solution. eq. (38) at π* = {loss.item():.12f}, min of eq. (26) = {rm_min:.12f} "
          f"(|Δ| {abs(loss.item() - rm_min):.1e}); |∇θ eq. (38)| at π* = {grad.norm():.1e} (convex in θ: a global minimum)")
    shifted = r_hat + torch.randn(problem.shape, generator=torch.Generator().manual_seed(args.seed), dtype=DT) * mask
    other = dpo_minimiser(problem, shifted)
    print(f"   another eq. (26) minimiser (r̂ + random values on unseen responses): its eq. (36) policy has eq. (38) − min = "
          f"{empirical_dpo_loss(other.log(), problem).item() - rm_min:.1e}")

    print("\n3. Π_DPO is bigger: members with any mass m on unseen responses (the same loss)")
    for m, gap, true_r, kl in family_along_unseen(problem, r_hat, [0.01, 0.5, 0.99]):
        print(f"   m = {m:.2f}: eq. (38) − min = {gap:+.1e}, E[r*] = {true_r:+.3f}, KL(π ‖ π_ref) = {kl:.3f}")
    print(f"   π* (PPO's target): {_fmt(measure(star.log(), problem, mask))};  π_ref: {_fmt(measure(problem.pi_ref.log(), problem, mask))}")
    far = dpo_minimiser(problem, r_hat, unseen_shift(problem, r_hat, 0.99))
    r_far = problem.beta * (far.log() - problem.pi_ref.log())  # r_π = β·log π/π_ref: an eq. (26) minimiser?
    back = optimal_policy(problem.pi_ref, r_far, problem.beta)  # eq. (36) for r_π: π again?
    print(f"   full-support π_ref: every member is eq. (36) for its own r_π = β·log π/π_ref: L_R(r_π) − min = "
          f"{data_reward_loss(r_far, problem).item() - rm_min:.1e}, |eq. (36)(r_π) − π| = {(back - far).abs().max().item():.1e};")
    print("   so here Π_PPO = Π_DPO when the reward model may be ANY eq. (26) minimiser. The strict ⊂ needs a response")
    zero = torch.nonzero(mask[0])[0].item()
    pi_ref0 = problem.pi_ref.clone()
    pi_ref0[0, zero] = 0.0
    pi_ref0 = pi_ref0 / pi_ref0.sum(-1, keepdim=True)
    problem0 = Problem(**{**problem.__dict__, "pi_ref": pi_ref0})
    pi0 = optimal_policy(pi_ref0, r_hat, problem.beta).clone()
    pi0[0] = 0.5 * pi0[0]
    pi0[0, zero] = 0.5  # half of prompt 0's mass on the response the reference never produces
    ppo_mass = max(optimal_policy(pi_ref0, r_hat + 10 * torch.randn(problem.shape, generator=torch.Generator().manual_seed(s),
                                                                     dtype=DT), problem.beta)[0, zero].item() for s in range(100))
    print(f"   π_ref gives zero probability: set π_ref(x0, {response_name(problem, zero)}) = 0. A policy with mass 0.5 there has "
          f"eq. (38) − min = {empirical_dpo_loss(pi0.log(), problem0).item() - rm_min:+.1e} (a DPO minimiser) and "
          f"KL(π ‖ π_ref) = {kl_divergence(pi0, pi_ref0).mean().item()}; eq. (36) gives it {ppo_mass:.1e} for every reward "
          f"(max over 100 random ones): Π_PPO ⊊ Π_DPO")

    print(f"\n4. Training from π_ref, {args.steps} Adam steps each (PPO: {args.steps // 4} rounds × 4 epochs, 256 samples/prompt, "
          f"ε = 0.2; reward r̂ − β·log π/π_ref, eq. (28)); exact measurements by enumeration")
    runs = run_all(problem, args.steps, args.seed)
    print(f"   {'policy':15s} {'method':6s} {'unseen mass':>11s} {'E[r*]':>7s} {'KL':>6s} {'eq.(38) − min':>14s} {'TV to π*':>9s}")
    for name, run in runs.items():
        floor = empirical_dpo_loss(run["target"].log(), problem).item()  # the minimum within this reward class
        for method, pi in (("DPO", run["dpo_pi"]), ("DPO†", run["lbfgs_pi"]), ("PPO", run["ppo_pi"]), ("π*", run["target"])):
            h = measure(pi.log(), problem, mask)
            tv = 0.5 * (pi - run["target"]).abs().sum(-1).max().item()
            print(f"   {name:15s} {method:6s} {h['unseen']:11.3f} {h['true_reward']:+7.3f} {h['kl']:6.3f} "
                  f"{h['dpo'] - floor:14.1e} {tv:9.1e}")
    print(f"   π_ref: {_fmt(measure(problem.pi_ref.log(), problem, mask))}")
    print("   DPO = Adam, as in the figure; DPO† = the same loss minimised by L-BFGS (moves within the span of the gradients, "
          "as plain gradient descent does)")
    plot_unseen_mass(problem, runs)
    plot_minimiser_set(problem, r_hat, runs)

    sweep = []
    if args.sweep:
        print(f"\n5. {args.sweep} more examples (seeds {args.seed + 1}–{args.seed + args.sweep}): autoregressive DPO vs π* (PPO's target)")
        print(f"   {'seed':>4s} {'unseen: π_ref':>13s} {'π*':>6s} {'DPO tab':>7s} {'DPO AR':>7s} {'DPO† AR':>7s}   "
              f"{'E[r*]: π*':>9s} {'DPO AR':>7s} {'DPO† AR':>7s}")
        for seed in tqdm(range(args.seed + 1, args.seed + 1 + args.sweep), desc="sweep", leave=False):
            pb = make_problem(seed=seed, beta=args.beta)
            pb_mask = unseen_mask(pb)
            target = measure(dpo_minimiser(pb, fit_reward_model(pb)).log(), pb, pb_mask)
            tab, ar = (train_dpo(cls(pb), pb, args.steps, lr=0.05)[-1] for cls in (Tabular, Autoregressive))
            ar2 = measure(minimise_dpo_lbfgs(Autoregressive(pb), pb).logp().detach(), pb, pb_mask)
            ref = measure(pb.pi_ref.log(), pb, pb_mask)
            sweep.append((seed, ref, target, tab, ar, ar2))
            print(f"   {seed:4d} {ref['unseen']:13.3f} {target['unseen']:6.3f} {tab['unseen']:7.3f} {ar['unseen']:7.3f} "
                  f"{ar2['unseen']:7.3f}   {target['true_reward']:+9.3f} {ar['true_reward']:+7.3f} {ar2['true_reward']:+7.3f}")

    final = {name: {k: measure(run[k].log(), problem, mask) for k in ("dpo_pi", "lbfgs_pi", "ppo_pi", "target")}
             for name, run in runs.items()}
    family = family_along_unseen(problem, r_hat, [0.01, 0.99])
    tab, ar, lin = final["tabular"], final["autoregressive"], final["log-linear"]
    print("\nWhat the report says vs what the numbers show")
    print(f"  'Π_PPO ⊂ Π_DPO: DPO can recover any policy optimised by PPO' -> π* = eq. (36) for the eq. (26) fit minimises "
          f"eq. (38): |eq. (38)(π*) − min eq. (26)| = {abs(loss.item() - rm_min):.1e}, |∇| = {grad.norm():.1e}")
    print(f"  '...as well as additional solutions' -> Π_DPO is a {dim - P}-dimensional family at one loss value; its mass on "
          f"unseen responses takes any value in (0, 1) (E[r*] {family[0][2]:+.3f} at 0.01, {family[1][2]:+.3f} at 0.99). "
          f"With π_ref > 0 everywhere each member is eq. (36) for another eq. (26) minimiser (the two sets coincide); "
          f"the strict ⊂ comes from responses π_ref never produces (DPO's loss never sees them, PPO's KL is ∞ there)")
    print(f"  'DPO still suffers from misspecification on OOD responses' -> the member DPO reaches depends on the "
          f"parameterisation and the optimiser, PPO's does not. Unseen mass: π* {tab['target']['unseen']:.3f}, PPO "
          f"{tab['ppo_pi']['unseen']:.3f} (tabular) / {ar['ppo_pi']['unseen']:.3f} (autoregressive); DPO tabular "
          f"{tab['dpo_pi']['unseen']:.3f} (Adam) / {tab['lbfgs_pi']['unseen']:.3f} (L-BFGS, = π*); DPO autoregressive "
          f"{ar['dpo_pi']['unseen']:.3f} / {ar['lbfgs_pi']['unseen']:.3f}, with E[r*] {ar['dpo_pi']['true_reward']:+.3f} / "
          f"{ar['lbfgs_pi']['true_reward']:+.3f} vs π*'s {ar['target']['true_reward']:+.3f}. Log-linear (shared, matched "
          f"reward model): the data pin the policy, DPO = PPO = π* ({lin['dpo_pi']['unseen']:.3f}, "
          f"{lin['ppo_pi']['unseen']:.3f}, {lin['target']['unseen']:.3f})")
    if sweep:
        for label, i in (("Adam", 4), ("L-BFGS", 5)):
            more = sum(row[i]["unseen"] > row[2]["unseen"] for row in sweep)
            worse = sum(row[i]["true_reward"] < row[2]["true_reward"] for row in sweep)
            print(f"  over {len(sweep)} more examples, autoregressive DPO ({label}) put more mass on unseen responses "
                  f"than π* in {more} and reached a lower E[r*] in {worse}")
    return dict(problem=problem, checks=checks, runs=runs, sweep=sweep)


if __name__ == "__main__":
    main()
