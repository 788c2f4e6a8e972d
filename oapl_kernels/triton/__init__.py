"""Triton backend: kernels (forward statistics, logits-gradient tiles) and their host-side
launchers, with the same interface as :mod:`oapl_kernels.reference`."""
from .launch import FusedChunk, backward, forward_stats, interpreting

__all__ = ["FusedChunk", "backward", "forward_stats", "interpreting"]
