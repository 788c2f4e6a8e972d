"""optimal_values, oapl_loss and grpo_loss against float64 references of the whole loss."""
import math

import pytest
import torch

from benchmarks import naive
from benchmarks.naive import float64_leaves as leaves, rel_err
from oapl_kernels import OAPLLoss, grpo_loss, oapl_loss, optimal_values
from oapl_kernels.objective import OAPLObjective


def _batch(b, t, d, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, d, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * 0.7).to(dtype)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    inf_lp = -torch.rand(b, t, generator=g) * 4
    rewards = torch.randint(0, 2, (b,), generator=g).float() + 0.1 * torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[0] = False  # an empty completion
    inf_lp[~mask] = float("nan")  # garbage off the mask must not leak
    return hidden, weight, targets, inf_lp, rewards, mask


def _oapl64(h, w, targets, inf_lp, rewards, mask, group, beta1, beta2, temperature, values=None):
    out = naive.oapl(h.double(), w.double(), targets, inf_lp, rewards, mask, group_size=group, beta1=beta1,
                     beta2=beta2, temperature=temperature, values=values)
    return out["loss"], out["values"], out["advantages"], out["residuals"]


def _logprobs64(h, w, targets, temperature=1.0):
    return naive.logprobs(h.double(), w.double(), targets, temperature=temperature, return_entropy=True)


@pytest.mark.parametrize("group", [1, 2, 3, 8])
@pytest.mark.parametrize("fused", [True, False])
def test_oapl_loss_matches_float64(impl, group, fused):
    b = 2 * group if group > 1 else 3
    hidden, weight, targets, inf_lp, rewards, mask = _batch(b, 7, 19, 157, seed=group)
    (h64, w64), (h, w) = leaves(hidden, weight)
    out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=group, beta1=0.7, beta2=0.3,
                    temperature=0.8, impl=impl, fused=fused)
    out.loss.backward()
    loss64, v64, adv64, res64 = _oapl64(h64, w64, targets, inf_lp, rewards, mask, group, 0.7, 0.3, 0.8)
    loss64.backward()
    assert torch.isfinite(out.loss)
    assert rel_err(out.loss, loss64) <= 1e-5
    assert rel_err(out.values, v64) <= 1e-6
    assert rel_err(out.advantages, adv64) <= 1e-5
    assert rel_err(out.residuals, res64) <= 1e-5
    assert rel_err(h.grad, h64.grad) <= 1e-5
    assert rel_err(w.grad, w64.grad) <= 1e-5
    assert torch.all(out.logprobs[0] == 0) and out.logprobs.shape == targets.shape
    assert not out.residuals.requires_grad and not out.logprobs.requires_grad


def test_oapl_loss_bf16_float_mask_and_given_values(impl):
    hidden, weight, targets, inf_lp, rewards, mask = _batch(8, 6, 24, 130, seed=9, dtype=torch.bfloat16)
    values = torch.tensor([0.3, -0.2])
    (h64, w64), (h, w) = leaves(hidden, weight)
    out = oapl_loss(h, w, targets, inf_lp, rewards, mask.float(), group_size=4, beta1=1.0, beta2=0.1,
                    values=values, impl=impl)
    out.loss.backward()
    loss64, *_ = _oapl64(h64, w64, targets, inf_lp, rewards, mask, 4, 1.0, 0.1, 1.0, values=values)
    loss64.backward()
    assert rel_err(out.loss, loss64) <= 1e-4
    assert torch.equal(out.values, values.repeat_interleave(4))
    assert h.grad.dtype == torch.bfloat16
    assert rel_err(h.grad, h64.grad) <= 2e-2 and rel_err(w.grad, w64.grad) <= 2e-2
    with pytest.raises(ValueError, match="values"):
        oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=4, beta1=1.0, beta2=0.1,
                  values=torch.zeros(3), impl=impl)


def test_fused_in_many_chunks(impl, monkeypatch):
    """A workspace of ~3 rows (set by the environment): chunks of one or two sequences, longer
    sequences split across chunks; the result is unchanged, and scales with grad_output."""
    monkeypatch.setenv("OAPL_WORKSPACE_MB", str(3 * 157 * 8 / 2**20))
    hidden, weight, targets, inf_lp, rewards, mask = _batch(6, 7, 19, 157, seed=8)
    mask[3] = False
    mask[4, :2] = True
    inf_lp[4, :2] = -1.5
    (h64, w64), (h, w) = leaves(hidden, weight)
    out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=3, beta1=1.0, beta2=0.2, impl=impl)
    (3.0 * out.loss).backward()
    loss64, *_ = _oapl64(h64, w64, targets, inf_lp, rewards, mask, 3, 1.0, 0.2, 1.0)
    (3.0 * loss64).backward()
    assert rel_err(out.loss, loss64) <= 1e-5
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5


def test_fused_only_when_a_gradient_is_needed():
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 5, 8, 40, seed=1)
    with torch.no_grad():
        a = oapl_loss(hidden.requires_grad_(), weight, targets, inf_lp, rewards, mask, group_size=2,
                      beta1=1.0, beta2=0.1)
    b = oapl_loss(hidden.detach(), weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)
    assert not a.loss.requires_grad and not b.loss.requires_grad
    assert torch.allclose(a.loss, b.loss)


def test_metrics():
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 5, 8, 40, seed=1)
    out = oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)
    lp, ent = _logprobs64(hidden, weight, torch.where(mask, targets, -100))
    ratio = (lp - torch.where(mask, inf_lp.double(), 0.0)).sum(1).mean()
    assert abs(out.seq_logratio_mean.item() - ratio.item()) < 1e-4
    assert abs(out.entropy_mean.item() - (ent.sum() / mask.sum()).item()) < 1e-4


def test_gradient_is_one_coefficient_per_sequence():
    """d loss / d logp_t = mask_t * 2 * beta2 * res_i / B: the same for all tokens of a sequence."""
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 6, 8, 30, seed=4)
    captured = {}
    import oapl_kernels.logprobs as lp_mod

    original = lp_mod._LinearLogprobs.backward

    def spy(ctx, g_lp, g_ent):
        captured["g"] = g_lp.clone()
        return original(ctx, g_lp, g_ent)

    lp_mod._LinearLogprobs.backward = staticmethod(spy)
    try:
        h = hidden.clone().requires_grad_()
        out = oapl_loss(h, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.2,
                        fused=False)
        out.loss.backward()
    finally:
        lp_mod._LinearLogprobs.backward = staticmethod(original)
    coef = 2 * 0.2 * out.residuals / 4
    expected = coef[:, None].expand(4, 6)[mask]  # kept rows, in order
    assert torch.allclose(captured["g"], expected, atol=1e-7)


def test_fused_coefficient_is_the_derivative_of_the_objective():
    """The fused path's d loss / d S_i (objective.seq_grad) is autograd's derivative of the loss
    the unfused path differentiates (objective.loss of objective.residuals)."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    objective = OAPLObjective(torch.randn(6, dtype=torch.float64, generator=g),
                              torch.randn(6, dtype=torch.float64, generator=g), 0.3)
    res = objective.residuals(seq)
    objective.loss(res).backward()
    assert torch.allclose(seq.grad, objective.seq_grad(res.detach(), 6), rtol=1e-12, atol=0)
    assert torch.allclose(objective.log_ratio(res.detach()), seq.detach() - objective.seq_ref)


def test_weighting_names_the_mean():
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    kw = {"group_size": 2}
    assert oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, beta1=1.0, beta2=0.1, **kw).weighting == "sequence"
    assert grpo_loss(hidden, weight, targets, inf_lp, rewards, mask, **kw).weighting == "token"


def test_optimal_values_stable_and_limits():
    r = torch.tensor([5000.0, 4999.0, 0.0, 1.0])
    v = optimal_values(r, group_size=4, beta1=1.0)
    assert torch.isfinite(v).all()
    assert abs(v.item() - (5000 + math.log((1 + math.exp(-1)) / 4))) < 1e-3
    r = torch.randn(6, 8)
    assert torch.allclose(optimal_values(r, group_size=8, beta1=1e4), r.mean(1), atol=1e-3)
    assert torch.allclose(optimal_values(r, group_size=8, beta1=1e-3), r.max(1).values, atol=3e-3)
    assert torch.allclose(optimal_values(r.reshape(-1), group_size=8, beta1=0.5),
                          optimal_values(r, group_size=8, beta1=0.5))
    # Jensen: mean <= V* <= max for any beta1.
    v = optimal_values(r, group_size=8, beta1=0.3)
    assert torch.all(v >= r.mean(1) - 1e-6) and torch.all(v <= r.max(1).values + 1e-6)


@pytest.mark.parametrize("kwargs,word", [
    ({"beta1": 0.0}, "beta1"), ({"beta2": -1.0}, "beta2"), ({"group_size": 3}, "multiple of group_size"),
])
def test_oapl_bad_arguments(kwargs, word):
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    args = {"group_size": 2, "beta1": 1.0, "beta2": 0.1, **kwargs}
    with pytest.raises(ValueError, match=word):
        oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_name_the_index(bad):
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    rewards[2] = bad
    with pytest.raises(ValueError, match=r"rewards\[2\]"):
        oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)
    with pytest.raises(ValueError, match=r"rewards\[2\]"):
        optimal_values(rewards, group_size=2, beta1=1.0)


def test_non_finite_inference_logprobs_on_the_mask():
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    mask[1, 2] = True
    inf_lp[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"inference_logprobs\[1, 2\]"):
        oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)


@pytest.mark.parametrize("which", ["targets", "inference_logprobs", "mask", "rewards"])
def test_shape_mismatches(which):
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    args = {"targets": targets, "inference_logprobs": inf_lp, "mask": mask, "rewards": rewards}
    args[which] = args[which][:2]
    with pytest.raises(ValueError, match=which):
        oapl_loss(hidden, weight, args["targets"], args["inference_logprobs"], args["rewards"], args["mask"],
                  group_size=2, beta1=1.0, beta2=0.1)


def test_module_form():
    hidden, weight, targets, inf_lp, rewards, mask = _batch(4, 3, 8, 20, seed=0)
    mod = OAPLLoss(beta1=1.0, beta2=0.1, group_size=2)
    a = mod(hidden, weight, targets, inf_lp, rewards, mask)
    b = oapl_loss(hidden, weight, targets, inf_lp, rewards, mask, group_size=2, beta1=1.0, beta2=0.1)
    assert torch.equal(a.loss, b.loss)
    assert "beta2=0.1" in repr(mod)


@pytest.mark.parametrize("with_old", [False, True, "detached"])
def test_grpo_matches_float64(impl, with_old):
    hidden, weight, targets, inf_lp, rewards, mask = _batch(6, 5, 12, 77, seed=21)
    # make the ratio straddle the clip range on some tokens
    lp, _ = _logprobs64(hidden, weight, torch.where(mask, targets, -100), 0.9)
    g = torch.Generator().manual_seed(0)
    inf_lp = torch.where(mask, lp.float() + 0.3 * torch.randn(lp.shape, generator=g), float("nan"))
    old = torch.where(mask, lp.float() + 0.3 * torch.randn(lp.shape, generator=g), 0.0) if with_old else None
    old = "detached" if with_old == "detached" else old
    (h64, w64), (h, w) = leaves(hidden, weight)
    out = grpo_loss(h, w, targets, inf_lp, rewards, mask, group_size=3, clip_eps=0.2, temperature=0.9,
                    old_logprobs=old, tis_cap=2.0, impl=impl)
    out.loss.backward()
    loss64 = naive.grpo(h64, w64, targets, inf_lp, rewards, mask, group_size=3, clip_eps=0.2, temperature=0.9,
                        old_logprobs=old, tis_cap=2.0)
    loss64.backward()
    assert abs(out.loss.item() - loss64.item()) <= 1e-6  # a sum of cancelling terms: absolute
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5
    if with_old == "detached":
        assert out.clip_frac.item() == 0  # the ratio is exactly 1
    else:
        assert 0 < out.clip_frac.item() < 1
