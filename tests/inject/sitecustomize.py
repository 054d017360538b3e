"""Test-only delay injection, loaded by Python at start-up when this folder is first on PYTHONPATH.

DIST_MNIST_TEST_DELAY="RANK:PHASE:SECONDS" (RANK a number or "all"; PHASE "data" or "backward") makes that rank
of a `launch/train.py` process sleep for SECONDS in every training batch fetch, or in every backward pass (a
gradient hook on the first layer, whose gradient autograd computes last). The product code knows nothing of it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any


def _install(phase: str, seconds: float) -> None:
    if phase == "data":
        from dist_mnist.data import ResumableBatchSampler

        original = ResumableBatchSampler.__iter__

        def slow_iter(self: ResumableBatchSampler) -> Iterator[list[int]]:
            for batch in original(self):
                time.sleep(seconds)
                yield batch

        ResumableBatchSampler.__iter__ = slow_iter  # type: ignore[method-assign]
    elif phase == "backward":
        from dist_mnist.model import MnistCNN

        original_init = MnistCNN.__init__

        def init(self: MnistCNN, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.conv1.weight.register_hook(lambda grad: time.sleep(seconds))

        MnistCNN.__init__ = init  # type: ignore[method-assign]
    else:
        raise ValueError(f"DIST_MNIST_TEST_DELAY: unknown phase {phase!r}")


_spec = os.environ.get("DIST_MNIST_TEST_DELAY")
# Only in training processes (not torchrun's agent), and only on the rank named.
if _spec and any(arg.endswith("train.py") for arg in sys.argv):
    _rank, _phase, _seconds = _spec.split(":")
    if _rank in ("all", os.environ.get("RANK", "0")):
        _install(_phase, float(_seconds))
