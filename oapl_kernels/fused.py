"""OAPL's loss with its gradient finished inside the forward pass (backend-independent loop).

V* and A come from the rewards, known before the forward, so sequence i's residual res_i
depends only on its own log-prob sum S_i (:class:`oapl_kernels.objective.OAPLObjective`). Once
S_i is known, so is g_i = dloss/dS_i, and a chunk of rows can go logits -> LSE -> S_i -> g_i ->
dz -> dH, dW in one visit: 3 GEMM-equivalents (logits, dz W, dz^T H) instead of the 4 of a
forward plus a recomputing backward. dH and dW are kept; the backward only scales them by the
incoming scalar gradient. This is exact as long as the OAPL loss is what gets differentiated;
a caller who adds other per-token terms uses :func:`oapl_kernels.linear_logprobs`.

Memory: a chunk's buffers (the backend's ``FusedChunk``: ``bytes_per_row`` each row and
``fixed_bytes`` in all) fit the workspace whatever the sequence lengths (:func:`plan`). Rows are packed into chunks of at most ``rows``
rows; a sequence that fits a chunk is never split (a chunk ends before it instead), a longer
one is split across chunks, and its S_i is not known when its first chunk is visited. Two
ways, chosen by ``tuning.fused_plan``:

* side buffer (when an fp32 [V, D] buffer fits ``tuning.SIDE_BUFFER_SHARE`` of the workspace):
  the open sequence's rows get g = 1, their dH is stored unscaled and their dW goes to the
  side buffer; once the sequence closes, its dH rows and the side buffer are scaled by g_i
  and the buffer is added to dW. 3 GEMM-equivalents for every row.
* two passes (otherwise): pass 1 computes the statistics of the split sequences' rows only
  (logits, LSE, target logit, through the same buffers) to get their S_i; pass 2 visits every
  chunk as above. 4 GEMM-equivalents on the rows of split sequences, 3 on the others.
"""
from __future__ import annotations

import bisect
import itertools

import torch

from . import tuning
from .objective import OAPLObjective


def plan(chunk_type, workspace: int, weight: torch.Tensor, longest: int) -> tuple[int, bool]:
    """(rows per chunk, side buffer?) of the backend's ``chunk_type`` (its ``FusedChunk``) for
    ``weight`` [V, D] within ``workspace`` bytes, the longest sequence having ``longest`` rows."""
    vocab, dim = weight.shape
    return tuning.fused_plan(workspace, chunk_type.bytes_per_row(vocab, dim, weight.dtype), weight.numel() * 4,
                             longest, chunk_type.fixed_bytes(vocab, dim, weight.dtype), chunk_type.row_multiple)


def plan_chunks(lengths: list[int], rows: int) -> list[tuple[int, int]]:
    """Row windows [r0, r1) of at most ``rows`` rows covering sum(lengths) sequence-major rows.

    A sequence of at most ``rows`` rows lies in one window (a window is closed early to keep it
    whole); a longer one fills the current window and continues in the next ones.
    """
    windows, r0, used = [], 0, 0
    for n in lengths:
        if n <= rows and used + n > rows:
            windows.append((r0, r0 + used))
            r0, used = r0 + used, 0
        while n > 0:
            take = min(n, rows - used)
            used, n = used + take, n - take
            if used == rows:
                windows.append((r0, r0 + used))
                r0, used = r0 + used, 0
    if used:
        windows.append((r0, r0 + used))
    return windows


class FusedOAPL(torch.autograd.Function):
    """loss = objective.loss(res) over B sequences, with dH and dW formed in the forward.

    forward(hidden [K, D], weight [V, D], targets [K] int64 in [0, V), lengths list[int] (kept
    tokens per sequence, sequence-major rows, sum K), objective :class:`OAPLObjective` of the
    B = len(lengths) sequences, inv_temp, chunk_type (the backend's ``FusedChunk``), rows
    (rows per chunk), side_buffer (bool: how split sequences are handled, see the module))
    -> (loss scalar, logp [K] fp32, entropy [K] fp32, residuals [B] fp32); only ``loss`` is
    differentiable. Gradients: hidden's dtype, weight's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, lengths, objective: OAPLObjective, inv_temp, chunk_type, rows,
                side_buffer, filter_eps):
        k, n_seq, dev = hidden.shape[0], len(lengths), hidden.device
        starts = list(itertools.accumulate(lengths, initial=0))
        long_seqs = [i for i, n in enumerate(lengths) if n > rows]
        seq_of_row = torch.repeat_interleave(torch.arange(n_seq, device=dev),
                                             torch.tensor(lengths, device=dev), output_size=k)
        chunk = chunk_type(min(rows, k), weight)
        seq_sum = torch.zeros(n_seq, dtype=torch.float32, device=dev)  # S = 0: empty completions
        from_pass_1 = torch.zeros(n_seq, dtype=torch.bool, device=dev)
        side = None
        if side_buffer and long_seqs:
            side = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        else:  # pass 1: the log-prob sums of the sequences longer than a chunk
            from_pass_1[long_seqs] = True
            for i in long_seqs:
                for a in range(starts[i], starts[i + 1], rows):
                    b = min(a + rows, starts[i + 1])
                    lse, zy, _ = chunk.stats(hidden[a:b], targets[a:b], inv_temp, with_entropy=False)
                    seq_sum[i] += (zy - lse).sum()
        res = objective.residuals(seq_sum)
        seq_sum.masked_fill_(from_pass_1, 0.0)

        # Every chunk, its gradient finished as soon as its sequences' sums are known.
        logp = torch.empty(k, dtype=torch.float32, device=dev)
        entropy = torch.empty(k, dtype=torch.float32, device=dev)
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        open_seq = None  # the sequence whose dW is in the side buffer
        for r0, r1 in plan_chunks(lengths, rows):
            h, y = hidden[r0:r1], targets[r0:r1]
            lse, zy, mean = chunk.stats(h, y, inv_temp, with_entropy=True)
            logp[r0:r1] = zy - lse
            entropy[r0:r1] = lse - mean
            # Sequences with rows here: s0..s1-1; the last continues past r1 when starts[s1] > r1.
            s0, s1 = bisect.bisect_right(starts, r0) - 1, bisect.bisect_left(starts, r1)
            local = seq_of_row[r0:r1] - s0
            seq_sum.index_add_(0, seq_of_row[r0:r1], logp[r0:r1])
            closed = slice(s0, s1 - 1 if starts[s1] > r1 else s1)
            res[closed] = torch.where(from_pass_1[closed], res[closed], objective.residuals(seq_sum[closed], closed))
            if open_seq is not None and open_seq < closed.stop:  # it closed here: scale what it left
                coef = objective.seq_grad(res[open_seq : open_seq + 1], n_seq)
                d_weight.addcmul_(side, coef)
                side.zero_()
                d_hidden[starts[open_seq] : r0].mul_(coef.to(d_hidden.dtype))
                open_seq = None
            g = objective.seq_grad(res[s0:s1], n_seq)[local]
            side_from = None
            if side is not None and starts[s1] > r1:  # the last sequence stays open: g = 1 for now
                open_seq, side_from = s1 - 1, max(starts[s1 - 1], r0) - r0
                g[side_from:] = 1.0
            chunk.grads(h, y, g, inv_temp, d_hidden[r0:r1], d_weight, side, side_from, filter_eps)
        ctx.grads = (d_hidden, d_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logp, entropy, res)
        return objective.loss(res), logp, entropy, res

    @staticmethod
    def backward(ctx, grad_loss, *_):
        d_hidden, d_weight = ctx.grads
        return d_hidden * grad_loss.to(d_hidden.dtype), d_weight * grad_loss.to(d_weight.dtype), *([None] * 8)
