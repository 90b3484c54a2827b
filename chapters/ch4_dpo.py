"""Chapter 4 (report §4.2–§4.4; eqs (38)–(41)): the DPO loss, its gradient, and the implicit reward."""
import torch
import torch.nn.functional as F


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y | x) = Σ_t log π(y_t | x, y_<t), summed over the tokens where `response_mask` is true.

    logits (B, T, V) are the model's outputs for input_ids (B, T); response_mask (B, T) is aligned with
    input_ids. The token at position t is predicted by the logits at t − 1, hence the shift by one.
    Returns (B,).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts tokens 1..T-1
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (token_logp * response_mask[:, 1:]).sum(-1)  # (B,)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """Report eq. (38): −log σ(β·log π(y_w|x)/π_ref(y_w|x) − β·log π(y_l|x)/π_ref(y_l|x)), per example."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # implicit reward r̂(x, y_w)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # implicit reward r̂(x, y_l)
    return -F.logsigmoid(chosen - rejected)
