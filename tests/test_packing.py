"""Packed micro-batches and token-budget micro-batches (oapl.training.packing): packed rows give
the padded rows' per-token log-probs, loss and gradients (fp32, tiny model and SmolLM2), a
token budget gives the full batch's step, and the micro-batch plan keeps whole groups."""

import pytest
import torch

from oapl.batch import collate
from oapl.config import Config
from oapl.training import packing
from oapl.training.policy import Policy
from oapl.training.trainer import LocalTrainer
from oapl_kernels import linear_logprobs

from test_trainer import _rollouts


def _batch(lengths, L=None):
    """Right-padded ids (token k of row i = 100 i + k) and mask for rows of ``lengths``."""
    L = L or max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = 100 * i + torch.arange(n)
        attn[i, :n] = 1
    return ids, attn


def test_pack_concatenates_sequences_with_restarting_positions():
    ids, attn = _batch([3, 1, 2], L=4)
    p = packing.pack(ids, attn, varlen_kwargs=True)
    assert p.input_ids.tolist() == [[0, 1, 2, 100, 200, 201]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.attn_kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6]
    assert p.attn_kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert p.attn_kwargs["max_length_k"] == 3 and p.num_positions == 6
    # rows of at most 4 tokens, first-fit by decreasing length: [3, 1] and [2] (tail padded)
    r = packing.pack(ids, attn, row_tokens=4, pad_id=-1)
    assert r.input_ids.tolist() == [[0, 1, 2, 100], [200, 201, -1, -1]]
    assert r.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    for p in (p, r):  # unpack: each real token's vector back at its padded place, zeros elsewhere
        hidden = p.input_ids[..., None].float().expand(-1, -1, 2)
        out = packing.unpack(hidden, p)
        assert out.shape == (3, 4, 2)
        torch.testing.assert_close(out[..., 0], (ids * attn).float())


def test_plan_keeps_whole_groups_within_the_token_budget():
    lengths = [10, 12, 20, 6, 5, 5, 6, 4, 50, 40]  # five groups of 2
    plan = packing.plan_micro_batches(lengths, 2, packing=True, max_tokens=60)
    assert plan == [(0, 6), (6, 8), (8, 10)]  # 58 real tokens, +10 > 60; 90 on its own
    padded = packing.plan_micro_batches(lengths, 2, packing=False, max_tokens=60)
    assert padded == [(0, 2), (2, 4), (4, 8), (8, 10)]  # rows x longest: 4 x 20 > 60
    assert packing.plan_micro_batches(lengths, 2, packing=True) == [(0, 10)]
    assert packing.plan_micro_batches(lengths, 2, packing=True, micro_batch_size=4) == [
        (0, 4), (4, 8), (8, 10)]
    exact = packing.plan_micro_batches(lengths, 2, packing=True, max_tokens=60, count=5)
    assert exact == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="exactly 2"):
        packing.plan_micro_batches(lengths, 2, packing=True, max_tokens=60, count=2)
    with pytest.raises(ValueError, match="whole number of groups"):
        packing.plan_micro_batches(lengths[:3], 2, packing=True)


def _logprobs(policy, batch, **kw):
    with torch.no_grad():
        hidden = packing.hidden_states(policy, batch, **kw)[:, :-1]
        lp = linear_logprobs(hidden, policy.lm_head_weight, batch.input_ids[:, 1:])
    return lp * batch.loss_mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_padded_on_the_tiny_model(tiny_model_dir, attn):
    policy = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
    policy.model.set_attn_implementation(attn)
    batch = collate(*_rollouts(seed=3), pad_id=0)
    ref = _logprobs(policy, batch, packing=False)
    for row_tokens in (None, 20):
        got = _logprobs(policy, batch, packing=True, row_tokens=row_tokens)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _step(model_dir, algorithm="oapl", **trainer):
    """Gradients and metrics of one train_step (optimizer step skipped) on fixed rollouts."""
    cfg = Config()
    cfg.algorithm.name, cfg.generation.n, cfg.trainer.grad_clip = algorithm, 4, 0.0
    cfg.algorithm.lag_logprobs = "recompute"
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    policy = Policy.from_pretrained(model_dir, torch.float32, torch.device("cpu"))
    t = LocalTrainer(policy, cfg)
    t.optimizer.step = lambda: None
    t.freeze_lag_policy(version=2)
    batch = collate(*_rollouts(groups=6), pad_id=0)
    lag = t.lag_logprobs(batch)  # through the same packing as the loss
    batch.lag_logprobs = lag + 0.1 * batch.loss_mask  # a lag away from the current policy
    m = t.train_step(batch)
    return [p.grad.clone() for p in policy.parameters()], m, lag


def _assert_same_step(got, ref):
    (g1, m1, lag1), (g0, m0, lag0) = got, ref
    torch.testing.assert_close(lag1, lag0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        _assert_close_norm(a, b)
    for key in ("loss", "seq_logratio_mean", "entropy_mean", "grad_norm",
                "token_logratio_abs_mean"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("algorithm", ["oapl", "grpo"])
def test_packed_and_token_budget_steps_equal_the_padded_full_batch(tiny_model_dir, algorithm):
    """Packed (one row; rows of <= 20 tokens), and packed or padded micro-batches formed by a
    token budget (one to three groups each): the padded full-batch step, lag log-probs,
    loss, metrics and gradients."""
    ref = _step(tiny_model_dir, algorithm, packing=False)
    assert ref[1]["micro_batches"] == 1 and ref[1]["train_pad_share"] > 0
    for kw in (dict(packing=True), dict(packing=True, packed_row_tokens=20),
               dict(packing=True, max_tokens_per_micro_batch=70),
               dict(packing=False, max_tokens_per_micro_batch=70)):
        got = _step(tiny_model_dir, algorithm, **kw)
        assert got[1]["micro_batches"] > 1 or "max_tokens_per_micro_batch" not in kw, kw
        _assert_same_step(got, ref)
    assert got[1]["train_pad_share"] < ref[1]["train_pad_share"]


def test_config_default_packs_and_rejects_bad_budgets(tiny_model_dir):
    policy = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
    assert packing.default_packing(policy) is True
    assert packing.row_tokens_for(policy, None) == packing.DENSE_MASK_ROW_TOKENS
    assert packing.row_tokens_for(policy, 64) == 64
    cfg = Config()
    cfg.trainer.max_tokens_per_micro_batch = 0
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch must be >= 1"):
        cfg.validate()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's HF directory (converted once into the cache); one torch
    thread while in use (two threads on a loaded 2-core machine run ~20x slower)."""
    from oapl.model_source import resolve_model

    try:
        path = resolve_model("builtin:smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - the package may be missing outside `make test`
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


def _assert_close_norm(got, ref, rel=1e-5):
    """||got - ref|| <= rel * ||ref||: a whole-tensor relative error (elementwise relative
    errors of near-zero gradient entries say nothing about fp32 summation order)."""
    err = float((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def test_packed_equals_padded_on_smollm2(smollm2):
    """A few short rows of a real model in fp32: per-token log-probs, the OAPL loss and its
    gradients, packed (one row) vs padded, on the same weights."""
    from oapl.batch import Rollout

    g = torch.Generator().manual_seed(0)
    rollouts = []
    for p, plen in enumerate((9, 14)):
        prompt = torch.randint(100, 40000, (plen,), generator=g).tolist()
        for c in (3, 11):
            comp = torch.randint(100, 40000, (c,), generator=g).tolist()
            rollouts.append(Rollout(p, prompt, comp, [-2.0] * c, "stop", 0))
    batch = collate(rollouts, [1.0, 0.0, 0.0, 1.0], pad_id=0)
    cfg = Config()
    cfg.generation.n, cfg.trainer.grad_clip = 2, 0.0
    policy = Policy.from_pretrained(smollm2, torch.float32, torch.device("cpu"))
    t = LocalTrainer(policy, cfg)
    t.optimizer.step = lambda: None  # the weights stay put: both steps see the same ones
    results = []
    for pk in (False, True):
        t.packing = pk
        lp = _logprobs(policy, batch, packing=pk)
        m = t.train_step(batch)
        results.append((lp, m, [p.grad.clone() for p in policy.parameters()]))
    (lp0, m0, g0), (lp1, m1, g1) = results
    assert m0["train_pad_share"] > 0 and m1["train_pad_share"] == 0
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    for a, b in zip(g1, g0):
        _assert_close_norm(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_equals_padded_on_cuda(tiny_model_dir):
    """On a GPU (flash-attn's varlen path when installed, bf16; else sdpa): per-token
    log-probs of packed rows match the padded ones. Never run here (no GPU)."""
    dtype = torch.bfloat16
    policy = Policy.from_pretrained(tiny_model_dir, dtype, torch.device("cuda"))
    batch = collate(*_rollouts(seed=4), pad_id=0).to(torch.device("cuda"))
    ref = _logprobs(policy, batch, packing=False)
    got = _logprobs(policy, batch, packing=True,
                    row_tokens=packing.row_tokens_for(policy, None))
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
