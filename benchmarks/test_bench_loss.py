"""pytest-benchmark suite for ``oapl_loss`` forward + backward against a naive materialized OAPL
loss and its torch.compile version (see test_bench_logprobs for the modes)."""
from __future__ import annotations

from .common import bench_case, pytest_generate_tests

__all__ = ["pytest_generate_tests"]  # parametrizes shape and impl (see common)


def test_oapl_fwdbwd(benchmark, request, shape, impl):
    """oapl_loss forward + backward (loss, dH, dW) per impl, group size 4, a masked prompt prefix."""
    bench_case(benchmark, request, "oapl_fwdbwd", impl, shape)
