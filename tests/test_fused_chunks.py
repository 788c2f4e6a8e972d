"""The fused OAPL loss when chunks split sequences: the chunk plan, values and both gradients
against float64 at odd split points, the workspace argument, and peak memory flat in the
completion length on both paths."""
import itertools
import math

import pytest
import torch

from benchmarks import naive
from benchmarks.common import peak_allocated
from benchmarks.naive import float64_leaves, rel_err
from oapl_kernels import oapl_loss, tuning
from oapl_kernels.fused import plan, plan_chunks
from oapl_kernels.logprobs import backend


def _pieces(lengths, windows):
    """How many windows each sequence's rows fall in."""
    starts = list(itertools.accumulate(lengths, initial=0))
    return [sum(1 for r0, r1 in windows if max(r0, starts[i]) < min(r1, starts[i + 1])) for i in range(len(lengths))]


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 40])
def test_plan_chunks_covers_rows_and_splits_only_long_sequences(rows):
    lengths = [0, 3, 7, 0, 0, 14, 1, 2, 0, 5]
    windows = plan_chunks(lengths, rows)
    assert windows[0][0] == 0 and windows[-1][1] == sum(lengths)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(0 < r1 - r0 <= rows for r0, r1 in windows)
    for n, k in zip(lengths, _pieces(lengths, windows)):
        if n == 0:
            assert k == 0
        elif n <= rows:
            assert k == 1  # a sequence that fits a chunk is never split
        else:
            assert math.ceil(n / rows) <= k <= math.ceil(n / rows) + 1


def test_plan_chunks_edges():
    assert plan_chunks([], 4) == [] and plan_chunks([0, 0], 4) == []
    assert plan_chunks([14], 2) == [(i, i + 2) for i in range(0, 14, 2)]  # split in 7
    assert plan_chunks([3, 3], 4) == [(0, 3), (3, 6)]  # closed early to keep the second whole


# (completion lengths, rows per chunk, group size, pieces of the most split sequence)
SPLITS = {
    "split-in-2-and-3-with-empties-between": ([3, 8, 0, 0, 6, 2], 5, 3, 3),
    "split-in-7": ([14, 1, 13], 2, 3, 7),
    "chunks-of-one-row": ([4, 0, 3, 1], 1, 2, 4),
}


def _batch(lengths, d, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths) + 3
    hidden = (torch.randn(b, t, d, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * 0.7).to(dtype)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):  # a prompt prefix of random length, then the completion
        p = int(torch.randint(0, t - n + 1, (1,), generator=g))
        mask[i, p : p + n] = True
    inf_lp = torch.where(mask, -torch.rand(b, t, generator=g) * 4, float("nan"))
    rewards = torch.randint(0, 2, (b,), generator=g).float() + 0.1 * torch.randn(b, generator=g)
    return hidden, weight, targets, inf_lp, rewards, mask


def _workspace(impl, rows, vocab, d, dtype, strategy="two-pass", monkeypatch=None):
    """A workspace of exactly ``rows`` rows of the fused path's chunk buffers, plus the side
    buffer for strategy "side-buffer" (then allowed whatever its share of the workspace);
    strategy "two-pass" forbids the side buffer."""
    if monkeypatch is not None:
        monkeypatch.setattr(tuning, "SIDE_BUFFER_SHARE", 1.0 if strategy == "side-buffer" else 0.0)
    side = vocab * d * 4 if strategy == "side-buffer" else 0
    chunk = backend(impl).FusedChunk
    return rows * chunk.bytes_per_row(vocab, d, dtype) + chunk.fixed_bytes(vocab, d, dtype) + side


def _plan(impl, ws, vocab, d, dtype, longest):
    return plan(backend(impl).FusedChunk, ws, torch.empty(vocab, d, dtype=dtype), longest)


# The fused path reads logits from its workspace in both Triton modes: no "triton-tile" here.
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("strategy", ["two-pass", "side-buffer"])
@pytest.mark.parametrize("case", list(SPLITS))
def test_split_sequences_match_float64(impl, strategy, case, monkeypatch):
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    lengths, rows, group, most = SPLITS[case]
    assert max(_pieces(lengths, plan_chunks(lengths, rows))) == most
    vocab, d = 157, 2  # a small D: the side buffer ([V, D]) stays smaller than the sequences
    ws = _workspace(impl, rows, vocab, d, torch.float32, strategy, monkeypatch)
    assert _plan(impl, ws, vocab, d, torch.float32, max(lengths)) == (rows, strategy == "side-buffer")
    hidden, weight, targets, inf_lp, rewards, mask = _batch(lengths, d, vocab, seed=rows)
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=group, beta1=0.8, beta2=0.4,
                    temperature=0.9, impl=impl, workspace_bytes=ws)
    (2.0 * out.loss).backward()
    ref = naive.oapl(h64, w64, targets, inf_lp, rewards, mask, group_size=group, beta1=0.8, beta2=0.4,
                     temperature=0.9)
    (2.0 * ref["loss"]).backward()
    lp64 = naive.logprobs(h64.detach(), w64.detach(), torch.where(mask, targets, -100), temperature=0.9)
    assert rel_err(out.loss, ref["loss"]) <= 1e-5
    assert rel_err(out.residuals, ref["residuals"]) <= 1e-5
    assert rel_err(out.logprobs, lp64) <= 1e-5
    assert abs(out.entropy_mean.item() - ref["entropy_mean"].item()) <= 1e-4
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("strategy", ["two-pass", "side-buffer"])
def test_split_sequences_bf16(impl, strategy, monkeypatch):
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    lengths, vocab, d = [9, 0, 11, 2], 130, 4
    ws = _workspace(impl, 4, vocab, d, torch.bfloat16, strategy, monkeypatch)
    assert _plan(impl, ws, vocab, d, torch.bfloat16, max(lengths)) == (4, strategy == "side-buffer")
    hidden, weight, targets, inf_lp, rewards, mask = _batch(lengths, d, vocab, seed=5, dtype=torch.bfloat16)
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1, impl=impl,
                    workspace_bytes=ws)
    out.loss.backward()
    ref = naive.oapl(h64, w64, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)
    ref["loss"].backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel_err(out.loss, ref["loss"]) <= 1e-4
    assert rel_err(h.grad, h64.grad) <= 2e-2 and rel_err(w.grad, w64.grad) <= 2e-2


def test_workspace_argument_env_override_and_validation(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    assert tuning.workspace_bytes(cpu) == tuning.CPU_WORKSPACE_BYTES
    assert tuning.workspace_bytes(torch.device("cuda", 0)) == tuning.CUDA_WORKSPACE_BYTES
    assert tuning.workspace_bytes(cpu, 12345) == 12345
    monkeypatch.setenv(tuning.WORKSPACE_ENV, "3")
    assert tuning.workspace_bytes(cpu, 12345) == 3 * 2**20  # the environment overrides the argument
    monkeypatch.setenv(tuning.WORKSPACE_ENV, "0")
    hidden, weight, targets, inf_lp, rewards, mask = _batch([3, 4], 8, 40, seed=0)
    with pytest.raises(ValueError, match="workspace"):
        oapl_loss(hidden.requires_grad_(), weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0,
                  beta2=0.1)


def _beyond_allowance(lengths, d, vocab, impl, ws):
    """Peak bytes torch allocates during one fused fwd+bwd (after a warm-up call) beyond what the
    contract allows outside the workspace: gradients (stored and returned, 2 x the inputs' bytes)
    and O(N) per-token statistics (64 bytes a row, generously); and the workspace."""
    hidden, weight, targets, inf_lp, rewards, mask = _batch(lengths, d, vocab, seed=1)
    t = max(lengths)
    mask[:] = False
    mask[:, :t] = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    inf_lp = inf_lp.nan_to_num(-1.0)
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def run():
        out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1, impl=impl,
                        workspace_bytes=ws)
        out.loss.backward()
        h.grad = w.grad = None
        return out.loss.detach()

    run()  # one-time allocations (the interpreter's caches) stay out of the figure
    allowance = 2 * (h.numel() + w.numel()) * 4 + 64 * mask.numel()
    return peak_allocated(run)[1] - allowance


@pytest.mark.parametrize("impl,n,d,vocab,rows,side_buffer", [
    ("torch", 1024, 64, 2048, 64, True),  # one 1024-token completion spans 16 chunks
    ("triton", 32, 32, 200, 8, False),  # interpreted: the workspace is CPU memory
])
def test_peak_memory_flat_in_completion_length(impl, n, d, vocab, rows, side_buffer, monkeypatch):
    """One sequence of n tokens costs what 2 n / rows sequences of rows / 2 tokens (each within
    a chunk) cost, within the workspace (the side buffer, when used, counted in it); before
    sequences were split, the long one's chunk held all its rows (n / rows workspaces)."""
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    ws = _workspace(impl, rows, vocab, d, torch.float32, "side-buffer" if side_buffer else "two-pass")
    assert _plan(impl, ws, vocab, d, torch.float32, n)[1] == side_buffer
    short = _beyond_allowance([rows // 2] * (2 * n // rows), d, vocab, impl, ws)
    long = _beyond_allowance([n, 0], d, vocab, impl, ws)
    assert long <= short + ws // 4, (long, short, ws)
    assert long <= ws, (long, ws)


@pytest.mark.slow
def test_memory_bound_at_2_16_tokens(monkeypatch):
    """One completion of 2^16 tokens (256 chunks of 256 rows) stays within the workspace
    beyond gradients and O(N) statistics, and costs what 2^16 tokens as 4,096 sequences of 16 do."""
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)
    n, d, vocab, rows = 2**16, 8, 256, 256
    ws = _workspace("torch", rows, vocab, d, torch.float32, "side-buffer")
    assert _plan("torch", ws, vocab, d, torch.float32, n) == (rows, True)
    long = _beyond_allowance([n, 0], d, vocab, "torch", ws)
    short = _beyond_allowance([16] * (n // 16), d, vocab, "torch", ws)
    assert long <= ws, (long, ws)
    assert long <= short + ws // 4, (long, short, ws)
