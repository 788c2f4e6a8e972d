"""Chunked pure-PyTorch backend: the CPU path and the readable spec of the Triton kernels.

For token n with hidden h_n, target y_n and temperature tau, z_nv = h_n . w_v / tau,
LSE_n = logsumexp_v z_nv, logp_n = z_{n,y_n} - LSE_n, p_nv = exp(z_nv - LSE_n),
entropy_n = LSE_n - E_n with E_n = sum_v p_nv z_nv.

``forward_stats`` walks the vocabulary in chunks with a running max, sum and sum of p*z, and
keeps only LSE and E per token. ``backward`` recomputes each chunk's logits. With g = dL/dlogp
and e = dL/dentropy, the logits' gradient is

    dz_nv = g_n (1[v = y_n] - p_nv) - e_n p_nv (z_nv - E_n)

and dH = dz W / tau, dW = dz^T H / tau. ``FusedChunk`` is this backend's body of the fused loss
(:mod:`oapl_kernels.fused`): whole-vocabulary logits of a chunk of rows, their statistics, then
dz, dH and dW. At no point does an N x V tensor exist: chunk sizes come from
:mod:`oapl_kernels.tuning` so the buffers fit ``workspace_bytes``. All arithmetic is fp32
whatever the input dtype.
"""
from __future__ import annotations

import torch

from . import filtering, tuning


def _buffer(n_rows: int, chunk: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer for n_rows x chunk tiles, allocated once per call and reused by every
    chunk (a fresh 64 MB tile per chunk would be page-faulted in and zeroed by the OS each time)."""
    return torch.empty(n_rows * chunk, device=device)


def _tile(buffer: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """A contiguous [n_rows, width] view at the start of ``buffer`` (width <= chunk)."""
    return buffer[: n_rows * width].view(n_rows, width)


class _Tiles:
    """Scratch tiles of the batch-invariant logits walk (:meth:`stats`): two fp32
    [ROW_TILE, min(VOCAB_TILE, V)] tiles, allocated once and reused by every tile."""

    def __init__(self, vocab: int, device: torch.device):
        self.width = min(tuning.VOCAB_TILE, vocab)
        self.z_buf = _buffer(tuning.ROW_TILE, self.width, device)
        self.e_buf = _buffer(tuning.ROW_TILE, self.width, device)

    @staticmethod
    def nbytes(vocab: int) -> int:
        return 2 * 4 * tuning.ROW_TILE * min(tuning.VOCAB_TILE, vocab)

    def stats(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool,
              logits_out: torch.Tensor | None = None):
        """lse, target logit, mean logit (None unless ``with_entropy``), fp32 [R], of the rows of
        h [R, D] (fp32, already scaled by 1/tau, R a multiple of ROW_TILE: see :func:`_scaled_rows`)
        with targets [R] int64 (-1: none) under weight [V, D] (any float dtype).

        Every GEMM is [ROW_TILE, D] x [D, VOCAB_TILE] (the last vocab tile narrower, fixed by V)
        and every reduction runs over one tile row, vocab tiles in order: a row's statistics do
        not depend on which other rows are in h, nor where. ``logits_out`` [C, V] (C <= R): the
        logits of the first C rows are also written there.
        """
        n, vocab, rt = h.shape[0], weight.shape[0], tuning.ROW_TILE
        m = torch.full((n,), float("-inf"), device=h.device)
        s = torch.zeros(n, device=h.device)
        t = torch.zeros(n, device=h.device)
        zy = torch.zeros(n, device=h.device)
        for v0 in range(0, vocab, self.width):
            w = weight[v0 : v0 + self.width].float()
            z, e = _tile(self.z_buf, rt, w.shape[0]), _tile(self.e_buf, rt, w.shape[0])
            for r0 in range(0, n, rt):
                r = slice(r0, r0 + rt)
                torch.mm(h[r], w.T, out=z)
                _gather_targets(z, targets[r], v0, zy[r])
                m_new = torch.maximum(m[r], z.amax(dim=1))
                alpha = torch.exp(m[r] - m_new)
                torch.sub(z, m_new[:, None], out=e).exp_()  # e = exp(z - running max)
                s[r].mul_(alpha).add_(e.sum(dim=1))
                if with_entropy:
                    t[r].mul_(alpha).add_(e.mul_(z).sum(dim=1))
                m[r] = m_new
                if logits_out is not None and r0 < logits_out.shape[0]:
                    rows = min(rt, logits_out.shape[0] - r0)
                    logits_out[r0 : r0 + rows, v0 : v0 + w.shape[0]] = z[:rows]
        lse = m + torch.log(s)
        return lse, zy, t / s if with_entropy else None


def _scaled_rows(hidden: torch.Tensor, inv_temp: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [C, D] as fp32 times inv_temp (z = (h / tau) @ w.T: the temperature costs C x D, not
    C x V), zero-padded to a multiple of ROW_TILE rows: into ``out`` (>= that many rows) if given."""
    c, rt = hidden.shape[0], tuning.ROW_TILE
    rows = -(-c // rt) * rt
    h = out[:rows] if out is not None else torch.empty((rows, hidden.shape[1]), device=hidden.device)
    torch.mul(hidden.float(), inv_temp, out=h[:c])
    h[c:].zero_()
    return h


def _padded_targets(targets: torch.Tensor, rows: int) -> torch.Tensor:
    """targets [C] int64, then -1 up to ``rows``."""
    y = torch.full((rows,), -1, dtype=torch.int64, device=targets.device)
    y[: targets.shape[0]] = targets
    return y


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
                  with_entropy: bool, workspace_bytes: int):
    """Per-token statistics of softmax(hidden @ weight.T * inv_temp).

    hidden [N, D] (any float dtype), weight [V, D], targets [N] int64 in [0, V) or -1 (no
    target). Returns fp32 tensors lse [N], target_logit [N] (0 where target is -1) and
    mean_logit [N] = E_p[z] (so entropy = lse - mean_logit; None unless ``with_entropy``).
    Batch-invariant (see :class:`_Tiles`): a row's results are bitwise the same whatever the
    other rows. The two fp32 tiles are fixed in size (``_Tiles.nbytes``, 2 MiB), far under any
    usual ``workspace_bytes``.
    """
    n = hidden.shape[0]
    h = _scaled_rows(hidden, inv_temp)
    lse, zy, mean = _Tiles(weight.shape[0], h.device).stats(h, weight, _padded_targets(targets, h.shape[0]),
                                                             with_entropy)
    return lse[:n], zy[:n], mean[:n] if with_entropy else None


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
             lse: torch.Tensor, mean_logit: torch.Tensor | None, grad_logp: torch.Tensor,
             grad_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool,
             workspace_bytes: int, filter_eps: float = 0.0):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden and weight.

    Shapes as in :func:`forward_stats`; grad_logp and grad_entropy are fp32 [N] (0 on rows
    without a target; grad_entropy None when there is none, then mean_logit may be None).
    Returns (d_hidden [N, D], d_weight [V, D]) in the dtypes of hidden and weight, either None
    when not needed. Each chunk's logits are recomputed from hidden and weight into tiles that
    fit ``workspace_bytes``. ``filter_eps`` > 0: the gradient GEMMs skip the vocab blocks whose
    probabilities are all below it for every row (:mod:`oapl_kernels.filtering`).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.float() * inv_temp  # logits z = h @ w.T, and dW = dz.T @ (h / tau)
    d_hidden = torch.zeros_like(h) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_weight else None
    chunk = tuning.chunk_cols(n, vocab, workspace_bytes, 4 if grad_entropy is None else 8,
                              align=tuning.FILTER_COLS if filter_eps else 1)
    z_buf = _buffer(n, chunk, h.device)
    p_buf = _buffer(n, chunk, h.device) if grad_entropy is not None else None
    for v0 in range(0, vocab, chunk):
        w = weight[v0 : v0 + chunk].float()
        z_width = w.shape[0]
        z = _tile(z_buf, n, z_width)
        torch.mm(h, w.T, out=z)
        if grad_entropy is None:
            p = z.sub_(lse[:, None]).exp_()
        else:
            p = torch.sub(z, lse[:, None], out=_tile(p_buf, n, z_width)).exp_()
        cols = _kept(p, targets, v0, filter_eps)
        if cols is not None:  # only the kept columns from here on
            p, w = p.index_select(1, cols), w.index_select(0, cols)
            z = z.index_select(1, cols) if grad_entropy is not None else None
        if grad_entropy is None:
            dz = p.mul_(-grad_logp[:, None])  # -g p, in place
        else:
            z.sub_(mean_logit[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
            dz = p.mul_(z).neg_()  # -p (g + e (z - E))
        _scatter_targets(dz, targets, v0, z_width, grad_logp, cols)
        if need_hidden:
            d_hidden.addmm_(dz, w, alpha=inv_temp)  # dH = dz @ W / tau
        if need_weight:
            if cols is None:
                torch.mm(dz.T, h, out=d_weight[v0 : v0 + chunk])
            else:
                d_weight.index_copy_(0, cols + v0, dz.T @ h)
    return (d_hidden.to(hidden.dtype) if need_hidden else None,
            d_weight.to(weight.dtype) if need_weight else None)


def _kept(p: torch.Tensor, targets: torch.Tensor, v0: int, eps: float) -> torch.Tensor | None:
    """The kept columns of the probabilities p [C, W] of columns [v0, v0 + W) (None: all)."""
    if not eps:
        return None
    blocks = filtering.block_max(p.amax(dim=0), tuning.FILTER_COLS)
    return filtering.kept_columns(blocks, targets, v0, p.shape[1], tuning.FILTER_COLS, eps)


class FusedChunk:
    """The torch body of the fused loss (:mod:`oapl_kernels.fused`) over one weight [V, D].

    Holds an fp32 copy of the weight, an fp32 [rows, V] buffer (a chunk's logits, then its
    softmax, which :meth:`grads` turns into dz in place), the padded scaled hidden rows and the
    scratch tiles of the batch-invariant statistics (the same walk as :func:`forward_stats`, so
    the fused log-probs equal ``linear_logprobs``' bit for bit). ``bytes_per_row`` is what one
    row of a chunk costs and ``fixed_bytes`` what a chunk costs whatever its rows, for
    :func:`oapl_kernels.tuning.fused_plan`; ``row_multiple``: chunks of whole row tiles waste no
    padded GEMM rows.
    """

    row_multiple = tuning.ROW_TILE

    def __init__(self, rows: int, weight: torch.Tensor):
        self.weight = weight.float()
        vocab, dim = weight.shape
        self.z_buf = _buffer(rows, vocab, weight.device)
        self.h_buf = torch.empty((-(-rows // tuning.ROW_TILE) * tuning.ROW_TILE, dim), device=weight.device)
        self.tiles = _Tiles(vocab, weight.device)
        self.probs = None

    @staticmethod
    def bytes_per_row(vocab: int, dim: int, dtype: torch.dtype) -> int:
        """An fp32 row of logits and three fp32 [D] rows (scaled hidden, hidden, dH)."""
        return 4 * vocab + 12 * dim

    @staticmethod
    def fixed_bytes(vocab: int, dim: int, dtype: torch.dtype) -> int:
        """The scratch tiles and one row tile of padding."""
        return _Tiles.nbytes(vocab) + 4 * tuning.ROW_TILE * dim

    def stats(self, hidden: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
        """lse, target logit, mean logit, fp32 [C], of the C rows hidden [C, D] (C <= rows) with
        targets [C] int64 in [0, V). With ``with_entropy`` the softmax is kept for :meth:`grads`;
        without, only lse and the target logit are computed (mean is None, no :meth:`grads`)."""
        c, vocab = hidden.shape[0], self.weight.shape[0]
        h = _scaled_rows(hidden, inv_temp, out=self.h_buf)
        z = _tile(self.z_buf, c, vocab) if with_entropy else None
        lse, zy, mean = self.tiles.stats(h, self.weight, _padded_targets(targets, h.shape[0]), with_entropy, z)
        lse, zy = lse[:c], zy[:c]
        self.probs = z.sub_(lse[:, None]).exp_() if with_entropy else None
        return lse, zy, mean[:c] if with_entropy else None

    def grads(self, hidden: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor, inv_temp: float,
              d_hidden: torch.Tensor, d_weight: torch.Tensor, side: torch.Tensor | None = None,
              side_from: int | None = None, filter_eps: float = 0.0) -> None:
        """For the rows of the last :meth:`stats` and fp32 grad_logp [C]: writes dH into
        d_hidden [C, D] (any float dtype) and adds dW into the fp32 accumulator d_weight [V, D],
        or, for rows ``side_from:``, into the fp32 side buffer ``side`` [V, D]. ``filter_eps``
        > 0: the GEMMs skip the vocab blocks whose probabilities are all below it in every row."""
        p, w = self.probs, self.weight
        vocab = w.shape[0]
        cols = _kept(p, targets, 0, filter_eps)
        if cols is not None:
            p, w = p.index_select(1, cols), w.index_select(0, cols)
        dz = p.mul_(-grad_logp[:, None])  # dz = inv_temp * g (1[v=y] - p), in place
        _scatter_targets(dz, targets, 0, vocab, grad_logp, cols)
        dz.mul_(inv_temp)
        d_hidden.copy_(dz @ w)
        h = hidden.float()
        k = len(targets) if side_from is None else side_from
        for acc, rows in ((d_weight, slice(0, k)), (side, slice(k, len(targets)))):
            if rows.stop > rows.start:
                if cols is None:
                    acc.addmm_(dz[rows].T, h[rows])
                else:
                    acc.index_add_(0, cols, dz[rows].T @ h[rows])
        self.probs = None


def _target_rows(targets: torch.Tensor, v0: int, width: int, cols: torch.Tensor | None = None):
    """Rows whose target is in [v0, v0 + width), and its column there (in ``cols``, the kept
    columns, when given: a target's block is always kept)."""
    rows = ((targets >= v0) & (targets < v0 + width)).nonzero().squeeze(1)
    local = targets[rows] - v0
    return rows, local if cols is None else torch.searchsorted(cols, local)


def _gather_targets(z: torch.Tensor, targets: torch.Tensor, v0: int, out: torch.Tensor) -> None:
    rows, cols = _target_rows(targets, v0, z.shape[1])
    out[rows] = z[rows, cols]


def _scatter_targets(dz: torch.Tensor, targets: torch.Tensor, v0: int, width: int, grad: torch.Tensor,
                     kept: torch.Tensor | None = None) -> None:
    """dz [C, W'] += grad at each row's target column, for the targets in [v0, v0 + width); dz
    holds all ``width`` columns, or the ``kept`` ones."""
    rows, cols = _target_rows(targets, v0, width, kept)
    dz[rows, cols] += grad[rows]
