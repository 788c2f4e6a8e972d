"""Batch-invariant log-probs on the torch path: a sequence's per-token log-probs and entropies are
bitwise the same computed alone, among 63 other rows, inside a packed row, split across the
forward's row tiles, and inside the fused loss with the sequence split across chunks (fixed
GEMM tiles, ``tuning.ROW_TILE`` x ``tuning.VOCAB_TILE``, and a fixed reduction order)."""
import pytest
import torch

from oapl_kernels import linear_logprobs, oapl_loss, tuning
from oapl_kernels.fused import plan
from oapl_kernels.logprobs import backend

VOCAB, DIM, T = 2 * tuning.VOCAB_TILE + 77, 48, 150  # three vocab tiles; T > one row tile


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.4).to(dtype)
    row = (torch.randn(T, DIM, generator=g)).to(dtype)
    row_targets = torch.randint(0, VOCAB, (T,), generator=g)
    others = (torch.randn(64, T, DIM, generator=g)).to(dtype)
    other_targets = torch.randint(0, VOCAB, (64, T), generator=g)
    other_targets[:, T - 40 :] = -100  # padding: the call compacts a ragged number of rows
    return weight, row, row_targets, others, other_targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_logprobs_independent_of_the_batch(dtype):
    weight, row, y, others, other_y = _data(dtype)
    kw = dict(temperature=0.7, return_entropy=True, impl="torch")
    alone = linear_logprobs(row, weight, y, **kw)
    batch, batch_y = others.clone(), other_y.clone()
    batch[17], batch_y[17] = row, y
    among = [x[17] for x in linear_logprobs(batch, weight, batch_y, **kw)]
    # a packed row: 37 tokens of another sequence first, so the row straddles two row tiles
    packed = torch.cat([others[0, :37], row, others[1, :90]])[None]
    packed_y = torch.cat([other_y[0, :37], y, other_y[1, :90]])[None]
    inside = [x[0, 37 : 37 + T] for x in linear_logprobs(packed, weight, packed_y, **kw)]
    first = [x[:1] for x in linear_logprobs(row[:1], weight, y[:1], **kw)]  # N = 1
    for got in (among, inside):
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
    assert torch.equal(first[0], alone[0][:1]) and torch.equal(first[1], alone[1][:1])


@pytest.mark.parametrize("fused", [True, False])
def test_loss_logprobs_equal_linear_logprobs_bitwise(fused, monkeypatch):
    """The loss's log-probs (fused: the sequence split over chunks of 40 rows) are linear_logprobs'."""
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    monkeypatch.setattr(tuning, "SIDE_BUFFER_SHARE", 0.0)  # two passes: pass 1 walks the split rows too
    weight, row, y, others, other_y = _data(torch.float32, seed=1)
    hidden = torch.stack([row, others[0], others[1], others[2]]).requires_grad_()
    targets = torch.stack([y, other_y[0], other_y[1], other_y[2]])
    mask = targets != -100
    mask[0, :11] = False  # a prompt
    chunk = backend("torch").FusedChunk
    ws = 40 * chunk.bytes_per_row(VOCAB, DIM, torch.float32) + chunk.fixed_bytes(VOCAB, DIM, torch.float32)
    assert plan(chunk, ws, weight, T)[0] == 40
    out = oapl_loss(hidden, weight, targets, torch.zeros(4, T), torch.tensor([1.0, 0.0, 1.0, 0.0]), mask,
                    group_size=2, beta1=1.0, beta2=0.1, temperature=0.7, impl="torch", fused=fused,
                    workspace_bytes=ws)
    alone = linear_logprobs(row[11:], weight, y[11:], temperature=0.7, impl="torch")
    assert torch.equal(out.logprobs[0, 11:], alone)
