"""Gradients of a model under a strategy, and the statistic that tells a
biased code from an unbiased one.

``R = ||mean - exact||^2 / (tr Var / K)`` over K draws (fixed seeds): for an
unbiased code the squared error of the mean is the variance over K, so R is
close to 1 (a sum over thousands of gradient coordinates, each contributing
its share); a bias adds ``K ||bias||^2 / tr Var``, which grows with K.
"""

from __future__ import annotations

import torch
from torch import nn

import actpack


def model_grad(model: nn.Module, inputs: tuple, strategy) -> torch.Tensor:
    """The model's parameter gradients (float64, flat) from ``model(*inputs)``,
    exact with ``strategy=None``, else under ``compress(strategy, smooth="exact")``
    (the second-order bias of coded smooth ops is the documented trade-off of
    ``smooth="code"``, not what these tests check)."""
    model.zero_grad()
    if strategy is None:
        loss = model(*inputs)
    else:
        with actpack.compress(strategy, smooth="exact"):
            loss = model(*inputs)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def r_statistic(draws: torch.Tensor, exact: torch.Tensor) -> float:
    """R of ``draws`` (K x n) against ``exact`` (n): ~1 if unbiased."""
    k = draws.shape[0]
    mean, var = draws.mean(0), draws.var(0)
    assert var.sum() > 0  # lossy: there is noise to average
    return ((mean - exact).square().sum() / (var.sum() / k)).item()
