"""Chapter 10's figures: each variant's exact minimiser on the frontier, deterministic preferences,
label noise."""

from chapters.common.figures import plt, save


def deterministic_figure(paths, sharp, sweep, limit, name="ch10_deterministic_preferences"):
    """DPO's KL along Newton steps and both minimisers' KL as preferences sharpen
    (plots/<name>.png).
    """
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    for k, (beta, (kls, ipo_kl)) in enumerate(paths.items()):
        ax.plot(range(1, len(kls) + 1), kls, "-", color=f"C{k}", label=f"DPO, β = {beta:g}")
        ax.axhline(ipo_kl, color=f"C{k}", ls=":", label=f"IPO minimiser, β = {beta:g}")
        bx.plot(sharp, sweep[beta][0], "-", color=f"C{k}", label=f"DPO, β = {beta:g}")
        bx.plot(sharp, sweep[beta][1], ":", color=f"C{k}", label=f"IPO, β = {beta:g}")
    for axis in (ax, bx):
        axis.axhline(limit, color="k", lw=0.8, ls="--",
                     label="−log π_ref(best y): all mass on the best")
    ax.set(xscale="log", xlabel="Newton step on the population loss", ylabel="E_x KL(π‖π_ref)",
           title="p* = 1 on every pair: DPO has no minimiser")
    bx.set(xscale="log", xlabel="s, with p* = σ(s·Δr*) (s → ∞: deterministic)",
           ylabel="E_x KL(π‖π_ref) of the minimiser",
           title="near-deterministic preferences: exact minimisers")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    save(fig, name)


def tabular_figure(front, rows, target, implied, name="ch10_tabular_optima"):
    """Each minimiser on the tabular frontier; implied rewards under label noise."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    top = max(s["kl_ref"] for s in rows.values()) * 1.15
    keep = front.kls <= top
    ax.plot(front.kls[keep], front.rewards[keep], "k-", lw=2,
            label="exact frontier π*_β (eq. (36))")
    markers = "*osDv^<>Ph"
    for k, (label, s) in enumerate(rows.items()):
        ax.scatter(s["kl_ref"], s["reward"], marker=markers[k % len(markers)], s=70 if k else 160,
                   color=f"C{k}", label=f"{label} (eff. {s['efficiency']:.2f})", zorder=3)
    ax.set(xlabel="E_x KL(π‖π_ref)", ylabel="E_x E_π[r*]",
           title="each variant's exact population minimiser (same β)")
    ax.legend(fontsize=7, loc="lower right")
    x = target.flatten().numpy()
    for k, (label, r_hat) in enumerate(implied.items()):
        bx.scatter(x, r_hat.flatten().numpy(), s=14, color=f"C{k}", label=label)
    bx.plot([x.min(), x.max()], [x.min(), x.max()], "k--", lw=1, label="r̂ = r* (π = π*)")
    bx.set(xlabel="r*(x, y), centred per prompt", ylabel="implied r̂ = β·log π/π_ref, centred",
           title="label noise: what each minimiser's rewards are")
    bx.legend(fontsize=7)
    save(fig, name)
