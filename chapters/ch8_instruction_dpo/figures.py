"""Chapter 8's figures (report §6.2): Fig. 3 (DPO training per epoch), Fig. 4 (win rates), and the
authors' ladder.

Every figure goes through `chapters.common.figures.save` (plots/ or $DPO_PLOTS_DIR), named
ch8_<what><suffix>.png.
"""

import math

import numpy as np

from chapters.common.figures import plt, save

PANELS = (
    ("loss", "mean DPO loss, eq. (38)", "DPO loss"),
    ("rewards/accuracies", "reward accuracy (r̂_w > r̂_l)", "reward accuracy"),
    ("kl", "mean token-level KL(π‖π_ref) [nats]", "KL over response tokens"),
)


def figure_training(epochs, betas, tag, suffix=""):
    """Like the report's Fig. 3: DPO loss, reward accuracy and token-level KL(π‖π_ref) over response
    tokens per epoch, for each β, train (solid) and validation (dashed; epoch 0 = before training).
    """
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(betas)))
    for beta, color in zip(betas, colors):
        for split, style in (("train", "-"), ("validation", "--")):
            rows = [r for r in epochs if r["beta"] == beta and r["split"] == split]
            for ax, (key, _, _) in zip(axes, PANELS):
                ax.plot(
                    [r["epoch"] for r in rows],
                    [r[key] for r in rows],
                    style,
                    marker="o",
                    color=color,
                    label=f"β = {beta} ({split})",
                )
    axes[0].axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (policy = reference)")
    for ax, (_, ylabel, title) in zip(axes, PANELS):
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{tag}: DPO per epoch for each β (epoch 0: validation before training)")
    save(fig, f"ch8_dpo_training{suffix}")


def figure_win_rates(rows, tag, suffix="", reference_lengths=None):
    """Like the report's Fig. 4: SBERT win rate vs sampling temperature for SFT and each β, 95%
    bootstrap intervals, the length-controlled win rate dotted (left); the mean generated length in
    tokens (right)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    names = list(dict.fromkeys(r["model"] for r in rows))
    for k, name in enumerate(names):
        rs = [r for r in rows if r["model"] == name]
        t = np.array([r["temperature"] for r in rs])
        x = t + 0.012 * (k - (len(names) - 1) / 2)
        y = np.array([r["win_rate"] for r in rs])
        err = np.array(
            [[r["win_rate"] - r["ci_low"] for r in rs], [r["ci_high"] - r["win_rate"] for r in rs]]
        )
        line = ax.errorbar(
            x, y, yerr=err, marker="o", capsize=3, ls="--" if name == "SFT" else "-", label=name
        )
        color = line[0].get_color()
        ax.plot(x, [r["lc_win_rate"] for r in rs], ":", color=color, lw=1)
        bx.plot(
            t,
            [r["mean_length"] for r in rs],
            "--" if name == "SFT" else "-",
            marker="o",
            color=color,
            label=name,
        )
    ax.plot([], [], ":", color="grey", label="length-controlled")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(
        xlabel="sampling temperature (0 = greedy)",
        ylabel="win rate vs rejected (SBERT cosine)",
        title=f"win rate on {rows[0]['n']} held-out prompts, 95% bootstrap CI",
    )
    for label, value in (reference_lengths or {}).items():
        bx.axhline(
            value,
            color="grey",
            lw=0.8,
            ls="--" if label == "chosen" else ":",
            label=f"{label} (mean)",
        )
    bx.set(
        xlabel="sampling temperature (0 = greedy)",
        ylabel="mean generated length [GPT-2 tokens]",
        title="length of the generations",
    )
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(tag)
    save(fig, f"ch8_win_rates{suffix}")


LADDER_PANELS = (
    ("loss", "DPO loss (their objective)"),
    ("validation_accuracy", "validation reward accuracy"),
    ("validation_kl", "validation token-level KL [nats]"),
    ("mean_length", "mean generated length [tokens]"),
    ("win_rate", "win rate (95% CI)"),
)


def figure_ladder(rows, beta, temperature, tag, suffix=""):
    """The ladder: one row per rung (the authors' setup at the top, ours at the bottom), one panel
    per number; each rung fixes one more mistake. The numbers are those of the last β's model, as
    the authors evaluated."""
    fig, axes = plt.subplots(
        1,
        len(LADDER_PANELS),
        figsize=(19, 0.45 * len(rows) + 2.2),
        sharey=True,
        layout="constrained",
    )
    y = np.arange(len(rows))
    for ax, (key, title) in zip(axes, LADDER_PANELS):
        if key == "loss":
            for col, marker, label in (
                ("first_loss", "s", "first step"),
                ("train_loss", "o", "final, train"),
                ("validation_loss", "^", "final, validation"),
            ):
                ax.plot([r[col] for r in rows], y, marker, label=label)
            ax.axvline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2")
            ax.legend(fontsize=7)
        elif key == "win_rate":
            w = np.array([r["win_rate"] for r in rows])
            err = np.array([w - [r["ci_low"] for r in rows], [r["ci_high"] for r in rows] - w])
            ax.errorbar(w, y, xerr=err, fmt="o", capsize=3, label="DPO")
            ax.plot([r["lc_win_rate"] for r in rows], y, "x", label="length-controlled")
            ax.plot([r["sft_win_rate"] for r in rows], y, "|", color="grey", ms=12, label="SFT")
            ax.axvline(0.5, color="grey", lw=0.8, ls=":")
            ax.legend(fontsize=7)
        else:
            ax.plot([r[key] for r in rows], y, "o")
        ax.set(title=title)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y, [r["rung"] for r in rows])
    axes[0].invert_yaxis()
    fig.suptitle(
        f"{tag}: the authors' setup, then one mistake fixed per rung (cumulative); β = {beta} "
        f"model, temperature {temperature}"
    )
    save(fig, f"ch8_ladder{suffix}")
