"""Policy view, rollout collation, and the trainer step (no engine: hand-made rollouts)."""

import pytest
import torch

from oapl.config import Config
from oapl.batch import Rollout
from oapl.training.policy import Policy
from oapl.batch import collate
from oapl.training.trainer import LocalTrainer
from oapl_kernels import linear_logprobs


@pytest.fixture
def policy(tiny_model_dir):
    return Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))


def _rollouts(groups=4, n=4, seed=0):
    """Random groups of rollouts with prompts of two lengths and completions of 1-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(groups):
        prompt = [1, 14] + torch.randint(4, 14, (2 + p % 2,), generator=g).tolist() + [15]
        for _ in range(n):
            c = int(torch.randint(1, 4, (1,), generator=g))
            comp = torch.randint(4, 14, (c,), generator=g).tolist()
            lps = (-torch.rand(c, generator=g) * 3).tolist()
            out.append(Rollout(p, prompt, comp, lps, "stop", version=2))
    rewards = torch.randint(0, 2, (len(out),), generator=g).float().tolist()
    return out, rewards


def test_policy_hidden_states_give_the_models_logprobs(policy):
    ids = torch.tensor([[1, 14, 5, 9, 15, 9, 2], [1, 14, 7, 4, 15, 7, 0]])
    attn = torch.tensor([[1] * 7, [1] * 6 + [0]])
    with torch.no_grad():
        hidden = policy.hidden_states(ids, attn)[:, :-1]
        mine = linear_logprobs(hidden, policy.lm_head_weight, ids[:, 1:])
        ref = policy.model(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    ref = ref.gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(mine[:, :5], ref[:, :5], atol=1e-5, rtol=1e-5)
    assert [n for n, _ in policy.named_weights()][-1] == "lm_head.weight"


def test_collate_aligns_targets_mask_and_logprobs():
    r1 = Rollout(0, [1, 14, 3, 15], [7, 2], [-0.5, -0.1], "stop", 4)
    r2 = Rollout(0, [1, 14, 3, 15], [5, 6, 8], [-1.0, -2.0, -3.0], "length", 5)
    b = collate([r1, r2], [1.0, 0.0], pad_id=0)
    assert b.input_ids.tolist() == [[1, 14, 3, 15, 7, 2, 0], [1, 14, 3, 15, 5, 6, 8]]
    assert b.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7]
    # target t is input_ids[:, t + 1]: the completion starts at target index len(prompt) - 1
    assert b.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert b.sampler_logprobs[1, 3:].tolist() == [-1.0, -2.0, -3.0]
    assert b.versions.tolist() == [4, 5] and b.rewards.tolist() == [1.0, 0.0]
    short = b.rows(0, 1)  # padding-only columns are cut
    assert short.input_ids.shape == (1, 6) and short.loss_mask.shape == (1, 5)
    with pytest.raises(ValueError, match="1 log-probs for 2 completion tokens"):
        collate([Rollout(0, [1], [7, 2], [-0.5], "stop", 0)], [1.0], pad_id=0)


@pytest.mark.parametrize("algorithm", ["oapl", "grpo", "grpo-tis"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_model_dir, algorithm):
    rollouts, rewards = _rollouts()
    grads = []
    for micro in (None, 4):
        cfg = Config()
        cfg.algorithm.name, cfg.generation.n = algorithm.split("-")[0], 4
        if algorithm == "grpo-tis":
            cfg.algorithm.grpo_old, cfg.algorithm.tis_cap = "detached", 2.0
        cfg.trainer.micro_batch_size, cfg.trainer.grad_clip = micro, 0.0
        policy = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
        trainer = LocalTrainer(policy, cfg)
        trainer.optimizer.step = lambda: None  # compare gradients, not Adam's sign-like steps
        metrics = trainer.train_step(collate(rollouts, rewards, pad_id=0))
        grads.append(([p.grad.clone() for p in policy.parameters()], metrics))
    (g_full, m_full), (g_micro, m_micro) = grads
    for a, b in zip(g_full, g_micro):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for key in ("loss", "seq_logratio_mean", "entropy_mean", "grad_norm"):
        assert m_full[key] == pytest.approx(m_micro[key], rel=1e-4, abs=1e-6), key


def test_train_step_lowers_the_oapl_loss(policy):
    cfg = Config()
    cfg.generation.n, cfg.trainer.lr = 4, 1e-3
    trainer = LocalTrainer(policy, cfg)
    batch = collate(*_rollouts(seed=1), pad_id=0)
    losses = [trainer.train_step(batch)["loss"] for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_recompute_lag_policy_is_a_frozen_copy_of_the_pushed_weights(policy):
    """lag_logprobs=recompute: log pi_lag from a frozen copy of the weights as of the last
    push (at the training temperature), unmoved by optimizer steps, for rows of its version."""
    cfg = Config()
    cfg.generation.n, cfg.generation.temperature, cfg.trainer.lr = 4, 0.7, 1e-2
    cfg.algorithm.lag_logprobs = "recompute"
    cfg.trainer.micro_batch_size = 8
    trainer = LocalTrainer(policy, cfg)
    trainer.freeze_lag_policy(version=2)  # the rollouts' version
    batch = collate(*_rollouts(seed=2), pad_id=0)
    ref = trainer.lag_logprobs(batch)
    with torch.no_grad():
        hidden = policy.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]
        mine = linear_logprobs(hidden, policy.lm_head_weight, batch.input_ids[:, 1:],
                               temperature=0.7)
    assert ref.shape == batch.sampler_logprobs.shape and ref.dtype == torch.float32
    torch.testing.assert_close(ref, mine * batch.loss_mask, atol=1e-5, rtol=1e-5)
    ref_model = trainer.lag_policies[2].model
    assert not ref_model.training and not any(p.requires_grad for p in ref_model.parameters())

    batch.sampler_logprobs = ref  # a sampler that agrees exactly with the trainer
    batch.lag_logprobs = ref
    m = trainer.train_step(batch)
    assert m["token_logratio_abs_max"] < 1e-5  # at the weights before the step
    torch.testing.assert_close(trainer.lag_logprobs(batch), ref)  # frozen: unmoved
    assert trainer.train_step(batch)["token_logratio_abs_mean"] > 1e-3  # the policy moved
    trainer.freeze_lag_policy(version=4)
    trainer.release_lag_policies(4)  # no batch of version 2 is to come
    with pytest.raises(ValueError, match=r"versions \[2\], but the frozen lag policies hold \[4\]"):
        trainer.lag_logprobs(batch)


def test_workspace_config_reaches_the_kernels(tiny_model_dir, monkeypatch):
    """trainer.workspace_mb is the kernels' workspace_bytes=; a small one gives the same step."""
    import oapl_kernels.loss as kernel_loss

    seen = []
    real = kernel_loss.tuning.workspace_bytes
    monkeypatch.setattr(kernel_loss.tuning, "workspace_bytes",
                        lambda device, requested=None: seen.append(requested) or real(device, requested))
    rollouts, rewards = _rollouts()
    metrics = {}
    for mb in (None, 1):
        cfg = Config()
        cfg.generation.n, cfg.data.prompts_per_step, cfg.trainer.workspace_mb = 4, 4, mb
        torch.manual_seed(0)
        pol = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
        metrics[mb] = LocalTrainer(pol, cfg).train_step(collate(rollouts, rewards, pad_id=0))
    assert 2**20 in seen and None in seen
    assert metrics[1]["loss"] == pytest.approx(metrics[None]["loss"], rel=1e-6)
    assert metrics[1]["grad_norm"] == pytest.approx(metrics[None]["grad_norm"], rel=1e-5)
