"""Newton's method for small smooth losses of one flat parameter vector (tabular policies: tens of
parameters)."""

import torch


def newton_minimise(loss_fn, x0: torch.Tensor, max_iter: int = 50) -> torch.Tensor:
    """Minimise loss_fn(x) from x0 (P,) by Newton steps with a backtracking line search; returns x
    (P,).

    Hessian eigenvalues are taken as |λ|, so every step goes downhill even where the loss is not
    convex, and directions with λ ≈ 0 (a shift no loss sees, like θ[x] + c under a softmax) are left
    out. Stops when the largest gradient entry is below 1e-14, or after max_iter steps (a minimiser
    at infinity is never reached).
    """
    x = x0
    for _ in range(max_iter):
        flat = x.clone().requires_grad_(True)
        loss = loss_fn(flat)
        (grad,) = torch.autograd.grad(loss, flat)
        if grad.abs().max() < 1e-14:
            break
        hessian = torch.autograd.functional.hessian(loss_fn, x, vectorize=True)  # (P, P)
        eigval, eigvec = torch.linalg.eigh(hessian)
        keep = eigval.abs() > 1e-12 * eigval.abs().max()  # drop the directions no loss sees
        step = eigvec[:, keep] @ (
            (eigvec[:, keep].T @ grad) / eigval[keep].abs()
        )  # |λ|: always downhill
        t = 1.0
        while loss_fn(x - t * step) > loss - 1e-4 * t * (grad @ step) and t > 1e-8:
            t /= 2
        x = x - t * step
    return x
