"""Chunked pure-PyTorch log-probs: the CPU path and the readable spec of the Triton kernels.

For token n with hidden h_n, target y_n and temperature tau, z_nv = h_n . w_v / tau,
LSE_n = logsumexp_v z_nv, logp_n = z_{n,y_n} - LSE_n, p_nv = exp(z_nv - LSE_n),
entropy_n = LSE_n - E_n with E_n = sum_v p_nv z_nv.

The forward walks the vocabulary in chunks with a running max, sum and sum of p*z, and keeps
only LSE and E per token. The backward recomputes each chunk's logits. With g = dL/dlogp and
e = dL/dentropy, the logits' gradient is

    dz_nv = g_n (1[v = y_n] - p_nv) - e_n p_nv (z_nv - E_n)

and dH = dz W / tau, dW = dz^T H / tau. At no point does an N x V tensor exist: the largest
temporary is N x chunk, with chunk chosen so it stays near ``workspace_bytes``.
All arithmetic is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch

DEFAULT_WORKSPACE_BYTES = 64 * 2**20


def vocab_chunk(n_rows: int, vocab: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Columns per chunk so that one fp32 [n_rows, chunk] tile takes about ``workspace_bytes``."""
    chunk = max(256, workspace_bytes // (4 * max(n_rows, 1)))
    return min(vocab, chunk)


def _buffer(n_rows: int, chunk: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer for n_rows x chunk tiles, allocated once per call and reused by every
    chunk (a fresh 64 MB tile per chunk would be page-faulted in and zeroed by the OS each time)."""
    return torch.empty(n_rows * chunk, device=device)


def _tile(buffer: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """A contiguous [n_rows, width] view at the start of ``buffer`` (width <= chunk)."""
    return buffer[: n_rows * width].view(n_rows, width)


def forward_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """Per-token statistics of softmax(hidden @ weight.T * inv_temp).

    hidden [N, D] (any float dtype), weight [V, D], targets [N] int64 in [0, V) or -1 (no
    target). Returns fp32 tensors lse [N], target_logit [N] (0 where target is -1) and
    mean_logit [N] = E_p[z] (so entropy = lse - mean_logit).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.float() * inv_temp  # z = (h / tau) @ w.T: the temperature costs N x D, not N x V
    m = torch.full((n,), float("-inf"), device=h.device)
    s = torch.zeros(n, device=h.device)
    t = torch.zeros(n, device=h.device)
    zy = torch.zeros(n, device=h.device)
    chunk = vocab_chunk(n, vocab, workspace_bytes)
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
        t.mul_(alpha).add_(e.mul_(z).sum(dim=1))
        m = m_new
    lse = m + torch.log(s)
    return lse, zy, t / s


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    lse: torch.Tensor,
    mean_logit: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    need_hidden: bool = True,
    need_weight: bool = True,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden and weight.

    Shapes as in :func:`forward_stats`; grad_logp and grad_entropy are fp32 [N] (0 on rows
    without a target). Returns (d_hidden [N, D], d_weight [V, D]) in fp32, either None when
    not needed. Each chunk's logits are recomputed from hidden and weight.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.float() * inv_temp  # logits z = h @ w.T, and dW = dz.T @ (h / tau)
    d_hidden = torch.zeros_like(h) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_weight else None
    chunk = vocab_chunk(n, vocab, workspace_bytes)
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
    return d_hidden, d_weight


def _target_rows(targets: torch.Tensor, v0: int, width: int):
    rows = ((targets >= v0) & (targets < v0 + width)).nonzero().squeeze(1)
    return rows, targets[rows] - v0


def _gather_targets(z: torch.Tensor, targets: torch.Tensor, v0: int, out: torch.Tensor) -> None:
    rows, cols = _target_rows(targets, v0, z.shape[1])
    out[rows] = z[rows, cols]


def _scatter_targets(dz: torch.Tensor, targets: torch.Tensor, v0: int, grad: torch.Tensor) -> None:
    rows, cols = _target_rows(targets, v0, dz.shape[1])
    dz[rows, cols] += grad[rows]
