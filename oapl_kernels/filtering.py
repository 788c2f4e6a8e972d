"""Gradient filtering: which vocab blocks of a chunk's logits gradient are worth the GEMMs.

The logits' gradient is dz_nv = g_n (1[v = y_n] - p_nv) (- e_n p_nv (z_nv - E_n) with an entropy
term), so a block of columns whose softmax probabilities p are all below ``eps`` for every row
of the chunk contributes at most ``eps`` per element times |g| to dH = dz W and dW = dz^T H.
With ``grad_filter_eps = eps > 0`` the backends compute p for the whole chunk (the logits GEMM is
needed for that anyway) and run the two gradient GEMMs on the kept blocks only; a block that
holds some row's target is always kept (its dz is g (1 - p), not small). ``eps = 0`` keeps
every block and runs the unfiltered code: exact, bit for bit as without filtering.

Blocks are ``block`` columns wide, aligned to absolute vocab ids (a chunk starts at a multiple
of ``block``), so the decision for a block does not depend on how the vocabulary is chunked.

``count()`` collects how many blocks the calls inside it saw and skipped (for measurements).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Counts:
    """Blocks seen and skipped (row chunks x vocab blocks) by the filtered calls in a ``count()``."""

    blocks: int = 0
    skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.blocks if self.blocks else 0.0


_ACTIVE: list[Counts] = []


@contextlib.contextmanager
def count():
    """Context manager yielding a :class:`Counts` filled by the filtered backward passes inside it."""
    counts = Counts()
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)


def check_eps(eps: float) -> float:
    """``eps`` as a float in [0, 1); ValueError naming grad_filter_eps otherwise."""
    if not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < 1.0:
        raise ValueError(f"grad_filter_eps must be a number in [0, 1), got {eps!r}")
    return float(eps)


def block_max(col_max: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of ``block`` consecutive columns, the max of col_max [W] (fp32) -> [cdiv(W, block)]."""
    width = col_max.shape[0]
    n_blocks = -(-width // block)
    padded = col_max.new_zeros(n_blocks * block)
    padded[:width] = col_max
    return padded.view(n_blocks, block).amax(dim=1)


def kept_columns(blocks_max: torch.Tensor, targets: torch.Tensor, v0: int, width: int, block: int,
                 eps: float) -> torch.Tensor | None:
    """Columns (int64, relative to v0, ascending) of the chunk [v0, v0 + width) to keep, or None
    when every block is kept.

    blocks_max: fp32 [cdiv(width, block)], the largest softmax probability of each block over the
    chunk's rows; targets: int64 [C] of those rows (-1: none). v0 is a multiple of ``block``.
    """
    keep = blocks_max >= eps
    local = targets[(targets >= v0) & (targets < v0 + width)] - v0
    keep[local // block] = True
    skipped = int((~keep).sum())
    for counts in _ACTIVE:
        counts.blocks += keep.numel()
        counts.skipped += skipped
    if not skipped:
        return None
    cols = (keep.nonzero() * block + torch.arange(block, device=keep.device)).reshape(-1)
    return cols[cols < width]
