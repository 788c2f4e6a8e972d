"""Gradient filtering (grad_filter_eps): the filtered gradients equal a float64 reference whose
logits gradient is zeroed exactly on the skipped blocks, on every path (torch, Triton
interpreted in both logits modes; unfused backward and fused loss, sequences split across
chunks); eps = 0 and an eps below every probability change nothing, bit for bit."""
import pytest
import torch

from benchmarks import naive
from benchmarks.naive import filter_keep, float64_leaves, rel_err
from oapl_kernels import OAPLLoss, filtering, grpo_loss, linear_logprobs, oapl_loss, tuning
from oapl_kernels.fused import plan, plan_chunks
from oapl_kernels.logprobs import backend

BLOCK = tuning.FILTER_COLS  # the torch path's and the interpreter's
COMMON = 2  # of every 5 blocks, 2 hold likely tokens, 3 rare ones


@pytest.fixture(autouse=True)
def _no_workspace_env(monkeypatch):
    monkeypatch.delenv(tuning.WORKSPACE_ENV, raising=False)


def _head(lead, vocab, dim, seed, dtype=torch.float32):
    """hidden [*lead, dim], weight [vocab, dim] whose "rare" blocks get logits ~9 lower (feature 0
    of hidden is 1, weight's feature 0 is -9 there), and targets: mostly common, a few rare."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g) * 0.5
    hidden[..., 0] = 1.0
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    rare = (torch.arange(vocab) // BLOCK) % 5 >= COMMON
    weight[:, 0] = torch.where(rare, -9.0, 0.0)
    common_ids = (~rare).nonzero().squeeze(1)
    targets = common_ids[torch.randint(0, len(common_ids), lead, generator=g)]
    targets.view(-1)[3] = int(rare.nonzero()[-1])  # a rare target: its block must stay
    return hidden.to(dtype), weight.to(dtype), targets


def _eps_between(probs, rare_cols):
    """An eps between the largest rare and the smallest common probability (a clear gap)."""
    top_rare = probs[:, rare_cols].max().item()
    low_common_block = min(probs[:, b0 : b0 + BLOCK].max().item() for b0 in range(0, probs.shape[1], BLOCK)
                           if (b0 // BLOCK) % 5 < COMMON)
    assert low_common_block > 30 * top_rare, (low_common_block, top_rare)
    return (low_common_block * top_rare) ** 0.5


def _probs64(hidden, weight, temperature):
    z = naive.logits(hidden.double(), weight.double(), temperature)
    return torch.softmax(z, dim=-1)


@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprobs_filtered_matches_float64(impl, entropy):
    temperature = 0.8
    hidden, weight, targets = _head((2, 23), 1000, 24, seed=1)  # V = 15.6 blocks
    targets[1, 5:9] = -100  # ignored rows: not among the rows of the chunk
    keep_rows = targets != -100
    probs = _probs64(hidden, weight, temperature)[keep_rows]
    rare = (torch.arange(1000) // BLOCK) % 5 >= COMMON
    eps = _eps_between(probs, rare)
    keep = filter_keep(probs, targets[keep_rows], [(0, int(keep_rows.sum()))], BLOCK, eps)
    grad_keep = torch.zeros(*targets.shape, 1000, dtype=torch.bool)
    grad_keep[keep_rows] = keep
    assert 0 < keep[0].float().mean() < 1 and keep[0, int(targets.view(-1)[3])]

    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    with filtering.count() as counts:
        lp, ent = linear_logprobs(h, w, targets, temperature=temperature, return_entropy=True, impl=impl,
                                  grad_filter_eps=eps)
        (lp * g_lp + (ent * g_ent if entropy else 0)).sum().backward()
    lp64, ent64 = naive.logprobs(h64, w64, targets, temperature=temperature, return_entropy=True,
                                 grad_keep=grad_keep)
    (lp64 * g_lp + (ent64 * g_ent if entropy else 0)).sum().backward()
    assert rel_err(lp, lp64) <= 1e-5  # the forward is never filtered
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5
    assert counts.blocks == 16 and counts.skipped == sum(not keep[0, b0] for b0 in range(0, 1000, BLOCK))
    skipped = ~keep[0]  # their dW rows are exactly 0 where the exact gradient's are not
    assert torch.all(w.grad[skipped] == 0) and torch.all(w64.grad[skipped] == 0)
    (e64, ew64), _ = float64_leaves(hidden, weight)
    lp_e, ent_e = naive.logprobs(e64, ew64, targets, temperature=temperature, return_entropy=True)
    (lp_e * g_lp + (ent_e * g_ent if entropy else 0)).sum().backward()
    assert bool((ew64.grad[skipped] != 0).all())


def test_eps_zero_and_below_every_probability_change_nothing(impl):
    hidden, weight, targets = _head((37,), 301, 16, seed=3)
    results = []
    for eps in (None, 0.0, 1e-30):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = {} if eps is None else {"grad_filter_eps": eps}
        with filtering.count() as counts:
            lp = linear_logprobs(h, w, targets, impl=impl, **kw)
            (lp * torch.linspace(-1, 1, 37)).sum().backward()
        results.append((lp, h.grad, w.grad))
        assert counts.skipped == 0 and counts.blocks == (0 if not eps else 5)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def _loss_batch(lengths, dim, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths) + 2
    hidden, weight, targets = _head((b, t), vocab, dim, seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = True
    targets[~mask] = 0
    i, j = mask.nonzero()[4].tolist()
    targets[i, j] = int(((torch.arange(vocab) // BLOCK) % 5 >= COMMON).nonzero()[-1])  # a rare target
    inf_lp = torch.where(mask, -torch.rand(b, t, generator=g) * 3, float("nan"))
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    return hidden, weight, targets, inf_lp, rewards, mask


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("side_buffer", [False, True])
def test_fused_loss_filtered_per_chunk_matches_float64(impl, side_buffer, monkeypatch):
    """Chunks of 5 rows, sequences split across them: each chunk filters its own blocks."""
    lengths, rows, vocab, dim = [3, 14, 0, 6, 2, 13], 5, 700, 8
    monkeypatch.setattr(tuning, "SIDE_BUFFER_SHARE", 1.0 if side_buffer else 0.0)
    chunk = backend(impl).FusedChunk
    ws = rows * chunk.bytes_per_row(vocab, dim, torch.float32) + chunk.fixed_bytes(vocab, dim, torch.float32)
    ws += vocab * dim * 4 if side_buffer else 0
    assert plan(chunk, ws, torch.empty(vocab, dim), max(lengths)) == (rows, side_buffer)
    hidden, weight, targets, inf_lp, rewards, mask = _loss_batch(lengths, dim, vocab, seed=4)
    probs = _probs64(hidden, weight, 0.9)[mask]
    eps = _eps_between(probs, (torch.arange(vocab) // BLOCK) % 5 >= COMMON)
    keep = filter_keep(probs, targets[mask], plan_chunks(lengths, rows), BLOCK, eps)
    grad_keep = torch.zeros(*mask.shape, vocab, dtype=torch.bool)
    grad_keep[mask] = keep
    kw = dict(group_size=2, beta1=0.8, beta2=0.3, temperature=0.9)
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    with filtering.count() as counts:
        out = oapl_loss(h, w, targets, inf_lp, rewards, mask, impl=impl, workspace_bytes=ws, grad_filter_eps=eps, **kw)
        out.loss.backward()
    ref = naive.oapl(h64, w64, targets, inf_lp, rewards, mask, grad_keep=grad_keep, **kw)
    ref["loss"].backward()
    assert counts.skipped > 0
    assert rel_err(out.loss, ref["loss"]) <= 1e-5
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5


def test_grpo_and_module_pass_eps_on(impl):
    hidden, weight, targets, inf_lp, rewards, mask = _loss_batch([4, 6, 5, 3], 8, 700, seed=5)
    probs = _probs64(hidden, weight, 1.0)[mask]
    eps = _eps_between(probs, (torch.arange(700) // BLOCK) % 5 >= COMMON)
    keep = filter_keep(probs, targets[mask], [(0, int(mask.sum()))], BLOCK, eps)
    grad_keep = torch.zeros(*mask.shape, 700, dtype=torch.bool)
    grad_keep[mask] = keep
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    out = grpo_loss(h, w, targets, inf_lp.nan_to_num(-1.0), rewards, mask, group_size=2, impl=impl,
                    old_logprobs="detached", grad_filter_eps=eps)
    out.loss.backward()
    ref = naive.grpo(h64, w64, targets, inf_lp.nan_to_num(-1.0), rewards, mask, group_size=2, clip_eps=0.2,
                     temperature=1.0, old_logprobs="detached", tis_cap=None, grad_keep=grad_keep)
    ref.backward()
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5
    mod = OAPLLoss(beta1=1.0, beta2=0.1, group_size=2, impl=impl, grad_filter_eps=eps)
    a = mod(hidden, weight.requires_grad_(), targets, inf_lp, rewards, mask)
    b = oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1, impl=impl,
                  grad_filter_eps=eps)
    da, = torch.autograd.grad(a.loss, weight)
    db, = torch.autograd.grad(b.loss, weight)
    assert torch.equal(da, db) and f"grad_filter_eps={eps}" in repr(mod)


@pytest.mark.parametrize("eps", [-1e-3, 1.0, "1e-4", float("nan")])
def test_bad_eps_raises(eps):
    hidden, weight, targets = _head((4,), 300, 8, seed=0)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        linear_logprobs(hidden, weight, targets, grad_filter_eps=eps)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        OAPLLoss(beta1=1.0, beta2=0.1, group_size=2, grad_filter_eps=eps)
