"""Lossless paths: gradients bit-identical to uncompressed autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack

POOLS = [
    # (dims, input spatial, kernel, stride, padding, dilation, ceil_mode)
    (1, (37,), 3, 2, 1, 1, False),
    (1, (37,), 4, 3, 0, 2, True),
    (2, (7, 9), 3, 2, 1, 1, True),
    (2, (14, 14), 2, 2, 0, 1, False),
    (2, (13, 11), (3, 2), (2, 1), (1, 0), (1, 2), True),
    (2, (33, 33), 5, 3, 2, 2, False),
    (3, (5, 6, 7), 2, 2, 1, 1, True),
    (3, (6, 6, 6), (3, 1, 2), (1, 2, 2), 0, (1, 1, 2), False),
]


@pytest.mark.parametrize("dims,size,kernel,stride,padding,dilation,ceil_mode", POOLS)
@pytest.mark.parametrize("strategy", ["actnn", "division", "bf16"])
def test_max_pool_gradient_is_exact(
    dims, size, kernel, stride, padding, dilation, ceil_mode, strategy
):
    pool = getattr(F, f"max_pool{dims}d")
    x0 = torch.randn(3, 4, *size)
    g = None
    grads, reports = [], []
    for s in ("none", strategy):
        x = x0.clone().requires_grad_()
        with actpack.compress(s, min_numel=0) as ctx:
            y = pool(x * 1, kernel, stride, padding, dilation, ceil_mode=ceil_mode)
        g = torch.randn_like(y) if g is None else g
        y.backward(g)
        grads.append(x.grad)
        reports.append(ctx.stats)
    assert torch.equal(grads[0], grads[1])
    # the int64 indices are stored as window offsets of ceil(log2(window)) bits
    assert "integer" not in reports[1].passthrough


def test_max_pool_module_with_indices_and_channels_last():
    pool = nn.MaxPool2d(3, stride=2, padding=1, return_indices=True)
    x0 = torch.randn(2, 8, 15, 15).contiguous(memory_format=torch.channels_last)
    grads = []
    for s in ("none", "actnn"):
        x = x0.clone().requires_grad_()
        with actpack.compress(s, min_numel=0):
            y, _ = pool(x * 1)
        y.backward(torch.ones_like(y))
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_max_pool_indices_take_four_bits_for_a_3x3_window():
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    with actpack.compress("actnn") as ctx:
        y = F.max_pool2d(x * 1, 3, 2, 1)
    out = y.numel()
    assert ctx.stats.by_op["max_pool2d"][0] == x.numel() * 4 + out * 8
    coded_input = ctx.stats.by_op["max_pool2d"][1] - out * 4 // 8
    assert coded_input == actpack.ActNN().encode(x.detach(), actpack.SaveInfo()).nbytes


@pytest.mark.parametrize("strategy", ["actnn", "division"])
def test_dropout_gradient_is_exact(strategy):
    x0 = torch.randn(8, 64, 32)
    grads = []
    for s in ("none", strategy):
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        with actpack.compress(s, min_numel=0) as ctx:
            y = nn.Dropout(0.3)(x * 1)
            z = F.dropout(y, 0.2)
        z.backward(torch.ones_like(z))
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert "integer" not in ctx.stats.passthrough and "tiny" not in ctx.stats.passthrough


def test_embedding_ids_are_narrowed_losslessly():
    emb = nn.Embedding(1000, 16)
    ids = torch.randint(0, 1000, (8, 512))
    grads = []
    for s in ("none", "actnn"):
        emb.zero_grad()
        with actpack.compress(s) as ctx:
            out = emb(ids)
        out.backward(torch.ones_like(out))
        grads.append(emb.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert ctx.stats.by_op["embedding"] == [ids.numel() * 8, ids.numel() * 2]  # int64 -> int16


def test_gather_index_is_narrowed_losslessly():
    x0 = torch.randn(16, 200)
    idx = torch.randint(0, 200, (16, 300))
    grads = []
    for s in ("none", "actnn"):
        x = x0.clone().requires_grad_()
        with actpack.compress(s) as ctx:
            y = torch.gather(x * 1, 1, idx)
        y.backward(torch.ones_like(y))
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert ctx.stats.passthrough.get("integer", 0) == 0


def test_log_softmax_codes_probabilities_so_its_gradient_is_unbiased():
    logits0 = torch.randn(64, 512) * 3
    target = torch.randint(0, 512, (64,))
    logits = logits0.clone().requires_grad_()
    F.cross_entropy(logits * 1, target).backward()
    exact = logits.grad.double()
    draws = []
    for seed in range(32):
        logits = logits0.clone().requires_grad_()
        with actpack.compress(actpack.ActNN(seed=seed)):
            loss = F.cross_entropy(logits * 1, target)
        loss.backward()
        draws.append(logits.grad.double())
    d = torch.stack(draws)
    mean, std = d.mean(0), d.std(0)
    noisy = std > 0
    z = (mean - exact)[noisy] / (std[noisy] / len(draws) ** 0.5)
    # Student t with 31 dof: E[z^2] = 31/29; a code of the log-probabilities
    # instead gives a gradient biased by exp(noise) (E[z^2] in the hundreds).
    assert (z**2).mean() < 1.5
