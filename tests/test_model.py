"""The classic MNIST CNN: output shapes in both memory formats, size, dropout only in training mode, the same
function as pytorch/examples' network, and NHWC from the first convolution on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gradient

from dist_mnist.data import normalize
from dist_mnist.model import MnistCNN
from dist_mnist.profiling import flops_per_sample
from dist_mnist.train import SpeedSettings, make_model


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


def _examples_forward(model: MnistCNN, x: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' forward, in its own order: conv2, its bias and ReLU, then the max-pool."""
    x = F.relu(model.conv1(x))
    x = F.max_pool2d(F.relu(model.conv2(x)), 2)
    x = torch.flatten(model.dropout1(x), 1)
    return model.fc2(model.dropout2(F.relu(model.fc1(x))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_bias_and_relu_after_the_pool_are_the_examples_network(channels_last: bool) -> None:
    """The same logits and gradients in fp32, up to where the bias is rounded in (oneDNN fuses it into the
    convolution's sums; NHWC here came out bit for bit equal)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = MnistCNN().to(memory_format=memory_format).eval()  # eval: no dropout masks to match
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (16,))
    grads = []
    for forward in (_examples_forward, MnistCNN.forward):
        model.zero_grad()
        logits = forward(model, x)
        F.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), [gradient(p).clone() for p in model.parameters()]))
    (expected, expected_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_normalized_batches_are_nhwc_for_conv1_too() -> None:
    """One channel makes NCHW and NHWC the same bytes; only the strides choose conv1's layout, and with
    channels_last its input must be NHWC like every other activation (`contiguous(memory_format=channels_last)`
    leaves NCHW's strides), with the same values."""
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    nhwc, nchw = (normalize(images, torch.device("cpu"), channels_last) for channels_last in (True, False))
    assert nhwc.stride() == (784, 1, 28, 1) and nchw.stride() == (784, 784, 28, 1)
    assert torch.equal(nhwc, nchw)
    assert nchw.contiguous(memory_format=torch.channels_last).stride() == nchw.stride()


@pytest.mark.parametrize("channels_last", [True, False])
def test_every_weight_has_the_strides_of_its_gradient(channels_last: bool) -> None:
    """DDP's gradient buckets are views with each parameter's strides, and a gradient with others is copied at every
    step with a warning: conv1's weight (one input channel, so NCHW and NHWC strides are both valid for it) must
    take the layout its convolution answers in."""
    settings = SpeedSettings(amp_dtype=torch.bfloat16, channels_last=channels_last, data_on_device=False)
    model = make_model(settings, torch.device("cpu"))
    x = normalize(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.device("cpu"), channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    F.cross_entropy(y, torch.zeros(4, dtype=torch.long)).backward()
    assert model.conv1(x).is_contiguous(memory_format=torch.channels_last if channels_last
                                        else torch.contiguous_format)
    assert {name: gradient(p).stride() for name, p in model.named_parameters()} == \
        {name: p.stride() for name, p in model.named_parameters()}


def test_flops_per_sample_are_counted_on_the_meta_device_as_a_real_pass_counts_them() -> None:
    """The same count as a real forward and backward of the model (the pytorch/examples CNN: 71.6 MFLOP a sample),
    without running one: the model's weights and gradients are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MnistCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.zeros(4, 1, 28, 28)), torch.zeros(4, dtype=torch.long)).backward()
    real = counter.get_total_flops() / 4
    model.zero_grad(set_to_none=True)
    assert flops_per_sample(model) == real == 71_565_312
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_activations_after_the_pool_stay_in_the_autocast_dtype() -> None:
    """The bias added after the pool is an fp32 parameter and `+` is no autocast op: added as it is, it would turn
    the add, the ReLU, dropout and their backward into fp32 work between two bf16 layers."""
    model = MnistCNN()
    dtypes: list[torch.dtype] = []
    model.dropout1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 1, 28, 28))
    logits.float().sum().backward()
    assert dtypes == [torch.bfloat16]
    assert model.conv2.bias is not None and model.conv2.bias.grad is not None
    assert model.conv2.bias.grad.dtype == torch.float32  # the parameter and its gradient stay fp32
