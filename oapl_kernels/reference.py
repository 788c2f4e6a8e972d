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

from . import tuning


def _buffer(n_rows: int, chunk: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer for n_rows x chunk tiles, allocated once per call and reused by every
    chunk (a fresh 64 MB tile per chunk would be page-faulted in and zeroed by the OS each time)."""
    return torch.empty(n_rows * chunk, device=device)


def _tile(buffer: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """A contiguous [n_rows, width] view at the start of ``buffer`` (width <= chunk)."""
    return buffer[: n_rows * width].view(n_rows, width)


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
                  with_entropy: bool, workspace_bytes: int):
    """Per-token statistics of softmax(hidden @ weight.T * inv_temp).

    hidden [N, D] (any float dtype), weight [V, D], targets [N] int64 in [0, V) or -1 (no
    target). Returns fp32 tensors lse [N], target_logit [N] (0 where target is -1) and
    mean_logit [N] = E_p[z] (so entropy = lse - mean_logit; None unless ``with_entropy``).
    Two fp32 [N, chunk] tiles share ``workspace_bytes``.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.float() * inv_temp  # z = (h / tau) @ w.T: the temperature costs N x D, not N x V
    m = torch.full((n,), float("-inf"), device=h.device)
    s = torch.zeros(n, device=h.device)
    t = torch.zeros(n, device=h.device)
    zy = torch.zeros(n, device=h.device)
    chunk = tuning.chunk_cols(n, vocab, workspace_bytes, 8)
    z_buf, e_buf = _buffer(n, chunk, h.device), _buffer(n, chunk, h.device)
    for v0 in range(0, vocab, chunk):
        w = weight[v0 : v0 + chunk].float()
        z, e = _tile(z_buf, n, w.shape[0]), _tile(e_buf, n, w.shape[0])
        torch.mm(h, w.T, out=z)
        _gather_targets(z, targets, v0, zy)
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        torch.sub(z, m_new[:, None], out=e).exp_()  # e = exp(z - running max)
        s.mul_(alpha).add_(e.sum(dim=1))
        if with_entropy:
            t.mul_(alpha).add_(e.mul_(z).sum(dim=1))
        m = m_new
    lse = m + torch.log(s)
    return lse, zy, t / s if with_entropy else None


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
             lse: torch.Tensor, mean_logit: torch.Tensor | None, grad_logp: torch.Tensor,
             grad_entropy: torch.Tensor | None, need_hidden: bool, need_weight: bool,
             workspace_bytes: int):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden and weight.

    Shapes as in :func:`forward_stats`; grad_logp and grad_entropy are fp32 [N] (0 on rows
    without a target; grad_entropy None when there is none, then mean_logit may be None).
    Returns (d_hidden [N, D], d_weight [V, D]) in the dtypes of hidden and weight, either None
    when not needed. Each chunk's logits are recomputed from hidden and weight into tiles that
    fit ``workspace_bytes``.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.float() * inv_temp  # logits z = h @ w.T, and dW = dz.T @ (h / tau)
    d_hidden = torch.zeros_like(h) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_weight else None
    chunk = tuning.chunk_cols(n, vocab, workspace_bytes, 4 if grad_entropy is None else 8)
    z_buf = _buffer(n, chunk, h.device)
    p_buf = _buffer(n, chunk, h.device) if grad_entropy is not None else None
    for v0 in range(0, vocab, chunk):
        w = weight[v0 : v0 + chunk].float()
        z = _tile(z_buf, n, w.shape[0])
        torch.mm(h, w.T, out=z)
        if grad_entropy is None:
            dz = z.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])  # -g p, in place
        else:
            p = torch.sub(z, lse[:, None], out=_tile(p_buf, n, w.shape[0])).exp_()
            z.sub_(mean_logit[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
            dz = p.mul_(z).neg_()  # -p (g + e (z - E))
        _scatter_targets(dz, targets, v0, grad_logp)
        if need_hidden:
            d_hidden.addmm_(dz, w, alpha=inv_temp)  # dH = dz @ W / tau
        if need_weight:
            torch.mm(dz.T, h, out=d_weight[v0 : v0 + chunk])
    return (d_hidden.to(hidden.dtype) if need_hidden else None,
            d_weight.to(weight.dtype) if need_weight else None)


class FusedChunk:
    """The torch body of the fused loss (:mod:`oapl_kernels.fused`) over one weight [V, D].

    Holds an fp32 copy of the weight and two fp32 [rows, V] buffers: a chunk's logits and its
    softmax, which :meth:`grads` turns into dz in place. ``bytes_per_row`` is what one row of
    a chunk costs, for :func:`oapl_kernels.tuning.chunk_rows`.
    """

    def __init__(self, rows: int, weight: torch.Tensor):
        self.weight = weight.float()
        vocab = weight.shape[0]
        self.z_buf = _buffer(rows, vocab, weight.device)
        self.p_buf = _buffer(rows, vocab, weight.device)
        self.probs = None

    @staticmethod
    def bytes_per_row(vocab: int, dim: int, dtype: torch.dtype) -> int:
        """Two fp32 rows of logits-sized buffers and two fp32 [D] rows (hidden, dH)."""
        return 8 * vocab + 8 * dim

    def stats(self, hidden: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
        """lse, target logit, mean logit, fp32 [C], of the C rows hidden [C, D] (C <= rows) with
        targets [C] int64 in [0, V). With ``with_entropy`` the softmax is kept for :meth:`grads`;
        without, only lse and the target logit are computed (mean is None, no :meth:`grads`)."""
        c, vocab = hidden.shape[0], self.weight.shape[0]
        z = _tile(self.z_buf, c, vocab)
        torch.mm(hidden.float(), self.weight.T, out=z).mul_(inv_temp)
        top = z.amax(dim=1)
        zy = z.gather(1, targets[:, None])[:, 0]
        if not with_entropy:
            self.probs = None
            return top + torch.log(z.sub_(top[:, None]).exp_().sum(dim=1)), zy, None
        p = torch.sub(z, top[:, None], out=_tile(self.p_buf, c, vocab)).exp_()
        total = p.sum(dim=1)
        mean = z.mul_(p).sum(dim=1) / total
        self.probs = p.div_(total[:, None])
        return top + torch.log(total), zy, mean

    def grads(self, hidden: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor, inv_temp: float,
              d_hidden: torch.Tensor, d_weight: torch.Tensor, side: torch.Tensor | None = None,
              side_from: int | None = None) -> None:
        """For the rows of the last :meth:`stats` and fp32 grad_logp [C]: writes dH into
        d_hidden [C, D] (any float dtype) and adds dW into the fp32 accumulator d_weight [V, D],
        or, for rows ``side_from:``, into the fp32 side buffer ``side`` [V, D]."""
        dz = self.probs.mul_(-grad_logp[:, None])  # dz = inv_temp * g (1[v=y] - p), in place
        dz[torch.arange(len(targets), device=dz.device), targets] += grad_logp
        dz.mul_(inv_temp)
        d_hidden.copy_(dz @ self.weight)
        h = hidden.float()
        k = len(targets) if side_from is None else side_from
        if k:
            d_weight.addmm_(dz[:k].T, h[:k])
        if k < len(targets):
            side.addmm_(dz[k:].T, h[k:])
        self.probs = None


def _target_rows(targets: torch.Tensor, v0: int, width: int):
    rows = ((targets >= v0) & (targets < v0 + width)).nonzero().squeeze(1)
    return rows, targets[rows] - v0


def _gather_targets(z: torch.Tensor, targets: torch.Tensor, v0: int, out: torch.Tensor) -> None:
    rows, cols = _target_rows(targets, v0, z.shape[1])
    out[rows] = z[rows, cols]


def _scatter_targets(dz: torch.Tensor, targets: torch.Tensor, v0: int, grad: torch.Tensor) -> None:
    rows, cols = _target_rows(targets, v0, dz.shape[1])
    dz[rows, cols] += grad[rows]
