"""linear_logprobs against a float64 materialized reference, for each impl (Triton interpreted on CPU)."""
import pytest
import torch

from oapl_kernels import linear_logprobs
from benchmarks.naive import float64_leaves, logprobs, rel_err

# (leading shape, V, D): V not a multiple of any block, odd D, N = 1, leading batch dims.
SHAPES = [((37,), 301, 29), ((1,), 77, 16), ((3, 5), 130, 33), ((64,), 1000, 64)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(lead, vocab, dim, dtype, seed, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, dim, generator=g) * 0.6).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) * 0.6).to(dtype)
    targets = torch.randint(0, vocab, lead, generator=g)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return hidden, weight, targets


def _check(impl, hidden, weight, targets, temperature, tol, entropy=True):
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(targets.shape, generator=g)
    g_ent = torch.randn(targets.shape, generator=g)
    lp_ref, ent_ref = logprobs(h64, w64, targets, temperature=temperature, return_entropy=True)
    if entropy:
        lp, ent = linear_logprobs(h, w, targets, temperature=temperature, return_entropy=True, impl=impl)
        (lp * g_lp + ent * g_ent).sum().backward()
        (lp_ref * g_lp + ent_ref * g_ent).sum().backward()
        assert ent.dtype == torch.float32 and ent.shape == targets.shape
        assert rel_err(ent, ent_ref) <= tol
    else:
        lp = linear_logprobs(h, w, targets, temperature=temperature, impl=impl)
        (lp * g_lp).sum().backward()
        (lp_ref * g_lp).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    assert rel_err(lp, lp_ref) <= tol
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    assert rel_err(h.grad, h64.grad) <= tol
    assert rel_err(w.grad, w64.grad) <= tol


@pytest.mark.parametrize("lead,vocab,dim", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_fp32_matches_float64(impl, lead, vocab, dim, temperature):
    hidden, weight, targets = _inputs(lead, vocab, dim, torch.float32, seed=vocab + dim, ignore_every=4)
    _check(impl, hidden, weight, targets, temperature, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64(impl, dtype):
    hidden, weight, targets = _inputs((48,), 515, 40, dtype, seed=7, ignore_every=5)
    _check(impl, hidden, weight, targets, 0.7, TOL[dtype])


def test_logprobs_only_backward(impl):
    hidden, weight, targets = _inputs((2, 9), 200, 24, torch.float32, seed=3, ignore_every=3)
    _check(impl, hidden, weight, targets, 1.0, TOL[torch.float32], entropy=False)


def test_ignored_rows_are_zero_with_zero_grad(impl):
    hidden, weight, targets = _inputs((4, 6), 90, 16, torch.float32, seed=11)
    targets[1] = -100  # a whole row ignored
    h = hidden.clone().requires_grad_()
    lp, ent = linear_logprobs(h, weight, targets, return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(lp[1] == 0) and torch.all(ent[1] == 0)
    assert torch.all(h.grad[1] == 0)
    assert torch.all(lp[0] < 0)


def test_all_ignored(impl):
    hidden, weight, targets = _inputs((5,), 50, 8, torch.float32, seed=2)
    targets[:] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = linear_logprobs(h, w, targets, impl=impl)
    lp.sum().backward()
    assert torch.all(lp == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_impls_agree_on_large_logits():
    """Logits of magnitude ~80 stress the online max; both paths stay finite and equal."""
    hidden, weight, targets = _inputs((20,), 333, 32, torch.float32, seed=5)
    hidden = hidden * 12
    a = linear_logprobs(hidden, weight, targets, impl="torch")
    b = linear_logprobs(hidden, weight, targets, impl="triton")
    ref = logprobs(hidden.double(), weight.double(), targets)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert rel_err(a, ref) <= 1e-5 and rel_err(b, ref) <= 1e-5


def _base():
    return _inputs((6,), 40, 8, torch.float32, seed=0)


@pytest.mark.parametrize("change,exc,word", [
    (lambda h, w, y: (h[:, :7], w, y), ValueError, "D="),
    (lambda h, w, y: (h, w.double(), y), ValueError, "dtype"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "targets"),
    (lambda h, w, y: (h, w, y[:3]), ValueError, "targets shape"),
    (lambda h, w, y: (h, w, torch.where(y == y[0], 40, y)), ValueError, "outside"),
    (lambda h, w, y: (h, w, torch.where(y == y[0], -1, y)), ValueError, "outside"),
    (lambda h, w, y: (h.long(), w, y), TypeError, "hidden"),
    (lambda h, w, y: (h, w[None], y), ValueError, "weight"),
])
def test_bad_inputs_raise(change, exc, word):
    h, w, y = change(*_base())
    with pytest.raises(exc, match=word):
        linear_logprobs(h, w, y)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(*_base(), temperature=temperature)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(*_base(), impl="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_logprobs(*_base(), impl="triton")
