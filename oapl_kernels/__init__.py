"""oapl_kernels: fused linear log-probs and the OAPL loss, with Triton kernels and a chunked
PyTorch path. Imports torch and triton only.

    from oapl_kernels import linear_logprobs, optimal_values, oapl_loss
"""
from .logprobs import linear_logprobs
from .loss import LossOutput, OAPLLoss, grpo_loss, oapl_loss, optimal_values

__all__ = ["linear_logprobs", "optimal_values", "oapl_loss", "grpo_loss", "OAPLLoss", "LossOutput"]
__version__ = "0.1.0"
