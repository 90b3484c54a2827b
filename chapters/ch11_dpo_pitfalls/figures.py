"""Chapter 11's figures: the displacement picture (chosen and rejected log-probs along DPO, DPOP and
DPO + NLL descent) and the length picture (R-DPO's optimum against α, and π over responses)."""

import numpy as np

from chapters.common.figures import plt, save


def displacement_figure(paths, ref_chosen, ref_rejected, name="ch11_displacement"):
    """Left: log π(y)/π_ref(y) of y_w (solid) and y_l (dashed) along each descent path; right: the
    margin h of eq. (38) along the same paths (plots/<name>.png).

    paths: {label: descent_path's dict}; ref_chosen, ref_rejected: log π_ref(y_w), log π_ref(y_l).
    """
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for k, (label, path) in enumerate(paths.items()):
        chosen = (path["chosen"] - ref_chosen).numpy()
        rejected = (path["rejected"] - ref_rejected).numpy()
        steps = np.arange(len(chosen))
        ax.plot(steps, chosen, "-", color=f"C{k}", lw=2, label=f"{label}: y_w (chosen)")
        ax.plot(steps, rejected, "--", color=f"C{k}", lw=1.2, label=f"{label}: y_l (rejected)")
        bx.plot(steps, chosen - rejected, "-", color=f"C{k}", label=label)
    ax.axhline(0, color="k", lw=0.8, ls=":", label="π = π_ref")
    ax.set(xlabel="gradient step (η = 1)", ylabel="log π(y|x) − log π_ref(y|x)  [nats]",
           title="likelihood displacement: DPO lowers y_w with y_l")
    ax.legend(fontsize=7, loc="lower left")
    bx.set(xlabel="gradient step (η = 1)",
           ylabel="margin h = log π/π_ref (y_w) − log π/π_ref (y_l)",
           title="what the fixes cost: the margin each one reaches")
    bx.legend(fontsize=8)
    save(fig, name)


def length_figure(alphas, lengths_by_alpha, newton, marks, gamma, bars, lengths, name):
    """Left: E_x E_π|y| of R-DPO's optimum against α (closed form, Newton points, reference lines);
    right: π over the responses of one prompt under π_ref, π* for q, DPO and R-DPO
    (plots/<name>.png).

    alphas, lengths_by_alpha: the α grid and E|y| there; newton: [(α, E|y|)] from the numerical
    minimisation; marks: {label: E|y|} drawn as horizontal lines; bars: {label: π (Y,)};
    lengths: |y| of that prompt's responses (Y,).
    """
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax.plot(alphas, lengths_by_alpha, "-", color="C0", lw=2, label="R-DPO optimum (closed form)")
    a, m = zip(*newton)
    ax.scatter(a, m, marker="o", s=40, color="C1", zorder=3,
               label="Newton on the population loss (α = 0: DPO)")
    styles = ["--", ":", "-."]
    for k, (label, value) in enumerate(marks.items()):
        ax.axhline(value, color=f"C{k + 2}", ls=styles[k % 3], lw=1.2, label=label)
    ax.axvline(gamma, color="k", lw=0.8, ls=":", label=f"α = γ = {gamma:g}")
    ax.set(xlabel="R-DPO's α (per token)", ylabel="E_x E_π |y|  [tokens]",
           title="labeller adds γ·|y| to the reward: α = γ undoes it")
    ax.legend(fontsize=7)
    order = np.argsort(lengths, kind="stable")
    idx = np.arange(len(order))
    width = 0.8 / len(bars)
    for k, (label, pi) in enumerate(bars.items()):
        bx.bar(idx + (k - (len(bars) - 1) / 2) * width, pi[order], width, label=label)
    bx.set(xticks=idx, xticklabels=[f"|y| = {int(lengths[i])}" for i in order], ylabel="π(y|x₀)",
           title="prompt x₀: responses from short to long")
    bx.tick_params(axis="x", labelsize=8)
    bx.legend(fontsize=7)
    save(fig, name)
