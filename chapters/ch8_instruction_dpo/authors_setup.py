"""Report §6.2 as its authors ran it (giovanni-br/DPO-Implementation): each of their mistakes as one
switch.

`AuthorsSetup()` is this project's pipeline; `AuthorsSetup.authors()` switches every mistake on;
`ladder()` switches them off one at a time, cumulatively, from the authors' setup back to ours. Each
switch names one mistake, checked against the authors' code (line references in the README's chapter
8 section):

- `unshifted`: log-probs not shifted, log_softmax(logits_t)[token_t]
  (`chapters.ch4_dpo.unshifted_logprobs`);
- `hide_response`: the attention mask is 0 on the response, so no response token is read;
- `prompt_inside`: log π(y|x) scores every position, prompt and padding too;
- `token_mean`: a mean over those positions instead of a sum;
- `sft_all_tokens`: the SFT loss covers prompt and padding (their labels = input_ids, pad = EOS);
- `reference_grad`: the reference runs without `torch.no_grad` (a graph and gradients it never
  uses);
- `reference_base`: their notebook's roles: the policy starts from the SFT model, the reference is
  the *base* model (`ref_model_name="gpt2-medium"`), so the first DPO loss is not ln 2;
- `continue_beta`: the β sweep keeps training one model, β after β;
- `eval_whole_data`: the evaluation prompts are drawn from the whole data set, training entries
  included;
- `tie_loses`: a tie between the two cosine similarities scores 0 instead of ½
  (`win_rates.win_scores(..., tie=0)`).

The log-prob switches reuse chapter 4's `response_logprobs` and `unshifted_logprobs`, the two
functions whose tests show what each mistake does; nothing of theirs is re-implemented here.
"""

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from chapters.ch4_dpo.loss import dpo_loss, dpo_metrics, response_logprobs, unshifted_logprobs
from chapters.ch8_instruction_dpo.dpo_step import head_logprobs, sequence_logprobs, token_kl
from chapters.ch8_instruction_dpo.trainers import dpo_step
from chapters.common.rows import packed_pairs_batch, pair_rows

EVAL_SAMPLE = 100  # their evaluation.py's default `subset_size` (500 in an earlier commit)


@dataclass(frozen=True)
class AuthorsSetup:
    """Which of the authors' mistakes are switched on (all off: this project's pipeline)."""

    unshifted: bool = False
    hide_response: bool = False
    prompt_inside: bool = False
    token_mean: bool = False
    sft_all_tokens: bool = False
    reference_grad: bool = False
    reference_base: bool = False
    continue_beta: bool = False
    eval_whole_data: bool = False
    tie_loses: bool = False

    @classmethod
    def authors(cls) -> "AuthorsSetup":
        return cls(**{f.name: True for f in fields(cls)})

    @property
    def on(self) -> list:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @property
    def plain_logprobs(self) -> bool:
        """Whether log π needs the plain layout (full logits, live reference) instead of the fast
        cached step."""
        return (
            self.unshifted
            or self.hide_response
            or self.prompt_inside
            or self.token_mean
            or self.reference_grad
        )


# the fix of each switch, in the order the ladder applies them
FIXES = {
    "unshifted": "log-probs shifted",
    "hide_response": "response attended",
    "prompt_inside": "response tokens only in log π",
    "token_mean": "sum over tokens",
    "sft_all_tokens": "SFT on response tokens",
    "reference_grad": "reference under no_grad",
    "reference_base": "reference = SFT",
    "continue_beta": "each β from SFT",
    "eval_whole_data": "held-out test prompts",
    "tie_loses": "tie = ½",
}


def ladder() -> list:
    """[(rung name, setup)]: the authors' setup, then one more mistake fixed per rung; the last rung
    is ours."""
    setup = AuthorsSetup.authors()
    rungs = [("authors' setup", setup)]
    for name, fix in FIXES.items():
        setup = replace(setup, **{name: False})
        rungs.append((f"+ {fix}", setup))
    return rungs


def variant_logprobs(
    model, ids, attention_mask, response_mask, setup: AuthorsSetup
) -> torch.Tensor:
    """log π(y | x) of rows [prompt, response, padding] as `setup` computes it: (R,).

    All switches off, this is report eq. (38)'s Σ_t log π(y_t | x, y_<t) over the response (ch4's
    `response_logprobs`). `hide_response` reads the rows with the attention mask zeroed on the
    response; `prompt_inside` scores every position; `token_mean` divides by the number of positions
    scored; `unshifted` scores each token with the logits at its own position (ch4's
    `unshifted_logprobs`).
    """
    mask = (
        attention_mask * ~response_mask.bool() if setup.hide_response else attention_mask
    )  # theirs: 0 on the response
    logits = model(ids, mask)  # (R, T, V)
    scored = (
        torch.ones_like(response_mask, dtype=torch.bool)
        if setup.prompt_inside
        else response_mask.bool()
    )
    if not setup.unshifted:
        if setup.prompt_inside:
            scored[:, 0] = False  # position 0 has no predictor once the log-probs are shifted
        return response_logprobs(logits, ids, scored, per_token_mean=setup.token_mean)
    total = unshifted_logprobs(logits, ids, scored)
    return total / scored.sum(-1) if setup.token_mean else total


def authors_sft_loss(model, batch):
    """Their SFT loss: Hugging Face's shifted cross-entropy with labels = input_ids, i.e. the mean
    of −log π(x_t | x_<t) over every position t ≥ 1 of the right-padded rows, prompt and padding
    (EOS) included."""
    logits = model(batch.input_ids, batch.attention_mask)  # (R, T, V)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)),
        batch.input_ids[:, 1:].reshape(-1),
    )


def make_dpo_step(setup: AuthorsSetup, reference):
    """A `dpo_training.train_dpo` step for `setup`: `dpo_training.dpo_step` itself when no log-prob
    switch is on; otherwise eq. (38) on `variant_logprobs` of policy and live `reference` (under
    no_grad unless `reference_grad`). The token-level KL is always the correct one, over response
    tokens, from the cache."""
    if not setup.plain_logprobs:
        return dpo_step

    def step(policy, pairs, idx, cache, beta, device, pad_id):
        batch = [pairs[i] for i in idx]
        ids, att, resp = (t.to(device) for t in pair_rows(batch, pad_id))  # (2B, T)
        B = len(batch)
        logps = variant_logprobs(policy, ids, att, resp, setup)  # (2B,)
        with torch.set_grad_enabled(setup.reference_grad and torch.is_grad_enabled()):
            ref = variant_logprobs(reference, ids, att, resp, setup)  # (2B,)
        losses = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)
        with torch.no_grad():
            metrics = dpo_metrics(logps[:B], logps[B:], ref[:B], ref[B:], beta)
            *_, ref_h = cache.get(idx)
            _, logp = sequence_logprobs(policy, packed_pairs_batch(batch, pad_id).to(device))
            metrics["kl"] = (
                token_kl(logp, head_logprobs(ref_h.to(device), cache.head_weight)).mean().item()
            )
        return losses.mean(), metrics

    return step


def evaluation_indices(n_entries: int, test_indices, setup: AuthorsSetup, seed: int) -> list:
    """The entries whose prompts are evaluated: the held-out test split, or (`eval_whole_data`)
    `EVAL_SAMPLE` entries drawn from the whole data set as their `np.random.choice(data, ...,
    replace=False)` does (seeded here)."""
    if not setup.eval_whole_data:
        return list(test_indices)
    return sorted(
        np.random.default_rng(seed)
        .choice(n_entries, size=min(EVAL_SAMPLE, n_entries), replace=False)
        .tolist()
    )
