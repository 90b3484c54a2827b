"""Chapter 10's losses against TRL 1.16's, on the same log-probs: max |Δ| per kind, and where TRL's
convention differs.

    python3 -m venv --system-site-packages /tmp/benchvenv
    /tmp/benchvenv/bin/pip install trl==1.16.0
    /tmp/benchvenv/bin/python bench/bench_dpo_family.py [--pairs 256] [--seed 0]

TRL computes its losses inside its trainers' loss methods, from a model's outputs. Here each method
runs on a stand-in `self` (only the attributes it reads) and a stand-in model whose per-token
log-probs are set so that the response log-probs are exactly the ones given to
`chapters.ch10_dpo_family`; so both sides see the same numbers, and one example per call gives TRL's
per-example loss. Nothing is timed (the machine's instruction sets are printed beside the table,
as in every benchmark, since float rounding can depend on them).
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import machine  # noqa: E402
from chapters.ch10_dpo_family.losses import (  # noqa: E402
    kto_loss,
    kto_reference_point,
    orpo_loss,
    preference_loss,
)
from gpt.cli import positive_int, run, summary  # noqa: E402

PROMPT = 3  # prompt tokens in every stand-in row


class StandInLM(torch.nn.Module):
    """A 'model' whose log_probs (B, T−1) are given: row i spreads logps[i] evenly over its
    completion tokens."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows  # {first input id: (T − 1,) per-token log-probs}

    def forward(self, input_ids, labels=None, **_):
        log_probs = torch.stack([self.rows[int(i)] for i in input_ids[:, 0]])  # (B, T − 1)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def stand_in_row(lm, key, logp, length, width):
    """Register one sequence (prompt + `length` completion tokens, padded to `width`) whose response
    log-prob is logp."""
    per_token = torch.zeros(width - 1, dtype=torch.float64)
    per_token[PROMPT - 1 : PROMPT - 1 + length] = logp / length  # position t − 1 predicts token t
    lm.rows[key] = per_token
    ids = torch.full((width,), key)
    completion = torch.zeros(width, dtype=torch.long)
    completion[PROMPT : PROMPT + length] = 1
    return ids, completion


def trainer_self(**attrs):
    """The attributes TRL's loss methods read from `self`, with one process and no logging side
    effects."""
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        precompute_ref_logps=True,
        ref_model=None,
        **attrs,
    )


def trl_dpo(loss_type, beta, eps, pc, pr, rc, rr, len_c, len_r):
    """trl.DPOTrainer._compute_loss on one pair: chosen and rejected rows with the given response
    lengths."""
    from trl import DPOTrainer

    me = trainer_self(
        beta=beta,
        label_smoothing=eps,
        loss_types=[loss_type],
        loss_weights=[1.0],
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
    )
    lm = StandInLM({})
    width = PROMPT + max(len_c, len_r)
    (ic, mc), (ir, mr) = (
        stand_in_row(lm, 1, pc, len_c, width),
        stand_in_row(lm, 2, pr, len_r, width),
    )
    inputs = dict(
        input_ids=torch.stack([ic, ir]),
        attention_mask=torch.ones(2, width, dtype=torch.long),
        completion_mask=torch.stack([mc, mr]),
        ref_chosen_logps=torch.tensor([rc], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([rr], dtype=torch.float64),
    )
    return DPOTrainer._compute_loss(me, lm, inputs, False).item()


def trl_cpo(loss_type, beta, eps, gamma, chosen, rejected):
    """trl.experimental.cpo.CPOTrainer.cpo_loss (reference-free: its 'logits' are chosen −
    rejected), per example."""
    from trl.experimental.cpo import CPOTrainer

    me = trainer_self(
        alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta, label_smoothing=eps
    )
    return CPOTrainer.cpo_loss(me, chosen, rejected)[0]


def trl_orpo(lam, chosen_mean, rejected_mean):
    """−trl.experimental.orpo.ORPOTrainer.odds_ratio_loss: λ·(−log σ(log odds ratio)), per example
    (no NLL)."""
    from trl.experimental.orpo import ORPOTrainer

    return -ORPOTrainer.odds_ratio_loss(trainer_self(beta=lam), chosen_mean, rejected_mean)[0]


def trl_kto(beta, desirable, pol, ref, kl_pol, kl_ref, length):
    """trl.KTOTrainer._compute_loss on one unpaired example and one mismatched (KL) row."""
    from trl import KTOTrainer

    me = trainer_self(
        beta=beta, calculate_KL=True, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0
    )
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    lm = StandInLM({})
    width = PROMPT + length
    (i, m), (ik, mk) = (
        stand_in_row(lm, 1, pol, length, width),
        stand_in_row(lm, 2, kl_pol, length, width),
    )
    batch = dict(
        input_ids=i[None],
        attention_mask=torch.ones(1, width, dtype=torch.long),
        completion_mask=m[None],
        label=torch.tensor([desirable]),
        KL_input_ids=ik[None],
        KL_attention_mask=torch.ones(1, width, dtype=torch.long),
        KL_completion_mask=mk[None],
        ref_logps=torch.tensor([ref], dtype=torch.float64),
        ref_KL_logps=torch.tensor([kl_ref], dtype=torch.float64),
    )
    return KTOTrainer._compute_loss(me, lm, batch, False).item()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/bench_dpo_family.py", description=summary(__doc__))
    parser.add_argument(
        "--pairs", type=positive_int, default=256, help="random examples per kind (default 256)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import trl
    except ImportError:
        raise SystemExit(
            "error: TRL is not installed here; run this with the venv named in the docstring"
        ) from None
    print(f"machine: {machine.isa_line()}")
    g = torch.Generator().manual_seed(args.seed)
    n = args.pairs
    pc, pr = (
        -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1,
        -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1,
    )
    rc = pc + 2 * torch.randn(n, generator=g, dtype=torch.float64)
    rr = pr + 2 * torch.randn(n, generator=g, dtype=torch.float64)
    len_c, len_r = torch.randint(1, 12, (n,), generator=g), torch.randint(1, 12, (n,), generator=g)
    beta, eps, gamma, lam = 0.3, 0.2, 0.5, 0.1
    print(
        f"TRL {trl.__version__}, torch {torch.__version__}; {n} random examples, float64, β = "
        f"{beta}, ε = {eps}, "
        f"γ = {gamma}, λ = {lam}"
    )

    rows = []

    def compare(kind, ours, theirs, trl_name, convention):
        delta = (ours - torch.as_tensor(theirs, dtype=torch.float64)).abs().max().item()
        rows.append((kind, trl_name, delta, convention))

    def each(fn, *cols):
        return torch.tensor([fn(*(c[i] for c in cols)) for i in range(n)], dtype=torch.float64)  # noqa: E731

    f = lambda v: float(v)  # noqa: E731
    same = {
        "dpo": "same formula",
        "rdpo": "same formula; ε = label_smoothing must be in [0, 0.5) in both",
        "ipo": "same formula at 1-token responses; τ = beta",
        "hinge": "same formula; SLiC-HF's own hinge has no reference model and a margin δ (here δ "
        "= 1/β, × β)",
    }
    for kind, loss_type, kw in (
        ("dpo", "sigmoid", {}),
        ("rdpo", "robust", dict(label_smoothing=eps)),
        ("ipo", "ipo", {}),
        ("hinge", "hinge", {}),
    ):
        ours = preference_loss(kind, pc, pr, rc, rr, beta, **kw)
        theirs = each(
            lambda a, b, c, d: trl_dpo(
                loss_type, beta, kw.get("label_smoothing", 0.0), f(a), f(b), f(c), f(d), 1, 1
            ),
            pc,
            pr,
            rc,
            rr,
        )
        compare(kind, ours, theirs, f"DPOTrainer loss_type='{loss_type}'", same[kind])
    ours_ipo = preference_loss("ipo", pc / len_c, pr / len_r, rc / len_c, rr / len_r, beta)
    theirs = each(
        lambda a, b, c, d, lc, lr: trl_dpo(
            "ipo", beta, 0.0, f(a), f(b), f(c), f(d), int(lc), int(lr)
        ),
        pc,
        pr,
        rc,
        rr,
        len_c,
        len_r,
    )
    compare(
        "ipo",
        ours_ipo,
        theirs,
        "DPOTrainer loss_type='ipo', 1–11 tokens",
        "TRL divides each log-ratio by its response's token count (ours: pass per-token means to "
        "match)",
    )
    ours = preference_loss("dpo", pc, pr, rc, rr, beta)
    theirs = each(
        lambda a, b, c, d: trl_dpo("sigmoid", beta, eps, f(a), f(b), f(c), f(d), 1, 1),
        pc,
        pr,
        rc,
        rr,
    )
    compare(
        "dpo",
        ours,
        theirs,
        f"DPOTrainer 'sigmoid', label_smoothing={eps}",
        "TRL 1.16's 'sigmoid' ignores label_smoothing: DPOTrainer has no cDPO",
    )
    compare(
        "cdpo",
        preference_loss("cdpo", pc, pr, rc, rr, beta, label_smoothing=eps),
        trl_cpo("sigmoid", beta, eps, 0.0, pc - rc, pr - rr),
        f"CPOTrainer.cpo_loss 'sigmoid', label_smoothing={eps}",
        "cDPO's formula lives in CPOTrainer (reference-free): fed log-ratios it is cDPO",
    )
    mean_c, mean_r = pc / len_c, pr / len_r
    compare(
        "simpo",
        preference_loss("simpo", mean_c, mean_r, 0.0, 0.0, beta, gamma=gamma),
        trl_cpo("simpo", beta, 0.0, gamma, mean_c, mean_r),
        "CPOTrainer.cpo_loss 'simpo'",
        "CPOTrainer adds cpo_alpha·NLL(y_w), cpo_alpha = 1.0 by default (eq. (6) has none: set 0)",
    )
    compare(
        "orpo",
        orpo_loss(mean_c, mean_r, lam, chosen_nll=torch.zeros(n)),
        trl_orpo(lam, mean_c, mean_r),
        "ORPOTrainer.odds_ratio_loss (λ = ORPOConfig.beta)",
        "TRL casts to float32; its NLL counts prompt tokens and is a token mean over the batch",
    )
    desirable = torch.rand(n, generator=g) < 0.5
    kl_pol = -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1
    kl_ref = kl_pol + 2 * torch.randn(n, generator=g, dtype=torch.float64)
    ours = torch.stack(
        [
            kto_loss(
                pc[i],
                rc[i],
                desirable[i],
                beta,
                kto_reference_point(kl_pol[i : i + 1], kl_ref[i : i + 1]),
            )
            for i in range(n)
        ]
    )
    theirs = each(
        lambda d, a, c, kp, kr, lc: trl_kto(beta, bool(d), f(a), f(c), f(kp), f(kr), int(lc)),
        desirable,
        pc,
        rc,
        kl_pol,
        kl_ref,
        len_c,
    )
    compare(
        "kto",
        ours,
        theirs,
        "KTOTrainer._compute_loss",
        "same; z₀ = clamp(mean over the batch's mismatched rows, 0), detached, as the paper",
    )

    print("\n| kind | TRL's implementation | max \\|Δ\\| | convention |\n|---|---|---:|---|")
    for kind, name, delta, convention in rows:
        print(f"| {kind} | {name} | {delta:.1e} | {convention} |")
    worst = max(d for k, name, d, c in rows if "ignores" not in c)
    print(f"\nlargest |Δ| where the formulas agree: {worst:.1e} (goal 1e-6)")


if __name__ == "__main__":
    run(main)
