"""Chapter 11's figures on chapter 8's miniature: the displacement picture (log-probs over DPO's
steps, CHES against the chosen log-prob's change) and the length picture (end-of-text over the
steps, answer length and win rate per run). They read `miniature_runs.miniature_experiment`'s
result."""

import numpy as np

from chapters.common.figures import plt, save


def _curve(run, split, reading, transform=None):
    """(steps, mean over the tracked pairs of a reading): less its step-0 value, or of
    transform(reading) when given."""
    track = run["history"]["track"]
    steps = np.array([t["step"] for t in track])
    if transform is not None:
        return steps, np.array([float(np.nanmean(transform(t[split][reading]))) for t in track])
    values = np.array([t[split][reading].mean().item() for t in track])
    return steps, values - values[0]


def miniature_displacement_figure(result, rank_correlation, name="ch11_miniature_displacement"):
    """Top: log π(y) − log π_SFT(y) of y_w (solid) and y_l (dashed) over DPO's steps, mean over
    the fixed training pairs (left) and the validation pairs (right), one colour per β. Bottom left:
    the same on the training pairs for each fix at one β. Bottom right: the rank of the SFT model's
    CHES against the change of log π(y_w) at the end of DPO at that β, one dot per training pair
    and the mean of each tenth, with their Spearman `rank_correlation` in the title."""
    runs, beta = result["runs"], result["beta"]
    dpo = [r for r in runs if r["objective"].kind == "dpo" and not r["objective"].without_eos]
    fixes = [r for r in runs if r["objective"].beta == beta]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, split, title in (
        (
            axes[0, 0],
            "train",
            f"DPO, {len(dpo[0]['history']['track'][0]['train']['chosen'])} fixed training pairs",
        ),
        (axes[0, 1], "validation", "DPO, validation pairs"),
    ):
        for k, r in enumerate(dpo):
            label = f"β = {r['objective'].beta:g}"
            ax.plot(*_curve(r, split, "chosen"), "-", color=f"C{k}", lw=2, label=f"{label}: y_w")
            ax.plot(*_curve(r, split, "rejected"), "--", color=f"C{k}", label=f"{label}: y_l")
        ax.axhline(0, color="k", lw=0.8, ls=":", label="π = π_SFT")
        ax.set(
            xlabel="DPO step (batch 8, lr 1e-4)",
            ylabel="mean log π(y|x) − log π_SFT(y|x)  [nats]",
            title=title,
        )
        ax.legend(fontsize=8, loc="lower left")
    ax = axes[1, 0]
    for k, r in enumerate(fixes):
        label = r["objective"].label
        ax.plot(*_curve(r, "train", "chosen"), "-", color=f"C{k}", lw=2, label=f"{label}: y_w")
        ax.plot(*_curve(r, "train", "rejected"), "--", color=f"C{k}", lw=1, label=f"{label}: y_l")
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set(
        xlabel="step",
        ylabel="mean log π(y|x) − log π_SFT(y|x)  [nats]",
        title=f"the fixes at β = {beta:g} (training pairs)",
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)  # no line hidden
    ax = axes[1, 1]
    run = next(r for r in dpo if r["objective"].beta == beta)
    change = (run["readings"]["train"]["chosen"] - result["sft"]["train"]["chosen"]).numpy()
    ches = result["sft"]["train"]["ches"].numpy()
    rank = (np.argsort(np.argsort(ches, kind="stable"), kind="stable") + 0.5) / len(ches)
    ax.scatter(rank, change, s=8, alpha=0.4, color="C0", label="one training pair")
    tenths = np.minimum((rank * 10).astype(int), 9)
    means = [change[tenths == k].mean() for k in range(10)]
    ax.plot(np.arange(10) / 10 + 0.05, means, "o-", color="C3", lw=2, label="mean of each tenth")
    ax.axhline(0, color="k", lw=0.8, ls=":", label="log π(y_w) unchanged")
    ax.set(
        xlabel="CHES of the SFT model: rank among the training pairs (0 lowest, 1 highest)",
        ylabel="log π_DPO(y_w|x) − log π_SFT(y_w|x)  [nats]",
        title=f"CHES against the chosen log-prob's change, DPO β = {beta:g} "
        f"(Spearman {rank_correlation:.2f})",
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save(fig, name)


def miniature_length_figure(result, name="ch11_miniature_length"):
    """Left: π(EOS) where y_w ends (solid) and where y_l ends (dashed), mean over the fixed
    training pairs, over the steps of each run at one β; π_SFT's is step 0. Right: each model's
    mean greedy answer length on the test prompts against its SBERT win rate (95% interval); DPO at
    other β values drawn as squares."""
    runs, beta = result["runs"], result["beta"]
    fixes = [r for r in runs if r["objective"].beta == beta]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for k, r in enumerate(fixes):
        label = r["objective"].label
        ax.plot(
            *_curve(r, "train", "chosen_eos", np.exp),
            "-",
            color=f"C{k}",
            lw=2,
            label=f"{label}: end of y_w",
        )
        ax.plot(
            *_curve(r, "train", "rejected_eos", np.exp),
            "--",
            color=f"C{k}",
            lw=1,
            label=f"{label}: end of y_l",
        )
    ax.set(
        xlabel="step",
        ylabel="mean π(EOS | x, y without its EOS)",
        ylim=(0, 1),
        title=f"end-of-text where the responses stop, β = {beta:g} (step 0: π_SFT)",
    )
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    styles = {r["objective"].label: (f"C{k}", "o") for k, r in enumerate(fixes)}
    others = [r["objective"].label for r in runs if r["objective"].label not in styles]
    styles.update({label: (f"C{k + 1}", "s") for k, label in enumerate(others)})  # DPO, other β
    styles["SFT"] = ("k", "o")
    for row in result["win_rows"]:
        err = [[row["win_rate"] - row["ci_low"]], [row["ci_high"] - row["win_rate"]]]
        colour, marker = styles[row["model"]]
        bx.errorbar(
            row["mean_length"],
            row["win_rate"],
            yerr=err,
            fmt=marker,
            color=colour,
            capsize=3,
            label=row["model"],
        )
    bx.axhline(0.5, color="grey", lw=0.8, ls=":", label="win rate ½")
    bx.set(
        xlabel="mean greedy answer length on the test prompts  [GPT-2 tokens]",
        ylabel="SBERT win rate against the chosen/rejected pair",
        title=f"length and win rate, greedy (T = 0), {result['win_rows'][0]['n']} test prompts",
    )
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no bar hidden
    fig.tight_layout()
    save(fig, name)
