"""Only scored (masked) positions reach the head's GEMMs: prompt and padding positions are
gathered out before the kernels, in the losses, in linear_logprobs and in the trainer."""
import pytest
import torch

import oapl_kernels.reference as reference
from benchmarks import naive
from benchmarks.naive import float64_leaves, rel_err
from oapl.batch import Rollout, collate
from oapl.config import Config
from oapl.training.policy import Policy
from oapl.training.trainer import LocalTrainer
from oapl_kernels import grpo_loss, linear_logprobs, oapl_loss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, d, vocab = 6, 9, 12, 97
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.5
    targets = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, 2 + i % 3 : t - i % 2] = True  # prompt before, padding after
    inf_lp = torch.where(mask, -torch.rand(b, t, generator=g), float("nan"))
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    return hidden, weight, targets, inf_lp, rewards, mask


LOSSES = {
    "oapl fused": lambda h, w, y, lp, r, m, impl: oapl_loss(h, w, y, lp, r, m, group_size=3, beta1=1.0,
                                                            beta2=0.2, impl=impl).loss,
    "oapl unfused": lambda h, w, y, lp, r, m, impl: oapl_loss(h, w, y, lp, r, m, group_size=3, beta1=1.0,
                                                              beta2=0.2, impl=impl, fused=False).loss,
    "grpo": lambda h, w, y, lp, r, m, impl: grpo_loss(h, w, y, lp, r, m, group_size=3, impl=impl).loss,
    "logprobs": lambda h, w, y, lp, r, m, impl: linear_logprobs(h, w, torch.where(m, y, -100), impl=impl).sum(),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_unscored_positions_never_reach_the_head(impl, loss):
    """NaN hidden states at every unscored position change nothing, bit for bit: a GEMM that
    touched one would turn its outputs NaN. Their gradient is exactly zero."""
    hidden, weight, targets, inf_lp, rewards, mask = _batch()
    results = []
    for poison in (False, True):
        h = torch.where(mask[..., None], hidden, float("nan")) if poison else hidden.clone()
        h.requires_grad_()
        w = weight.clone().requires_grad_()
        value = LOSSES[loss](h, w, targets, inf_lp, rewards, mask, impl)
        value.backward()
        results.append((value.detach(), h.grad, w.grad))
    clean, poisoned = results
    assert torch.isfinite(poisoned[0]) and all(torch.equal(a, b) for a, b in zip(clean, poisoned))
    assert torch.all(clean[1][~mask] == 0)


def test_gathered_and_padded_layouts_agree_with_float64():
    """The loss on [B, T] with a mask equals float64 over every position masked afterwards, and is
    deterministic: two calls give the same bits."""
    hidden, weight, targets, inf_lp, rewards, mask = _batch(seed=1)
    (h64, w64), (h, w) = float64_leaves(hidden, weight)
    runs = []
    for _ in range(2):
        h.grad = w.grad = None
        out = oapl_loss(h, w, targets, inf_lp, rewards, mask, group_size=3, beta1=1.0, beta2=0.2, impl="torch")
        out.loss.backward()
        runs.append((out.loss.detach(), h.grad.clone(), w.grad.clone()))
    ref = naive.oapl(h64, w64, targets, inf_lp, rewards, mask, group_size=3, beta1=1.0, beta2=0.2)
    ref["loss"].backward()
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert rel_err(runs[0][0], ref["loss"]) <= 1e-6
    assert rel_err(runs[0][1], h64.grad) <= 1e-5 and rel_err(runs[0][2], w64.grad) <= 1e-5


def test_trainer_head_sees_completion_tokens_only(tiny_model_dir, monkeypatch):
    """One train step: the rows the head kernels process are exactly the completion tokens."""
    seen = []
    stats = reference.FusedChunk.stats

    def spy(self, hidden, targets, inv_temp, with_entropy):
        if with_entropy:
            seen.append(hidden.shape[0])
        return stats(self, hidden, targets, inv_temp, with_entropy)

    monkeypatch.setattr(reference.FusedChunk, "stats", spy)
    policy = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
    cfg = Config()
    cfg.generation.n = 2
    cfg.trainer.device = "cpu"
    rollouts = [Rollout(p, [1, 14, 5 + p, 9, 15], [4 + i, 7, 2][: 1 + (p + i) % 3], [-1.0] * (1 + (p + i) % 3),
                        "stop", 0) for p in range(3) for i in range(2)]
    batch = collate(rollouts, [1.0, 0.0] * 3, pad_id=0)
    LocalTrainer(policy, cfg).train_step(batch)
    assert sum(seen) == int(batch.loss_mask.sum()) == sum(len(r.completion_ids) for r in rollouts)
    assert sum(seen) < batch.input_ids.numel() / 2
