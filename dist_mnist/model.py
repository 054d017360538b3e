"""Networks: the classic MNIST CNN of pytorch/examples."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class MnistCNN(nn.Module):
    """conv 1->32->64 (3x3), max-pool, dropout 0.25, fc 9216->128, dropout 0.5, fc 128->10; returns logits.

    The parameters and the function are pytorch/examples', but the second convolution's bias and ReLU come after
    the 2x2 max-pool, on a quarter of the values: a per-channel constant and a monotone function both commute with
    a max, so the output is the same up to where the bias is rounded in (tests/test_model.py), and the bias add,
    the ReLU, their backward and the bias gradient's sum no longer run over the network's largest activation. In
    the H200's batch-512 step those four took 13% of the GPU time; on the 2-core CPU the reordered step is faster
    too (docs/benchmarks.md, "The step's layout and order"). Under bf16 autocast the bias is rounded to bf16, as
    autocast rounds a convolution's, and the difference is where the add is rounded: the convolution fused its bias
    (oneDNN on CPU; PyTorch adds cuDNN's in a kernel of its own anyway).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.conv2d(x, self.conv2.weight), 2)  # = max_pool2d(relu(conv2(x))) before bias and ReLU
        # nn.Conv2d types its bias as optional; conv2 has one (bias=True, the default). A cast costs the step nothing.
        bias = cast(torch.Tensor, self.conv2.bias)
        # In the activations' dtype, as autocast casts a convolution's bias: `+` is no autocast op, so an fp32 bias
        # would promote the add, the ReLU, dropout and their backward to fp32 until fc1 casts back.
        x = F.relu(x + bias.to(x.dtype).view(1, -1, 1, 1))
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)
