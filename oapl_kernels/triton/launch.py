"""Host side of the Triton path: block-size configs, grids, split merging and the backward GEMMs.

Two ways to get the logits tiles, chosen by ``logits_mode()``:

* ``"tile"``: the kernels compute every tile with ``tl.dot`` and no logits exist in memory at
  all (zero workspace beyond O(N) statistics).
* ``"gemm"``: a cuBLAS GEMM writes a bounded chunk of raw fp32 logits into the workspace and
  the kernels read it (one memory pass each). Faster on GPUs where cuBLAS beats Triton's GEMM.

``FusedChunk`` is this backend's body of the fused loss (:mod:`oapl_kernels.fused`). Block
configs, split widths and chunk sizes come from :mod:`oapl_kernels.tuning`.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from .. import filtering, tuning
from .kernels import dlogits_kernel, fwd_stats_kernel


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def logits_mode(device: torch.device) -> str:
    """'gemm' or 'tile' (env OAPL_LOGITS, see tuning); 'tile' where torch has no fp32-output GEMM."""
    mode = tuning.logits_mode_requested()
    if mode == "gemm" and device.type == "cuda" and not _fp32_output_gemm(device):
        return "tile"
    return mode


@functools.lru_cache(maxsize=None)
def _fp32_output_gemm(device: torch.device) -> bool:
    """Whether this torch can write a 16-bit GEMM's result in fp32 (``out_dtype``) on ``device``."""
    a = torch.ones((16, 16), dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_KERNELS = {"fwd": fwd_stats_kernel, "dz": dlogits_kernel}


def _configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": tuning.GROUP_N},
                      num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in tuning.GPU_CONFIGS
    ]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, from_logits: bool):
    # Reading stored logits is a memory pass: the tile shape matters little, keep one config.
    configs = _configs()[:1] if from_logits else _configs()
    return triton.autotune(configs=configs, key=["D"])(_KERNELS[name])


def best_configs() -> dict:
    """The config the autotuner chose per kernel ("fwd", "dz"), as strings (None before a run)."""
    return {name: str(getattr(_autotuned(name, False), "best_config", None)) for name in _KERNELS}


def _launch(name, grid, *args, FROM_LOGITS, **kwargs):
    """Launch a kernel: autotuned over GPU_CONFIGS when compiled, fixed small tiles when interpreted."""
    if interpreting():
        bn, bv, bd, _, _ = tuning.INTERPRETER_CONFIG
        meta = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": tuning.INTERPRETER_GROUP_N}
        _KERNELS[name][grid(meta)](*args, FROM_LOGITS=FROM_LOGITS, UPCAST=True, **kwargs, **meta)
    else:
        _autotuned(name, FROM_LOGITS)[grid](*args, FROM_LOGITS=FROM_LOGITS, UPCAST=False, **kwargs)


def _split_cols(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocab columns per forward program (see tuning.split_cols)."""
    if interpreting():
        return tuning.INTERPRETER_SPLIT_COLS
    return tuning.split_cols(n_rows, vocab, torch.cuda.get_device_properties(device).multi_processor_count)


def _filter_cols() -> int:
    """Columns per gradient-filtering block (see tuning.FILTER_COLS)."""
    return tuning.FILTER_COLS if interpreting() else tuning.GPU_FILTER_COLS


def logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out [C, W] fp32 = hidden [C, D] @ weight[W, D]^T with fp32 accumulation and output.

    On CUDA with 16-bit inputs this is one cuBLAS GEMM with an fp32 output (torch's
    ``out_dtype``); elsewhere the inputs are upcast.
    """
    if hidden.dtype == torch.float32:
        return torch.mm(hidden, weight.T, out=out)
    if hidden.is_cuda:
        return torch.mm(hidden, weight.T, out_dtype=torch.float32, out=out)
    return torch.mm(hidden.float(), weight.float().T, out=out)


def _merge_splits(m, s, t, zy, with_entropy):
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(dim=0)
    mean = (t * scale).sum(dim=0) / s_all if with_entropy else None
    return m_all + torch.log(s_all), zy.sum(dim=0), mean


def stats_from(hidden, weight, targets, inv_temp, with_entropy, logits=None):
    """Per-row lse, target logit and mean logit (or None) of z = logits * inv_temp.

    With ``logits`` ([C, V] raw logits of these rows, any float dtype) the kernel reads them;
    without, it computes the tiles from hidden [C, D] and weight [V, D].
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    split_cols = _split_cols(n, vocab, hidden.device)
    splits = triton.cdiv(vocab, split_cols)
    m, s, t, zy = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    z = logits if logits is not None else m

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * splits,)

    _launch("fwd", grid, hidden, weight, z, targets, m, s, t, zy,
            n, vocab, d, hidden.stride(0), weight.stride(0), z.stride(0), inv_temp, splits, split_cols,
            WITH_ENTROPY=with_entropy, FROM_LOGITS=logits is not None)
    return _merge_splits(m, s, t, zy, with_entropy)


def dlogits_into(dz, hidden, weight, targets, inv_temp, lse, mean, grad_logp, grad_entropy,
                 v_lo, v_hi, logits=None, filter_eps=0.0):
    """dz [N, >= v_hi - v_lo] (input dtype) = gradient of the logits of columns [v_lo, v_hi).

    grad_logp, grad_entropy (or None), lse and mean: fp32 [N]. With ``logits`` (raw logits of
    these columns, [N, >= v_hi - v_lo]) the kernel reads them instead of recomputing the tiles.
    Returns the columns (int64, relative to v_lo) the gradient GEMMs should use, None for all:
    with ``filter_eps`` > 0 the blocks whose probabilities are all below it are left out
    (v_lo a multiple of the filtering block; :mod:`oapl_kernels.filtering`).
    """
    n, d = hidden.shape
    with_entropy = grad_entropy is not None
    z = logits if logits is not None else dz
    block = _filter_cols()
    pmax = torch.zeros(triton.cdiv(v_hi - v_lo, block), device=dz.device) if filter_eps else lse

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v_hi - v_lo, meta["BLOCK_V"]),)

    _launch("dz", grid, hidden, weight, z, targets, lse, mean if with_entropy else lse, grad_logp,
            grad_entropy if with_entropy else grad_logp, dz, pmax,
            n, v_lo, v_hi, d, hidden.stride(0), weight.stride(0), z.stride(0), dz.stride(0), inv_temp,
            WITH_ENTROPY=with_entropy, FROM_LOGITS=logits is not None, FILTER=bool(filter_eps),
            FILTER_COLS=block)
    if not filter_eps:
        return None
    return filtering.kept_columns(pmax, targets, v_lo, v_hi - v_lo, block, filter_eps)


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  inv_temp: float, with_entropy: bool, workspace_bytes: int):
    """Triton counterpart of :func:`oapl_kernels.reference.forward_stats`.

    hidden [N, D] and weight [V, D] contiguous, same dtype; targets [N] int64 (-1: none).
    Returns fp32 lse [N], target_logit [N], mean_logit [N] (None unless with_entropy).
    In 'gemm' mode the rows go in chunks whose fp32 logits fit ``workspace_bytes``.
    """
    if logits_mode(hidden.device) == "tile":
        return stats_from(hidden, weight, targets, inv_temp, with_entropy)
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = min(n, tuning.chunk_rows(workspace_bytes, 4 * vocab, tuning.MIN_FORWARD_ROWS))
    z = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        chunk = logits_into(z[: r1 - r0], hidden[r0:r1], weight)
        for dst, src in zip(out, stats_from(hidden[r0:r1], weight, targets[r0:r1], inv_temp,
                                            with_entropy, logits=chunk)):
            if src is not None:
                dst[r0:r1] = src
    return out[0], out[1], out[2] if with_entropy else None


def accumulate_mm(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc32 += a @ b with fp32 accumulation (one cuBLAS call with an fp32 output on CUDA)."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
    else:
        acc32.addmm_(a.float(), b.float())


def backward(hidden, weight, targets, inv_temp, lse, mean_logit, grad_logp, grad_entropy,
             need_hidden: bool, need_weight: bool, workspace_bytes: int, filter_eps: float = 0.0):
    """Gradients w.r.t. hidden [N, D] and weight [V, D], in their dtypes (None when not needed).

    The vocabulary is walked in chunks of C columns, C chosen so the chunk's buffers fit
    ``workspace_bytes``. For each chunk the logits are recomputed (a cuBLAS GEMM into the
    workspace in 'gemm' mode, inside the kernel in 'tile' mode), a Triton kernel writes dz
    (input dtype), then dW[chunk] = dz^T H (complete, one GEMM) and dH += dz W[chunk] (fp32);
    with ``filter_eps`` > 0 both GEMMs take the chunk's kept vocab blocks only.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    gemm = logits_mode(hidden.device) == "gemm"
    chunk = tuning.chunk_cols(n, vocab, workspace_bytes, hidden.element_size() + (4 if gemm else 0),
                              align=tuning.MIN_CHUNK_COLS)
    dz = torch.empty((n, chunk), dtype=hidden.dtype, device=hidden.device)
    z = torch.empty(n * chunk, dtype=torch.float32, device=hidden.device) if gemm else None
    d_hidden = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_hidden else None
    d_weight = (torch.zeros_like if filter_eps else torch.empty_like)(weight) if need_weight else None
    for v_lo in range(0, vocab, chunk):
        v_hi = min(vocab, v_lo + chunk)
        z_view = z[: n * (v_hi - v_lo)].view(n, v_hi - v_lo) if gemm else None  # contiguous
        logits = logits_into(z_view, hidden, weight[v_lo:v_hi]) if gemm else None
        cols = dlogits_into(dz, hidden, weight, targets, inv_temp, lse, mean_logit, grad_logp, grad_entropy,
                            v_lo, v_hi, logits=logits, filter_eps=filter_eps)
        block, w = dz[:, : v_hi - v_lo], weight[v_lo:v_hi]
        if cols is not None:
            block, w = block.index_select(1, cols), w.index_select(0, cols)
        if need_weight:
            if cols is None:
                torch.mm(block.T, hidden, out=d_weight[v_lo:v_hi])
            else:
                d_weight.index_copy_(0, cols + v_lo, block.T @ hidden)
        if need_hidden:
            accumulate_mm(d_hidden, block, w)
    if need_hidden:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_weight


class FusedChunk:
    """The Triton body of the fused loss (:mod:`oapl_kernels.fused`) over one weight [V, D].

    Buffers for a chunk of rows: its raw fp32 logits [rows, V] (a cuBLAS GEMM writes them) and
    their gradient dz [rows, V] in the input dtype (a Triton kernel writes it, reading the
    logits once). ``bytes_per_row`` is what one row costs (``fixed_bytes``: nothing else,
    ``row_multiple``: any row count), for ``oapl_kernels.fused.plan``.
    """

    row_multiple = 1

    def __init__(self, rows: int, weight: torch.Tensor):
        self.weight = weight
        vocab = weight.shape[0]
        self.z_buf = torch.empty(rows * vocab, dtype=torch.float32, device=weight.device)
        self.dz_buf = torch.empty(rows * vocab, dtype=weight.dtype, device=weight.device)
        self.logits = self.lse = None

    @staticmethod
    def bytes_per_row(vocab: int, dim: int, dtype: torch.dtype) -> int:
        """An fp32 row of logits and a row of dz in the input dtype."""
        return vocab * (4 + torch.finfo(dtype).bits // 8)

    @staticmethod
    def fixed_bytes(vocab: int, dim: int, dtype: torch.dtype) -> int:
        return 0

    def stats(self, hidden: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
        """lse, target logit, mean logit (None unless ``with_entropy``), fp32 [C], of the C rows
        hidden [C, D] (C <= rows) with targets [C] int64; keeps their logits for :meth:`grads`."""
        c, vocab = hidden.shape[0], self.weight.shape[0]
        self.logits = logits_into(self.z_buf[: c * vocab].view(c, vocab), hidden, self.weight)
        lse, zy, mean = stats_from(hidden, self.weight, targets, inv_temp, with_entropy, logits=self.logits)
        self.lse = lse
        return lse, zy, mean

    def grads(self, hidden: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor, inv_temp: float,
              d_hidden: torch.Tensor, d_weight: torch.Tensor, side: torch.Tensor | None = None,
              side_from: int | None = None, filter_eps: float = 0.0) -> None:
        """For the rows of the last :meth:`stats` and fp32 grad_logp [C]: writes dH into
        d_hidden [C, D] (input dtype) and adds dW into the fp32 accumulator d_weight [V, D], or,
        for rows ``side_from:``, into the fp32 side buffer ``side`` [V, D]. ``filter_eps`` > 0:
        the GEMMs skip the vocab blocks whose probabilities are all below it in every row."""
        c, vocab = hidden.shape[0], self.weight.shape[0]
        dz = self.dz_buf[: c * vocab].view(c, vocab)
        cols = dlogits_into(dz, hidden, self.weight, targets, inv_temp, self.lse, None, grad_logp, None, 0, vocab,
                            logits=self.logits, filter_eps=filter_eps)
        w = self.weight
        if cols is not None:
            dz, w = dz.index_select(1, cols), w.index_select(0, cols)
        torch.mm(dz, w, out=d_hidden)
        k = c if side_from is None else side_from
        for acc, rows in ((d_weight, slice(0, k)), (side, slice(k, c))):
            if rows.stop > rows.start:
                if cols is None:
                    accumulate_mm(acc, dz[rows].T, hidden[rows])
                else:
                    part = torch.zeros((len(cols), hidden.shape[1]), dtype=torch.float32, device=acc.device)
                    accumulate_mm(part, dz[rows].T, hidden[rows])
                    acc.index_add_(0, cols, part)
        self.logits = self.lse = None
