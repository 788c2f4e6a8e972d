"""Triton kernels (forward statistics, logits-gradient tiles) and their host-side launchers."""
from .launch import backward, forward_stats, interpreting

__all__ = ["backward", "forward_stats", "interpreting"]
