"""Small models shared by the gradient tests (conv, BatchNorm, ReLU, max-pool, linear)."""

import pytest
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_gpt2_config():
    """An HF GPT-2 config built locally (nothing downloaded): 2 layers of
    width 64, 4 heads, a 128-token vocabulary, 64 positions, no dropout;
    skips the test where transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
