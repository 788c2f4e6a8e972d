"""OAPL's loss with its gradient finished inside the forward pass.

V* and A come from the rewards, known before the forward, so sequence i's residual
res_i = beta2 * (S_i - S_ref_i) - A_i depends only on its own log-prob sum S_i. A chunk of
whole sequences can therefore go logits -> LSE -> S_i -> res_i -> dz -> dH, dW in one visit:
3 GEMM-equivalents (logits, dz W, dz^T H) instead of the 4 of forward + recomputing backward.
dH and dW are kept, and the backward only scales them by the incoming scalar gradient. This
is exact as long as the OAPL loss is what gets differentiated; a caller who adds other
per-token terms uses :func:`oapl_kernels.linear_logprobs` (the recompute path).

Each chunk's raw logits live in a workspace ([rows, V] fp32 and its gradient) of
``launch.workspace_bytes()`` (env OAPL_WORKSPACE_MB; 2 GiB by default) on the Triton path and
of the chunked PyTorch path's 64 MiB on the CPU unless that variable is set. A chunk holds at
least one whole sequence, so a sequence longer than the budget gets a chunk of its own.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .triton import launch


def _chunks(lengths: list[int], max_rows: int):
    """Greedy runs of whole sequences: yields (first seq, end seq, first row, end row)."""
    s0 = r0 = 0
    rows = 0
    for i, n in enumerate(lengths):
        if rows and rows + n > max_rows:
            yield s0, i, r0, r0 + rows
            s0, r0, rows = i, r0 + rows, 0
        rows += n
    yield s0, len(lengths), r0, r0 + rows


def _torch_stats(z, targets, inv_temp, p_out):
    """From raw logits z [C, V] (clobbered): lse, target logit, mean logit [C], and the
    probabilities written to p_out [C, V]. One exp pass."""
    z = z.mul_(inv_temp)
    top = z.amax(dim=1)
    p = torch.sub(z, top[:, None], out=p_out).exp_()
    total = p.sum(dim=1)
    zy = z.gather(1, targets[:, None])[:, 0]
    mean = z.mul_(p).sum(dim=1) / total
    p.div_(total[:, None])
    return top + torch.log(total), zy, mean, p


def _torch_dlogits(p, targets, g, inv_temp):
    """p [C, V] becomes dz = inv_temp * g (1[v=y] - p) in place."""
    dz = p.mul_(-g[:, None])
    dz[torch.arange(len(targets), device=p.device), targets] += g
    return dz.mul_(inv_temp)


class FusedOAPL(torch.autograd.Function):
    """loss = mean_i res_i^2 over B sequences, with dH and dW formed in the forward.

    forward(hidden [K, D], weight [V, D], targets [K] int64, lengths list[int] (kept tokens per
    sequence, sequence-major rows, sum K), ref_sums [B] fp32, advantages [B] fp32, beta2,
    inv_temp, impl) -> (loss scalar, logp [K] fp32, entropy [K] fp32, residuals [B] fp32);
    only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, lengths, ref_sums, advantages, beta2, inv_temp, impl):
        k, vocab = hidden.shape[0], weight.shape[0]
        n_seq = len(lengths)
        dev = hidden.device
        triton_path = impl == "triton"
        grad_dtype = hidden.dtype if triton_path else torch.float32  # dz, or the torch path's p
        per_row = vocab * (4 + torch.finfo(grad_dtype).bits // 8)
        budget = (launch.workspace_bytes() if triton_path or "OAPL_WORKSPACE_MB" in os.environ
                  else reference.DEFAULT_WORKSPACE_BYTES)
        max_rows = max(1, budget // per_row)
        seq_of_row = torch.repeat_interleave(torch.arange(n_seq, device=dev),
                                             torch.tensor(lengths, device=dev), output_size=k)
        logp = torch.empty(k, dtype=torch.float32, device=dev)
        entropy = torch.empty(k, dtype=torch.float32, device=dev)
        res = torch.empty(n_seq, dtype=torch.float32, device=dev)
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        rows_max = min(k, max(max_rows, max(lengths, default=0)))
        z_buf = torch.empty(rows_max * vocab, dtype=torch.float32, device=dev)
        dz_buf = torch.empty(rows_max * vocab, dtype=grad_dtype, device=dev)
        w32 = weight if triton_path else weight.float()
        for s0, s1, r0, r1 in _chunks(lengths, max_rows):
            if r1 == r0:
                res[s0:s1] = -advantages[s0:s1]
                continue
            h, y, c = hidden[r0:r1], targets[r0:r1], r1 - r0
            z = launch.logits_into(z_buf[: c * vocab].view(c, vocab), h, weight)
            dz = dz_buf[: c * vocab].view(c, vocab)
            if triton_path:
                lse, zy, mean = launch.stats_from(h, weight, y, inv_temp, True, logits=z)
            else:
                lse, zy, mean, probs = _torch_stats(z, y, inv_temp, dz)
            logp[r0:r1] = zy - lse
            entropy[r0:r1] = lse - mean
            local = seq_of_row[r0:r1] - s0
            seq_sum = torch.zeros(s1 - s0, dtype=torch.float32, device=dev).index_add_(0, local, logp[r0:r1])
            res[s0:s1] = beta2 * (seq_sum - ref_sums[s0:s1]) - advantages[s0:s1]
            g = (2.0 * beta2 / n_seq) * res[s0:s1][local]
            if triton_path:
                launch.dlogits_into(dz, h, weight, y, inv_temp, lse, None, g, None, 0, vocab, logits=z)
                torch.mm(dz, weight, out=d_hidden[r0:r1])
                launch.accumulate_mm(d_weight, dz.T, h)
            else:
                dz = _torch_dlogits(probs, y, g, inv_temp)
                d_hidden[r0:r1] = dz @ w32
                d_weight.addmm_(dz.T, h.float())
        ctx.grads = (d_hidden, d_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logp, entropy, res)
        return res.square().mean(), logp, entropy, res

    @staticmethod
    def backward(ctx, grad_loss, *_):
        d_hidden, d_weight = ctx.grads
        return d_hidden * grad_loss.to(d_hidden.dtype), d_weight * grad_loss.to(d_weight.dtype), *([None] * 7)
