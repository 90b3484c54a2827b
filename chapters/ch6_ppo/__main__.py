"""Chapter 6 (report §2.2, §3.3; eqs. (1)–(5), (28)): PPO with GAE, and PPO-based RLHF on the
hand-written GPT-2.

The loss pieces are pure functions on per-token tensors (last axis = time). The machinery that puts
them together for a language model is `chapters.ch6_ppo.trainer.PPOTrainer`; the task with a known
answer that this chapter runs it on (a Markov chain, a token-class reward, the exact optimum) is
`chapters.ch6_ppo.markov_task`.

    python3 -m chapters.ch6_ppo            # --seed, --iterations, --beta, --quick
"""

import argparse
import math
from dataclasses import asdict

import torch

import gpt
from chapters.ch6_ppo.markov_task import (
    chain_entropy_rate,
    chain_kl_optimum,
    class_fraction_reward,
    evaluate_on_chain,
    expected_class_fraction,
    markov_chain,
    sample_markov,
)
from chapters.ch6_ppo.objective import clipped_surrogate, entropy, gae, kl_k1, kl_k3, ppo_objective
from chapters.ch6_ppo.trainer import PPOConfig, PPOTrainer
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from chapters.common.runtime import one_thread
from chapters.training.finetune import finetune, next_token_loss
from gpt.cli import nonnegative_int, positive_float, positive_int, run, summary


def closed_form_checks() -> list[str]:
    """The chapter's derivations on small float64 examples, one printable line each (claim:
    measurement)."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    r, v = torch.randn(4, 7, **f64), torch.randn(4, 7, **f64)
    gamma, lam = 0.9, 0.8
    adv, _ = gae(r, v, gamma, lam)
    v_next = torch.cat([v[:, 1:], torch.zeros(4, 1, dtype=torch.float64)], 1)
    delta = r + gamma * v_next - v
    explicit = torch.stack(
        [sum((gamma * lam) ** l * delta[:, t + l] for l in range(7 - t)) for t in range(7)], 1
    )

    ratio, a = (
        torch.linspace(0.55, 1.45, 10, dtype=torch.float64),
        torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None],
    )
    logp = ratio.log().expand(2, -1).clone().requires_grad_()
    clipped_surrogate(logp, torch.zeros_like(logp), a, 0.2).sum().backward()
    binds = ((a > 0) & (ratio > 1.2)) | ((a < 0) & (ratio < 0.8))
    clip_err = (logp.grad - torch.where(binds, 0.0, ratio * a)).abs().max().item()

    h = torch.ones(3, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    ppo_objective(zero, zero, h, ent_coef=0.01).backward()

    p, q = torch.softmax(torch.randn(6, **f64), 0), torch.softmax(torch.randn(6, **f64), 0)
    kl = float((p * (p / q).log()).sum())
    return [
        f"eq. (5): backward recursion vs the explicit sum Σ_(l=0..T−t−1) (γλ)^l δ_(t+l): max |Δ| = "
        f"{(adv - explicit).abs().max():.1e}",
        f"eq. (1): ∂L^CLIP/∂log π vs (0 where the clip binds, r·A elsewhere), {int(binds.sum())} "
        f"of 20 bind: max |Δ| = {clip_err:.1e}",
        f"eq. (3): entropy of the uniform distribution over 5 actions vs log 5: |Δ| = "
        f"{abs(entropy(torch.zeros(5, dtype=torch.float64)).item() - math.log(5)):.1e}",
        f"eq. (4): as printed (+c2·E[−βH]) ∂L/∂H = −c2·β < 0, an entropy penalty; corrected "
        f"+c2·E[H]: ∂L/∂H = {h.grad.sum().item():+.3f} (c2 = 0.01)",
        f"k1, k3 estimators: E_π[k] by enumeration vs KL(π ‖ π_ref) = {kl:.4f}: |Δ| = "
        f"{abs(float((p * kl_k1(p.log(), q.log())).sum()) - kl):.1e}, "
        f"{abs(float((p * kl_k3(p.log(), q.log())).sum()) - kl):.1e}",
    ]


def plot_training(history, after, exact_ref_reward, optimum, beta, name):
    """Mean reward and KL(π ‖ π_ref) over PPO iterations, beside the exact reference and the exact
    optimum of eq. (27)."""
    it = range(1, len(history) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot(it, [h["reward"] for h in history], color="C0", label="PPO rollouts: mean reward")
    ax1.axhline(optimum["reward"], color="C3", ls="--",
                label=f"exact optimum π* of eq. (27) ({optimum['reward']:.3f})")
    ax1.axhline(after["reward"], color="C2", ls=":",
                label=f"final policy, held-out prompts ({after['reward']:.3f})")
    ax1.axhline(exact_ref_reward, color="gray", ls="--",
                label=f"reference: the chain, exact ({exact_ref_reward:.3f})")
    ax1.set(xlabel="PPO iteration", ylabel="reward = fraction of class tokens",
            title="Reward rises under PPO")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.plot(it, [h["kl"] for h in history], color="C0", label="PPO rollouts: KL(π ‖ π_ref), k1")
    ax2.plot(it, [h["kl_k3"] for h in history], color="C1", ls="--", lw=1,
             label="PPO rollouts: KL(π ‖ π_ref), k3")
    ax2.axhline(optimum["kl"], color="C3", ls="--",
                label=f"exact optimum π* ({optimum['kl']:.2f} nats)")
    ax2.set(xlabel="PPO iteration", ylabel="KL per response (nats)",
            title="KL to the reference stays bounded")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Chapter 6: PPO-based RLHF (eq. (28), β = {beta:g}) on a tiny GPT fitted to a Markov chain"
    )
    return save(fig, name)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a short run (seconds) of the same experiment")
    parser.add_argument("--iterations", type=positive_int, default=None,
                        help="PPO iterations (default 60, quick 6)")
    parser.add_argument("--beta", type=positive_float, default=0.05,
                        help="KL coefficient β of eq. (28), > 0 (the exact optimum "
                        "π* ∝ π_ref·exp(r/β) needs it)")
    args = parser.parse_args(argv)
    check_writable()
    # a GPT this small runs fastest on one thread (and is then repeatable across machines' core
    # counts)
    with one_thread():
        return run_experiment(args)


def run_experiment(args):
    """Closed-form checks, then SFT on a Markov chain and PPO on a token-class reward; returns the
    measurements."""
    # the trainer and the task build on this chapter's formulas, so they are imported here, when the
    # script runs

    iterations = args.iterations or (6 if args.quick else 60)
    sft_steps = 100 if args.quick else 600
    vocab, prompt_len, response_len, token_class = 16, 4, 12, (0, 1, 2, 3)

    print("Closed forms (float64):")
    for line in closed_form_checks():
        print("  " + line)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    start, transition = markov_chain(vocab, 0.3, g)
    data = sample_markov(start, transition, 4000, prompt_len + response_len, g)  # (4000, 16)
    sft = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=vocab, n_positions=32))
    losses, _ = finetune(sft, next_token_loss, {"ids": data}, sft_steps, 64, 3e-3, g, desc="SFT")
    floor = chain_entropy_rate(start, transition, prompt_len + response_len)
    print(
        f"\nSFT on a random {vocab}-token Markov chain: final loss {sum(losses[-20:]) / 20:.3f} "
        f"nats/token vs the chain's exact entropy rate {floor:.3f} (the floor)"
    )

    eval_prompts = sample_markov(start, transition, 512, prompt_len, g)  # held out, (512, P)
    eval_mask = torch.ones_like(eval_prompts)
    exact = (
        expected_class_fraction(eval_prompts[:, -1], transition, token_class, response_len)
        .mean()
        .item()
    )
    optimum = {
        k: v.mean().item()
        for k, v in chain_kl_optimum(
            eval_prompts[:, -1], transition, token_class, response_len, args.beta
        ).items()
    }
    reward_fn = class_fraction_reward(token_class)
    ref = gpt.GPT(sft.config)
    ref.load_state_dict(sft.state_dict())

    def held_out(policy):
        """The policy on the held-out prompts, sampled from the same seed before and after PPO."""
        generator = torch.Generator().manual_seed(args.seed)
        return evaluate_on_chain(
            policy, ref, reward_fn, eval_prompts, eval_mask, response_len, generator
        )

    before = held_out(sft)
    print(
        f"reward = fraction of response tokens in {set(token_class)}: exact expectation under the "
        f"chain {exact:.3f}, SFT policy {before['reward']:.3f} ± {before['reward_se']:.3f}"
    )

    train_prompts = list(sample_markov(start, transition, 2000, prompt_len, g))
    config = PPOConfig(
        lr=1e-3 if not args.quick else 2e-3,
        beta=args.beta,
        batch_size=64,
        epochs=4,
        minibatch_size=16,
        response_length=response_len,
        seed=args.seed,
    )
    print(
        f"\nPPO, {iterations} iterations: "
        + ", ".join(f"{k}={v}" for k, v in asdict(config).items())
    )
    trainer = PPOTrainer(sft, ref, reward_fn, train_prompts, config)
    history = trainer.train(iterations)
    for i in sorted({0, iterations // 2, iterations - 1}):
        h = history[i]
        print(
            f"  iteration {i + 1:3d}: reward {h['reward']:.3f}  KL {h['kl']:.3f}  clip frac "
            f"{h['clip_frac']:.3f}  "
            f"approx KL {h['approx_kl']:.4f}  value loss {h['value_loss']:.4f}  entropy "
            f"{h['entropy']:.3f}"
        )
    after = held_out(trainer.policy)
    gain = after["reward"] - before["reward"]
    se = math.hypot(after["reward_se"], before["reward_se"])
    print(
        f"\nheld-out prompts (512): reward {before['reward']:.3f} -> {after['reward']:.3f}, "
        f"gain {gain:+.3f} ± {se:.3f} ({gain / se:.1f} standard errors)"
    )
    print(
        f"KL(π ‖ π_ref) per response: k1 {after['kl']:.3f}, k3 {after['kl_k3']:.3f} nats "
        f"(max over iterations {max(h['kl'] for h in history):.3f})"
    )
    print(
        f"eq. (27) objective E[r] − β·KL: SFT {before['reward'] - args.beta * before['kl']:.3f}, "
        f"PPO {after['reward'] - args.beta * after['kl']:.3f}, exact optimum π* (β·log Z, "
        f"reference = the chain) "
        f"{optimum['objective']:.3f} at reward {optimum['reward']:.3f}, KL {optimum['kl']:.3f}"
    )
    plot_training(
        history,
        after,
        exact,
        optimum,
        args.beta,
        "ch6_ppo_quick" if args.quick else "ch6_ppo_reward_kl",
    )
    return dict(before=before, after=after, history=history, optimum=optimum)


if __name__ == "__main__":
    run(main)
