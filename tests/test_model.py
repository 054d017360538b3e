"""The classic MNIST CNN: output shapes in both memory formats, size, and dropout only in training mode."""

from __future__ import annotations

import pytest
import torch

from dist_mnist.model import MnistCNN


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_logits_shape(batch: int, channels_last: bool) -> None:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = MnistCNN().to(memory_format=memory_format)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=memory_format)
    assert model(x).shape == (batch, 10)


def test_channels_last_computes_the_same_logits() -> None:
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_classic_architecture_size() -> None:
    # conv1 320 + conv2 18,496 + fc1 1,179,776 + fc2 1,290: the pytorch/examples network.
    assert sum(p.numel() for p in MnistCNN().parameters()) == 1_199_882


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = MnistCNN()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
