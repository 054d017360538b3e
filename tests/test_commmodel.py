"""The all-reduce model of docs/cluster.md: its bytes, its table (the doc holds exactly what the code prints) and the
measurement it takes from this machine."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from dist_mnist import commmodel
from dist_mnist.model import MnistCNN

PARAMETERS = 1_199_882


def test_cluster_doc_holds_exactly_the_tables_the_model_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert commmodel.main([]) == 0
    printed = capsys.readouterr().out
    doc = (REPO / "docs" / "cluster.md").read_text()
    match = re.search(r"<!-- python -m dist_mnist.commmodel: begin -->\n(.*)\n<!-- python -m dist_mnist.commmodel: "
                      r"end -->", doc, re.DOTALL)
    assert match, "docs/cluster.md lacks the commmodel markers"
    assert match.group(1) + "\n" == printed


def test_bytes_per_step_follow_the_layer_shapes() -> None:
    encodings = {e.name: e for e in commmodel.gradient_encodings(MnistCNN())}
    assert encodings["fp32 (no hook)"].bytes_per_step == 4 * PARAMETERS
    assert encodings["bf16 or fp16 hook"].bytes_per_step == 2 * PARAMETERS
    biases = 32 + 64 + 128 + 10
    # Rank 1: every weight goes as P and Q, (rows + columns) numbers: conv1 32 × 9, conv2 64 × 288, fc1 128 × 9216,
    # fc2 10 × 128.
    assert encodings["PowerSGD rank 1"].bytes_per_step == 4 * (biases + 41 + 352 + 9344 + 138)
    # Rank 4: conv1's (32 + 9) × 4 = 164 numbers would not halve its 288, so it goes whole.
    assert encodings["PowerSGD rank 4"].bytes_per_step == 4 * (biases + 288 + 4 * (352 + 9344 + 138))


def test_all_reduce_time_grows_with_bytes_and_flattens_with_nodes() -> None:
    fp32 = commmodel.gradient_encodings(MnistCNN())[0]
    no_latency = commmodel.Network("test", intra_bus_gbps=100.0, intra_hop_s=0.0, inter_node_gbps=1.0,
                                   inter_hop_s=0.0)
    # Bandwidth only: 2(N-1)/N of the bytes cross each node's network, plus 2(g-1)/g over NVLink.
    nvlink = 2 * 7 / 8 * fp32.bytes_per_step / 100e9
    for nodes in (1, 2, 64):
        expected = nvlink + 2 * (nodes - 1) / nodes * fp32.bytes_per_step / 1e9
        assert commmodel.allreduce_s(fp32, nodes, no_latency) == pytest.approx(expected)


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_measurement_counts_the_bytes_and_buckets_the_model_assumes() -> None:
    measured = commmodel.measure_gloo(repeats=2)
    assert measured.bytes_per_step == 4 * PARAMETERS == commmodel.MEASURED_GLOO.bytes_per_step
    assert measured.buckets == commmodel.DDP_BUCKETS == 2
    assert measured.allreduce_s > 0 and measured.small_allreduce_s > 0
