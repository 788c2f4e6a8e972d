"""Without CUDA, Triton kernels run in the interpreter: set it before oapl_kernels is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
