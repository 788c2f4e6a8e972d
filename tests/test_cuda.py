"""Every Triton kernel compiled and run on a CUDA device, against float64 (materialized logits)
or, where that does not fit, the torch path: ``pytest -m cuda`` on a GPU machine. The same
checks as benchmarks/gpu_suite.py (both call benchmarks.common); skipped without CUDA."""
import pytest
import torch

from benchmarks.common import logprobs_check, loss_check
from oapl_kernels import tuning

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mode", tuning.LOGITS_MODES)
@pytest.mark.parametrize("n,d,v,dtype", [
    (1, 64, 1000, torch.bfloat16), (257, 128, 5003, torch.bfloat16), (1000, 96, 32771, torch.bfloat16),
    (257, 128, 5003, torch.float16), (257, 128, 5003, torch.float32), (4096, 4096, 151936, torch.bfloat16),
])
def test_linear_logprobs_compiled(mode, n, d, v, dtype, monkeypatch):
    """Forward statistics and logits-gradient kernels, reading stored logits ('gemm') or
    computing the tiles in-kernel ('tile'), with and without the entropy terms."""
    monkeypatch.setenv(tuning.LOGITS_ENV, mode)
    row = logprobs_check(n, d, v, dtype)
    assert row["ok"], row


@pytest.mark.parametrize("b,t,d,v,workspace", [
    (64, 96, 1024, 32003, None),  # whole sequences per chunk
    (8, 2048, 512, 32003, 2**27),  # ~700 rows per chunk: every completion split across chunks
])
def test_oapl_loss_compiled(b, t, d, v, workspace):
    rows = loss_check(b, t, d, v, workspace_bytes=workspace)
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
