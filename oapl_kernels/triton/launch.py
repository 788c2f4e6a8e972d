"""Host side of the Triton path: block-size configs, grids, split merging and the backward GEMMs."""
from __future__ import annotations

import functools
import os

import torch
import triton

from .kernels import dlogits_kernel, fwd_stats_kernel


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages): tiles for Hopper/Ampere tensor cores.
GPU_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# Small tiles for the interpreter: odd shapes still cross several blocks in tests.
INTERPRETER_CONFIG = (16, 32, 16, 4, 1)
GROUP_N = 8  # row blocks per program group (L2 reuse, see kernels._grouped)
_KERNELS = {"fwd": fwd_stats_kernel, "dz": dlogits_kernel}


def _configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": GROUP_N},
                      num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in GPU_CONFIGS
    ]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str):
    return triton.autotune(configs=_configs(), key=["D"])(_KERNELS[name])


def _launch(name, grid, *args, **kwargs):
    """Launch a kernel: autotuned over GPU_CONFIGS when compiled, fixed small tiles when interpreted."""
    if interpreting():
        bn, bv, bd, _, _ = INTERPRETER_CONFIG
        meta = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": 2}
        _KERNELS[name][grid(meta)](*args, **kwargs, **meta)
    else:
        _autotuned(name)[grid](*args, **kwargs)


def _split_cols(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocab columns per forward split, a multiple of every BLOCK_V.

    At most 4096 (GPU) so that programs running together cover few row blocks and many splits
    (L2 reuse); fewer when there are few rows, so that about 4 programs per SM exist.
    """
    if interpreting():
        return 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(4 * sms, triton.cdiv(n_rows, 128))
    return min(4096, max(256, triton.cdiv(triton.cdiv(vocab, splits), 256) * 256))


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  inv_temp: float, with_entropy: bool):
    """Triton counterpart of :func:`oapl_kernels.reference.forward_stats`.

    hidden [N, D] and weight [V, D] contiguous, same dtype; targets [N] int64 (-1: none).
    Returns fp32 lse [N], target_logit [N], mean_logit [N] (None unless with_entropy).
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    split_cols = _split_cols(n, vocab, hidden.device)
    splits = triton.cdiv(vocab, split_cols)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    m, s, t, zy = part

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * splits,)

    _launch("fwd", grid, hidden, weight, targets, m, s, t, zy,
            n, vocab, d, hidden.stride(0), weight.stride(0), inv_temp, splits, split_cols,
            WITH_ENTROPY=with_entropy, UPCAST=interpreting())
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(dim=0)
    lse = m_all + torch.log(s_all)
    mean = (t * scale).sum(dim=0) / s_all if with_entropy else None
    return lse, zy.sum(dim=0), mean


def workspace_bytes() -> int:
    """Bytes for the backward's logits-gradient chunk (env OAPL_WORKSPACE_MB, default 1024)."""
    return int(float(os.environ.get("OAPL_WORKSPACE_MB", "1024")) * 2**20)


def _accumulate_mm(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc32 += a @ b with fp32 accumulation, avoiding a 16-bit partial where torch allows it."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
        return
    try:
        torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
    except (RuntimeError, TypeError, NotImplementedError):
        acc32.add_(a @ b)


def backward(hidden, weight, targets, inv_temp, lse, mean_logit, grad_logp, grad_entropy,
             need_hidden: bool = True, need_weight: bool = True):
    """Gradients w.r.t. hidden [N, D] and weight [V, D], in their dtypes (None when not needed).

    The vocabulary is walked in chunks of C columns, C chosen so the [N, C] logits-gradient
    buffer fits ``workspace_bytes()``. For each chunk a Triton kernel recomputes the logits
    tiles and writes dz (input dtype); then dW[chunk] = dz^T H (complete, one GEMM) and
    dH += dz W[chunk] (fp32 accumulator).
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    with_entropy = grad_entropy is not None
    chunk = max(256, workspace_bytes() // (n * hidden.element_size()))
    chunk = min(vocab, triton.cdiv(chunk, 256) * 256)
    dz = torch.empty((n, chunk), dtype=hidden.dtype, device=hidden.device)
    d_hidden = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_hidden else None
    d_weight = torch.empty_like(weight) if need_weight else None
    ge = grad_entropy if with_entropy else grad_logp
    mean = mean_logit if with_entropy else lse
    for v_lo in range(0, vocab, chunk):
        v_hi = min(vocab, v_lo + chunk)
        width = v_hi - v_lo

        def grid(meta, width=width):
            return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

        _launch("dz", grid, hidden, weight, targets, lse, mean, grad_logp, ge, dz,
                n, v_lo, v_hi, d, hidden.stride(0), weight.stride(0), dz.stride(0), inv_temp,
                WITH_ENTROPY=with_entropy, UPCAST=interpreting())
        block = dz[:, :width]
        if need_weight:
            torch.mm(block.T, hidden, out=d_weight[v_lo:v_hi])
        if need_hidden:
            _accumulate_mm(d_hidden, block, weight[v_lo:v_hi])
    if need_hidden:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_weight
