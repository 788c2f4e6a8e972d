"""Triton kernels for fused linear log-probs.

Both kernels compute tiles of z = (H @ W^T) * inv_temp with ``tl.dot`` over D in BLOCK_D
slices (bf16/fp16 operands on tensor cores, fp32 accumulation), and never write z.

* ``fwd_stats_kernel``: one program per (row block, vocab split). Each walks its split of the
  vocabulary with an online max m, sum s = sum e^(z-m), sum t = sum e^(z-m) z and picks the
  target logit. It writes those four per-row partials; the host merges the splits.
* ``dlogits_kernel``: one program per (row block, vocab block) of one vocab chunk [v_lo, v_hi).
  It recomputes a z tile, turns it into the logits' gradient
  dz = inv_temp * (g (1[v=y] - p) - e p (z - E)) with p = exp(z - LSE), and stores it. The host
  then forms dH and dW with two GEMMs on that chunk. With FILTER it also raises PMAX[b] to the
  tile's largest probability p (rows < N), b the tile's block of FILTER_COLS columns counted
  from v_lo: the host then runs the GEMMs on the blocks it keeps (gradient filtering,
  :mod:`oapl_kernels.filtering`).

Programs are ordered GROUP_N row blocks at a time (``_grouped``), as in a tiled GEMM, so the
panels that concurrently running programs read stay in L2.

With FROM_LOGITS, both read a stored tile of raw logits (computed by a cuBLAS GEMM into a
bounded workspace) instead of computing it: the GEMM then runs at cuBLAS speed and the kernels
are one memory pass each.

UPCAST casts the operands of ``tl.dot`` to fp32: the Triton interpreter computes bf16 dots
wrongly, so it is set when ``TRITON_INTERPRET=1``; compiled kernels keep 16-bit operands.
"""
import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    H, W, offs_n, offs_v, N, v_hi, D, stride_h, stride_w, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] fp32 for rows offs_n and vocab columns offs_v (columns >= v_hi are 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = offs_n < N
    col_ok = offs_v < v_hi
    h_ptrs = H + offs_n.to(tl.int64)[:, None] * stride_h
    w_ptrs = W + offs_v.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc)
    return acc * inv_temp


@triton.jit
def _z_tile(
    H, W, Z, offs_n, offs_v, N, v_hi, D, stride_h, stride_w, stride_z, z_col0, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
):
    """The tile of z = logits * inv_temp: read from Z (raw logits, column v at v - z_col0) when
    FROM_LOGITS, else computed from H and W. Columns >= v_hi and rows >= N are 0."""
    if FROM_LOGITS:
        ptrs = Z + offs_n.to(tl.int64)[:, None] * stride_z + (offs_v - z_col0)[None, :]
        ok = (offs_n < N)[:, None] & (offs_v < v_hi)[None, :]
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * inv_temp
    return _logits_tile(H, W, offs_n, offs_v, N, v_hi, D, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)


@triton.jit
def _grouped(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """Map a 1-D program id to (row block, column index), GROUP_N row blocks at a time.

    Programs that run together then share GROUP_N hidden panels and a few weight panels, which
    stay in L2 instead of being re-read from memory by every program.
    """
    per_group = GROUP_N * n_cols
    first_row = (pid // per_group) * GROUP_N
    rows_here = tl.minimum(n_row_blocks - first_row, GROUP_N)
    local = pid % per_group
    return first_row + local % rows_here, local // rows_here


@triton.jit
def fwd_stats_kernel(
    H, W, Z, Y, M, S, T, ZY,
    N, V, D, stride_h, stride_w, stride_z, inv_temp, n_splits, split_cols,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partials per (split, row): M max logit, S sum exp(z - M), T sum exp(z - M) z, ZY target logit.

    H [N, D], W [V, D] (row-major in D), Y [N] int64 target (or -1). M, S, T, ZY are fp32
    [n_splits, N]. Split k covers vocab [k * split_cols, (k + 1) * split_cols); split_cols is a
    multiple of BLOCK_V. Grid: (cdiv(N, BLOCK_N) * n_splits,). With FROM_LOGITS the raw logits
    are read from Z [N, V] (any float dtype) instead of being computed from H and W.
    """
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    v_begin = pid_s * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = _z_tile(H, W, Z, offs_n, offs_v, N, v_end, D, stride_h, stride_w, stride_z, 0, inv_temp,
                    BLOCK_N, BLOCK_V, BLOCK_D, FROM_LOGITS, UPCAST)
        col_ok = (offs_v < v_end)[None, :]
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        z_max = tl.max(tl.where(col_ok, z, float("-inf")), axis=1)
        m_new = tl.maximum(m, z_max)
        alpha = tl.exp(m - m_new)
        e = tl.where(col_ok, tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * z, axis=1)
        m = m_new
    out = pid_s * N + offs_n
    tl.store(M + out, m, mask=row_ok)
    tl.store(S + out, s, mask=row_ok)
    tl.store(ZY + out, zy, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(T + out, t, mask=row_ok)


@triton.jit
def dlogits_kernel(
    H, W, Z, Y, LSE, MEAN, G, GE, DZ, PMAX,
    N, v_lo, v_hi, D, stride_h, stride_w, stride_z, stride_dz, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
    FILTER: tl.constexpr, FILTER_COLS: tl.constexpr,
):
    """DZ[n, v - v_lo] = inv_temp * (G_n (1[v=Y_n] - p) - GE_n p (z - MEAN_n)) for v in [v_lo, v_hi).

    H [N, D], W [V, D], Y [N] int64 (or -1), LSE, MEAN, G, GE fp32 [N]; DZ [N, >= v_hi - v_lo]
    in the dtype of H. Grid: (cdiv(N, BLOCK_N) * cdiv(v_hi - v_lo, BLOCK_V),). With FROM_LOGITS
    the raw logits of the chunk are read from Z [N, >= v_hi - v_lo] instead of recomputed.
    With FILTER, PMAX fp32 [cdiv(v_hi - v_lo, FILTER_COLS)] (zeroed by the host) gets the
    largest p of each block (FILTER_COLS a multiple of BLOCK_V, so a tile lies in one block).
    """
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N),
                            tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    z = _z_tile(H, W, Z, offs_n, offs_v, N, v_hi, D, stride_h, stride_w, stride_z, v_lo, inv_temp,
                BLOCK_N, BLOCK_V, BLOCK_D, FROM_LOGITS, UPCAST)
    y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    lse = tl.load(LSE + offs_n, mask=row_ok, other=0.0)
    g = tl.load(G + offs_n, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    if FILTER:
        valid = row_ok[:, None] & (offs_v < v_hi)[None, :]
        tile_max = tl.max(tl.max(tl.where(valid, p, 0.0), axis=1), axis=0)
        tl.atomic_max(PMAX + (pid_v * BLOCK_V) // FILTER_COLS, tile_max)
    if WITH_ENTROPY:
        mean = tl.load(MEAN + offs_n, mask=row_ok, other=0.0)
        ge = tl.load(GE + offs_n, mask=row_ok, other=0.0)
        coef = g[:, None] + ge[:, None] * (z - mean[:, None])
    else:
        coef = g[:, None]
    dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - p * coef
    dz = dz * inv_temp
    dz_ptrs = DZ + offs_n.to(tl.int64)[:, None] * stride_dz + (offs_v - v_lo)[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & (offs_v < v_hi)[None, :])
