"""L-BFGS with a strong-Wolfe line search, to convergence, for the small float64 fits of the tabular
chapters (rewards from comparisons, logits of a policy)."""

import torch


def lbfgs_minimise(
    params, loss_fn, *, max_iter: int, tolerance_grad: float, tolerance_change: float
):
    """Minimise `loss_fn()` (a scalar of `params`, a list of tensors that require grad) in place.

    One `torch.optim.LBFGS.step` of up to `max_iter` iterations, lr 1, strong-Wolfe line search; it
    stops early when the gradient's largest entry is below `tolerance_grad` or the loss or step
    changes by less than `tolerance_change`.
    """
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
