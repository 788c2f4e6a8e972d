"""The objectives, written once: OAPL's residual, loss and per-sequence gradient, and GRPO's
per-token surrogate. ``loss.py`` (the unfused path, differentiated by autograd) and ``fused.py``
(the gradient finished in the forward) both use these, so a change to a loss is one edit here.

OAPL, per prompt x with a group of G completions y_i, rewards r_i and sampler log-probs:
    V*(x) = beta1 * log(mean_i exp(r_i / beta1))          (optimal value, a log-mean-exp)
    A_i   = r_i - V*(x)                                    (optimal advantage)
    res_i = beta2 * (S_i - S_ref_i) - A_i                  (S: log pi summed over the completion)
    loss  = mean_i res_i^2
res_i depends on sequence i's own S_i only, so d loss / d S_i = 2 * beta2 * res_i / B is known
as soon as S_i is: the fused path turns it into the per-token g_t = mask_t * dloss/dS_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# How a trainer weights micro-batches of one optimizer step (LossOutput.weighting): by their
# share of the batch's sequences (a mean over sequences) or of its completion tokens.
SEQUENCE, TOKEN = "sequence", "token"


@dataclass
class OAPLObjective:
    """OAPL's per-sequence terms for a batch of B sequences.

    seq_ref: [B] fp32 sum of the sampler's log-probs over each completion (S_ref).
    advantages: [B] fp32 A_i. beta2: > 0.
    """

    seq_ref: torch.Tensor
    advantages: torch.Tensor
    beta2: float
    weighting = SEQUENCE

    def residuals(self, seq_logp: torch.Tensor, seqs: slice = slice(None)) -> torch.Tensor:
        """res [len(seqs)] fp32 of sequences ``seqs`` from their log-prob sums seq_logp (S)."""
        return self.beta2 * (seq_logp - self.seq_ref[seqs]) - self.advantages[seqs]

    @staticmethod
    def loss(residuals: torch.Tensor) -> torch.Tensor:
        """The scalar loss mean_i res_i^2 from all B residuals."""
        return residuals.square().mean()

    def seq_grad(self, residuals: torch.Tensor, n_seq: int) -> torch.Tensor:
        """d loss / d S_i for the given residuals, out of a batch of ``n_seq`` sequences."""
        return (2.0 * self.beta2 / n_seq) * residuals

    def log_ratio(self, residuals: torch.Tensor) -> torch.Tensor:
        """S_i - S_ref_i recovered from res_i (the fused path keeps residuals, not sums)."""
        return (residuals + self.advantages) / self.beta2


def grpo_token_terms(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor,
                     clip_eps: float, tis_cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token surrogate and its clip indicator, both [B, T].

    logp: [B, T] fp32 log pi_theta (differentiable); old: [B, T] log pi_old; ref: [B, T] the
    sampler's log-probs; advantages: [B]. surrogate = w * min(ratio * A, clip(ratio) * A) with
    ratio = exp(logp - old) and w = min(exp(old - ref), tis_cap) (1 without ``tis_cap``); the
    loss is -sum(surrogate * mask) / n_tokens (weighting ``TOKEN``).
    """
    ratio = torch.exp(logp - old)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if tis_cap is not None:
        surrogate = surrogate * torch.exp(old - ref).clamp(max=tis_cap)
    return surrogate, (ratio.detach() - 1).abs() > clip_eps
