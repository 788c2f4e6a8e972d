"""Every op with materialized [N, V] logits, written plainly: the benchmarks' naive baselines
and, on float64 inputs, the reference that the tests, the benchmark checks and the GPU suite
compare every path against (one module for all of them).

Arithmetic is in the inputs' dtype promoted to at least fp32 (float64 inputs: float64).
"""
from __future__ import annotations

import math

import torch


def logits(h: torch.Tensor, w: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """h [..., D] @ w [V, D].T / temperature, upcast to fp32 when the inputs are 16-bit."""
    z = h @ w.T
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if temperature == 1.0 else z / temperature


def logprobs(h, w, y, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
    """Token log-probs [...] of targets y [...] (0 where ignored), and their entropies when
    ``return_entropy``; differentiable w.r.t. h and w."""
    logsm = torch.log_softmax(logits(h, w, temperature), dim=-1)
    keep = y != ignore_index
    lp = torch.where(keep, logsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return lp
    return lp, torch.where(keep, -(logsm.exp() * logsm).sum(-1), 0.0)


def oapl(h, w, y, inference_logprobs, rewards, mask, *, group_size: int, beta1: float, beta2: float,
         temperature: float = 1.0, values: torch.Tensor | None = None) -> dict:
    """The OAPL loss of ``oapl_kernels.oapl_loss`` (same arguments; mask bool or 0/1).

    Returns a dict: loss (scalar, differentiable), values [B], advantages [B], residuals [B],
    entropy_mean (detached).
    """
    m = mask.bool()
    lp, ent = logprobs(h, w, torch.where(m, y, -100), temperature=temperature, return_entropy=True)
    ref = torch.where(m, inference_logprobs.to(lp.dtype), 0.0).sum(1)
    r = rewards.to(lp.dtype)
    if values is None:
        g = r.view(-1, group_size)
        v = beta1 * (torch.logsumexp(g / beta1, dim=1) - math.log(group_size))
    else:
        v = values.to(lp.dtype).reshape(-1)
    v = v.repeat_interleave(group_size) if v.numel() != r.numel() else v
    adv = r - v
    res = beta2 * (lp.sum(1) - ref) - adv
    return {"loss": res.square().mean(), "values": v, "advantages": adv, "residuals": res,
            "entropy_mean": (ent.detach() * m).sum() / m.sum().clamp(min=1)}


def grpo(h, w, y, inference_logprobs, rewards, mask, *, group_size: int, clip_eps: float, temperature: float,
         old_logprobs, tis_cap: float | None) -> torch.Tensor:
    """The GRPO loss of ``oapl_kernels.grpo_loss`` (scale_rewards=True), a differentiable scalar."""
    lp = logprobs(h, w, torch.where(mask, y, -100), temperature=temperature)
    r = rewards.to(lp.dtype).view(-1, group_size)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)).reshape(-1, 1)
    ref = torch.where(mask, inference_logprobs.to(lp.dtype), 0.0)
    if isinstance(old_logprobs, str):
        old = lp.detach()
    else:
        old = ref if old_logprobs is None else torch.where(mask, old_logprobs.to(lp.dtype), 0.0)
    ratio = torch.exp(lp - old)
    sur = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if tis_cap is not None:
        sur = sur * torch.exp(old - ref).clamp(max=tis_cap)
    return -(sur * mask).sum() / mask.sum()


def float64_leaves(*tensors):
    """Detached float64 copies that require grad, and detached originals that require grad."""
    return ([t.detach().double().requires_grad_() for t in tensors],
            [t.detach().clone().requires_grad_() for t in tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
