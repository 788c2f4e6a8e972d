"""Packed micro-batches and token-budget micro-batch planning.

A ``TrainBatch`` holds B right-padded rows [B, L]. *Packing* runs the model on the real tokens
only: the sequences are concatenated into one row (or a few rows, ``row_tokens``) with
per-sequence ``position_ids`` restarting at 0 and **no attention mask** and no cache, which is
how transformers recognizes packed sequences:

- ``flash_attention_2`` (CUDA, the flash-attn package): the variable-length kernel, fed with
  ``cu_seq_lens_q/k`` [S + 1] int32 and ``max_length_q/k`` (int) computed here on the host
  (transformers' flattening convention, as ``DataCollatorWithFlattening`` emits them), so it
  needs no device-to-host sync; one row (flash-attn's varlen path requires batch size 1).
- ``sdpa`` / ``eager`` (the CPU): transformers derives a block-diagonal causal mask from the
  packed ``position_ids`` (``masking_utils.find_packed_sequence_indices``: a boundary wherever
  the position does not grow by 1). That mask is dense, [R, 1, W, W] for R rows of W tokens,
  so attention costs O(W^2) per row whatever the sequences' lengths: ``row_tokens`` bounds W.

The model's hidden states come back in the padded layout ([B, L, D], zeros on padding) through
an index (``unpack``), so the loss kernels, the reference log-probs and the metrics see the same
tensors as without packing: the kernels drop masked tokens before any vocabulary work, and the
scatter costs memory of hidden size only, no model compute.

*Token budgets* (``plan_micro_batches``): micro-batches are contiguous runs of whole groups
(OAPL needs a prompt's G completions together), as many groups as fit in
``trainer.max_tokens_per_micro_batch`` forward positions (packed: the real tokens; padded: rows
x the longest row), also capped by ``trainer.micro_batch_size`` sequences when both are set. A
group larger than the budget forms a micro-batch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..batch import TrainBatch


@dataclass
class PackedRows:
    """The real tokens of a [B, L] right-padded batch in R packed rows of W tokens.

    input_ids [R, W] int64: the sequences back to back (row tails padded with ``pad_id``).
    position_ids [R, W] int64: 0, 1, ... within each sequence (a row's padding tail counts
        from 0 as one more sequence of its own, which no real token attends to).
    src [N] int64: flat index into R * W of each real token; dst [N] int64: the same token's
        flat index into B * L.
    shape: (B, L), the padded layout ``unpack`` returns.
    attn_kwargs: flash-attn varlen arguments (one row only, else empty): ``cu_seq_lens_q`` /
        ``cu_seq_lens_k`` [S + 1] int32 cumulative lengths, ``max_length_q`` /
        ``max_length_k`` int.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    shape: tuple[int, int]
    attn_kwargs: dict = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        """Positions the forward processes (R * W)."""
        return self.input_ids.numel()


def _rows(lengths: Sequence[int], row_tokens: int | None) -> list[list[int]]:
    """Sequences (indices into ``lengths``) per packed row: one row, or rows of at most
    max(row_tokens, longest sequence) tokens, filled first-fit in decreasing length order."""
    if row_tokens is None:
        return [list(range(len(lengths)))]
    cap = max(row_tokens, max(lengths))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, u in enumerate(used) if u + lengths[i] <= cap), len(rows))
        if k == len(rows):
            rows.append([])
            used.append(0)
        rows[k].append(i)
        used[k] += lengths[i]
    return rows


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, row_tokens: int | None = None,
         varlen_kwargs: bool = False, pad_id: int = 0) -> PackedRows:
    """Pack the right-padded ``input_ids`` / ``attention_mask`` [B, L] (int64; 1 on real tokens,
    a prefix of each row) into ``PackedRows`` on the same device. ``row_tokens``: at most that
    many tokens per packed row (a longer sequence gets a row of its own); None: one row.
    ``varlen_kwargs``: add flash-attn's ``cu_seq_lens_*`` / ``max_length_*`` (one row only)."""
    B, L = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    if min(lengths) < 1:
        raise ValueError("packing needs at least one real token in every row")
    if varlen_kwargs and row_tokens is not None:
        raise ValueError("flash-attn's varlen path takes one packed row (row_tokens=None)")
    rows = _rows(lengths, row_tokens)
    W = max(sum(lengths[i] for i in r) for r in rows)
    pos = torch.zeros(len(rows), W, dtype=torch.long)
    src, dst = [], []
    for k, r in enumerate(rows):
        at = 0
        for i in r:
            n = lengths[i]
            pos[k, at : at + n] = torch.arange(n)
            src.append(torch.arange(k * W + at, k * W + at + n))
            dst.append(torch.arange(i * L, i * L + n))
            at += n
        pos[k, at:] = torch.arange(W - at)
    device = input_ids.device
    src_t, dst_t = torch.cat(src).to(device), torch.cat(dst).to(device)
    ids = torch.full((len(rows) * W,), pad_id, dtype=input_ids.dtype, device=device)
    ids[src_t] = input_ids.reshape(-1)[dst_t]
    kwargs = {}
    if varlen_kwargs:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                  "max_length_q": int(max(lengths)), "max_length_k": int(max(lengths))}
    return PackedRows(ids.view(len(rows), W), pos.to(device), src_t, dst_t, (B, L), kwargs)


def unpack(hidden: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """Packed hidden states [R, W, D] -> the padded layout [B, L, D] (same dtype; zeros on
    padding), differentiable (the gradient flows back to the packed rows' real tokens)."""
    B, L = packed.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat.new_zeros(B * L, flat.shape[-1])
    return out.index_copy(0, packed.dst, flat.index_select(0, packed.src)).view(B, L, -1)


DENSE_MASK_ROW_TOKENS = 512


def default_packing(policy) -> bool:
    """``trainer.packing`` when unset: on. With flash-attn the variable-length kernel drops
    padding outright; with sdpa/eager (the CPU) packed rows of at most
    ``DENSE_MASK_ROW_TOKENS`` tokens (``row_tokens_for``) measured faster than padding (see
    docs/TRAINING.md, "Packed sequences")."""
    return True


def uses_varlen(policy) -> bool:
    """Whether ``policy`` runs flash-attn (``flash_attention_2``), whose packed path is the
    variable-length kernel on one row."""
    return policy.model.config._attn_implementation == "flash_attention_2"


def row_tokens_for(policy, row_tokens: int | None) -> int | None:
    """The packed-row cap to use: none with flash-attn (one row, the varlen kernel's cost is
    linear in each sequence's length); with sdpa/eager ``row_tokens``, else
    ``DENSE_MASK_ROW_TOKENS`` (their block-diagonal mask is dense: O(W^2) per row of W)."""
    if uses_varlen(policy):
        return None
    return row_tokens if row_tokens is not None else DENSE_MASK_ROW_TOKENS


def hidden_states(policy, mb: TrainBatch, *, packing: bool,
                  row_tokens: int | None = None) -> torch.Tensor:
    """The policy's last hidden states [B, L, D] for micro-batch ``mb`` in its padded layout
    (position t predicts token t + 1), computed on the padded rows or on packed ones
    (``pack`` / ``unpack``; flash-attn's varlen arguments when the model uses
    ``flash_attention_2``, which takes one row)."""
    if not packing:
        return policy.hidden_states(mb.input_ids, mb.attention_mask)
    varlen = uses_varlen(policy)
    p = pack(mb.input_ids, mb.attention_mask, row_tokens=None if varlen else row_tokens,
             varlen_kwargs=varlen)
    return unpack(policy.packed_hidden_states(p.input_ids, p.position_ids, **p.attn_kwargs), p)


def forward_positions(lengths: Sequence[int], *, packing: bool,
                      row_tokens: int | None = None) -> int:
    """Positions a forward over sequences of ``lengths`` processes: padded, rows x the longest;
    packed, the rows' width x their number (the real tokens when one row)."""
    if not lengths:
        return 0
    if not packing:
        return len(lengths) * max(lengths)
    rows = _rows(lengths, row_tokens)
    return len(rows) * max(sum(lengths[i] for i in r) for r in rows)


def plan_micro_batches(lengths: Sequence[int], group_size: int, *, packing: bool,
                       max_tokens: int | None = None, micro_batch_size: int | None = None,
                       row_tokens: int | None = None, count: int | None = None,
                       ) -> list[tuple[int, int]]:
    """Micro-batches as row ranges [start, stop) of whole, consecutive groups of
    ``group_size`` rows, covering all ``lengths`` (real tokens per row, a multiple of
    ``group_size`` of them) in order.

    Greedy: a micro-batch takes the next group while it stays within ``max_tokens`` forward
    positions (``forward_positions``) and ``micro_batch_size`` sequences (None: no limit); a
    group over the budget on its own is a micro-batch of its own. ``count``: split further
    (the micro-batch with the most positions, at its balanced group boundary) until there
    are exactly ``count`` micro-batches (sharded training: every rank runs the same number);
    ``count`` must not exceed the number of groups, nor be below the greedy plan's length.
    """
    n = len(lengths)
    if n % group_size:
        raise ValueError(f"{n} rows is not a whole number of groups of {group_size}")
    cost = lambda a, b: forward_positions(lengths[a:b], packing=packing, row_tokens=row_tokens)
    plan: list[tuple[int, int]] = []
    for start in range(0, n, group_size):
        stop = start + group_size
        if plan:
            a, _ = plan[-1]
            fits = max_tokens is None or cost(a, stop) <= max_tokens
            fits = fits and (micro_batch_size is None or stop - a <= micro_batch_size)
            if fits:
                plan[-1] = (a, stop)
                continue
        plan.append((start, stop))
    if count is None:
        return plan
    if count < len(plan) or count > n // group_size:
        raise ValueError(f"cannot split {n // group_size} groups into exactly {count} "
                         f"micro-batches (the budget needs {len(plan)})")
    while len(plan) < count:
        k = max((j for j, (a, b) in enumerate(plan) if b - a > group_size),
                key=lambda j: cost(*plan[j]))
        a, b = plan[k]
        cuts = range(a + group_size, b, group_size)
        cut = min(cuts, key=lambda c: max(cost(a, c), cost(c, b)))
        plan[k : k + 1] = [(a, cut), (cut, b)]
    return plan
