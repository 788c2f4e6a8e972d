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
    h = hidden.float()
    m = torch.full((n,), float("-inf"), device=h.device)
    s = torch.zeros(n, device=h.device)
    t = torch.zeros(n, device=h.device)
    zy = torch.zeros(n, device=h.device)
    chunk = vocab_chunk(n, vocab, workspace_bytes)
    for v0 in range(0, vocab, chunk):
        z = h @ weight[v0 : v0 + chunk].float().T
        z.mul_(inv_temp)
        _gather_targets(z, targets, v0, zy)
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        t.mul_(alpha)
        s.mul_(alpha)
        e = torch.exp(z - m_new[:, None])
        s.add_(e.sum(dim=1))
        t.add_(e.mul_(z).sum(dim=1))
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
    h = hidden.float()
    d_hidden = torch.zeros_like(h) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_weight else None
    chunk = vocab_chunk(n, vocab, workspace_bytes)
    for v0 in range(0, vocab, chunk):
        w = weight[v0 : v0 + chunk].float()
        z = h @ w.T
        z.mul_(inv_temp)
        p = torch.exp(z - lse[:, None])
        if grad_entropy is None:
            dz = p.mul_(-grad_logp[:, None])
        else:
            z.sub_(mean_logit[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
            dz = p.mul_(z).neg_()
        _scatter_targets(dz, targets, v0, grad_logp)
        dz.mul_(inv_temp)
        if need_hidden:
            d_hidden.addmm_(dz, w)
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
