"""Every knob of the kernels in one place: the workspace, rows and columns per chunk, the
forward's vocab splits and the Triton block configs. ``reference.py``, ``triton/launch.py`` and
``fused.py`` read them from here and nowhere else.

The workspace is the memory an op may use beyond its inputs, outputs, gradients and O(N)
per-token statistics. Its size comes from, in order: the environment variable
``OAPL_WORKSPACE_MB`` (an operator's override), the op's ``workspace_bytes=`` argument, and the
device default (2 GiB on CUDA, 64 MiB elsewhere). Chunks are sized from it; only the minimum
chunk (one row, or one block of columns) can exceed a workspace smaller than itself.
"""
from __future__ import annotations

import os

import torch

WORKSPACE_ENV = "OAPL_WORKSPACE_MB"
CUDA_WORKSPACE_BYTES = 2 * 2**30
CPU_WORKSPACE_BYTES = 64 * 2**20

LOGITS_ENV = "OAPL_LOGITS"  # Triton path: "gemm" (cuBLAS logits into the workspace) or "tile"
LOGITS_MODES = ("gemm", "tile")

# Triton block configs (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages): tiles for
# Hopper/Ampere tensor cores, autotuned per D when compiled.
GPU_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (64, 128, 64, 4, 4),
]
GROUP_N = 8  # row blocks per program group (L2 reuse, see kernels._grouped)
# Small tiles for the interpreter: odd shapes still cross several blocks in tests.
INTERPRETER_CONFIG = (16, 32, 16, 4, 1)
INTERPRETER_GROUP_N = 2
INTERPRETER_SPLIT_COLS = 64

# Vocab columns per forward split on the GPU: a multiple of every BLOCK_V, at most MAX so that
# programs running together share few row blocks (L2 reuse), fewer when there are few rows so
# that about PROGRAMS_PER_SM programs exist.
SPLIT_ALIGN, MIN_SPLIT_COLS, MAX_SPLIT_COLS, PROGRAMS_PER_SM = 256, 256, 4096, 4
# Smallest vocab chunk of the backward passes (columns; a multiple of every BLOCK_V on the
# Triton path) and smallest row chunk of the Triton forward in 'gemm' mode.
MIN_CHUNK_COLS = 256
MIN_FORWARD_ROWS = 16
# The torch path's logits walk (forward statistics and the fused loss): GEMMs of exactly ROW_TILE
# rows (the last tile zero-padded) and VOCAB_TILE columns, reductions over one tile row in vocab
# order, whatever N: a row's log-prob is bitwise the same whichever rows share its call. MKL's
# sgemm gives a row different bits for some small M (1-3, 5-7, 9-11 with two threads); a fixed M
# takes that away. 128 x 2048 ran within 3% of the old [N, workspace] tiles (D=576, one thread).
ROW_TILE, VOCAB_TILE = 128, 2048
# Gradient filtering (grad_filter_eps > 0, oapl_kernels.filtering): vocab blocks of FILTER_COLS
# columns on the torch path and under the Triton interpreter (a multiple of its BLOCK_V), of
# GPU_FILTER_COLS in compiled kernels (a multiple of every BLOCK_V). Narrow blocks skip more:
# on SmolLM2-135M's own distributions, chunks of 256 rows, eps 1e-4, 64-column blocks left out
# 37% of the blocks, 256-column ones 9% (docs/PERF.md).
FILTER_COLS = 64
GPU_FILTER_COLS = 256
# The fused loss keeps the dW of a sequence split across chunks in an fp32 [V, D] side buffer
# (3 GEMM-equivalents) when that buffer takes at most this share of the workspace; otherwise a
# first statistics pass over the split sequences finds their sums (4 GEMM-equivalents on their
# rows). See oapl_kernels.fused and docs/PERF.md for the measured costs.
SIDE_BUFFER_SHARE = 0.5


def workspace_bytes(device: torch.device, requested: int | None = None) -> int:
    """The workspace of one op call on ``device``, in bytes (see the module docstring).

    ``requested`` is the op's ``workspace_bytes=`` argument (None: the device default).
    """
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        size = int(float(env) * 2**20)
    elif requested is not None:
        size = int(requested)
    else:
        size = CUDA_WORKSPACE_BYTES if device.type == "cuda" else CPU_WORKSPACE_BYTES
    if size <= 0:
        raise ValueError(f"the workspace must be > 0 bytes, got {size} "
                         f"({WORKSPACE_ENV}={env!r}, workspace_bytes={requested!r})")
    return size


def logits_mode_requested() -> str:
    """'gemm' or 'tile' from OAPL_LOGITS (default 'gemm'); launch.py falls back to 'tile' where
    torch has no fp32-output GEMM for 16-bit inputs."""
    mode = os.environ.get(LOGITS_ENV, "gemm")
    if mode not in LOGITS_MODES:
        raise ValueError(f"{LOGITS_ENV} must be one of {LOGITS_MODES}, got {mode!r}")
    return mode


def chunk_rows(budget: int, bytes_per_row: int, minimum: int = 1) -> int:
    """Rows per chunk whose buffers (``bytes_per_row`` each) fit ``budget`` bytes, >= minimum."""
    return max(minimum, budget // max(bytes_per_row, 1))


def fused_plan(workspace: int, bytes_per_row: int, side_bytes: int, longest: int, fixed_bytes: int = 0,
               row_multiple: int = 1) -> tuple[int, bool]:
    """(rows per chunk, side buffer?) for the fused loss whose longest sequence has ``longest``
    rows: no side buffer when every sequence fits a chunk of the whole workspace; else one of
    ``side_bytes`` when it fits SIDE_BUFFER_SHARE of the workspace, the chunks taking the rest.
    ``fixed_bytes``: what a chunk costs whatever its rows (taken off the workspace first);
    rows are rounded down to a multiple of ``row_multiple`` when there are at least that many."""
    def rows_for(budget):
        rows = chunk_rows(budget - fixed_bytes, bytes_per_row)
        return rows // row_multiple * row_multiple if rows >= row_multiple else rows

    rows = rows_for(workspace)
    if longest <= rows or side_bytes > SIDE_BUFFER_SHARE * workspace:
        return rows, False
    return rows_for(workspace - side_bytes), True


def chunk_cols(n_rows: int, vocab: int, budget: int, bytes_per_cell: int, align: int = 1) -> int:
    """Vocab columns per chunk so that [n_rows, cols] buffers of ``bytes_per_cell`` bytes per
    element (all buffers together) fit ``budget``: at least MIN_CHUNK_COLS, a multiple of
    ``align``, at most ``vocab``."""
    cols = max(MIN_CHUNK_COLS, budget // (bytes_per_cell * max(n_rows, 1)))
    return min(vocab, -(-cols // align) * align)


def split_cols(n_rows: int, vocab: int, sms: int) -> int:
    """Vocab columns per program of the Triton forward on a GPU with ``sms`` multiprocessors."""
    splits = -(-PROGRAMS_PER_SM * sms // -(-n_rows // 128))
    cols = -(-vocab // splits)
    return min(MAX_SPLIT_COLS, max(MIN_SPLIT_COLS, -(-cols // SPLIT_ALIGN) * SPLIT_ALIGN))
