"""Without CUDA, Triton kernels run in the interpreter: set it before oapl_kernels is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The training-loop tests' fixtures (tiny model, the shared vLLM engine).
pytest_plugins = ["conftest_loop"]


import pytest  # noqa: E402

# Every op is tested on each path: the chunked PyTorch one, and the Triton kernels with the
# logits tiles computed in-kernel ("tile") or read from a GEMM's workspace ("gemm").
IMPL_PARAMS = ["torch", "triton-gemm", "triton-tile"]


@pytest.fixture(params=IMPL_PARAMS)
def impl(request, monkeypatch):
    """The ``impl`` argument for an op, with OAPL_LOGITS set for the Triton variants."""
    if request.param == "torch":
        return "torch"
    monkeypatch.setenv("OAPL_LOGITS", request.param.split("-")[1])
    return "triton"
