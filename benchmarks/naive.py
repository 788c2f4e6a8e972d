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


def logprobs(h, w, y, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
             grad_keep: torch.Tensor | None = None):
    """Token log-probs [...] of targets y [...] (0 where ignored), and their entropies when
    ``return_entropy``; differentiable w.r.t. h and w. ``grad_keep`` [..., V] bool: the logits'
    gradient is zeroed where it is False (the reference of gradient filtering, see
    :func:`filter_keep`)."""
    z = logits(h, w, temperature)
    if grad_keep is not None and z.requires_grad:
        z.register_hook(lambda grad: grad * grad_keep)
    logsm = torch.log_softmax(z, dim=-1)
    keep = y != ignore_index
    lp = torch.where(keep, logsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return lp
    return lp, torch.where(keep, -(logsm.exp() * logsm).sum(-1), 0.0)


def oapl(h, w, y, inference_logprobs, rewards, mask, *, group_size: int, beta1: float, beta2: float,
         temperature: float = 1.0, values: torch.Tensor | None = None, grad_keep: torch.Tensor | None = None) -> dict:
    """The OAPL loss of ``oapl_kernels.oapl_loss`` (same arguments; mask bool or 0/1;
    ``grad_keep`` as in :func:`logprobs`).

    Returns a dict: loss (scalar, differentiable), values [B], advantages [B], residuals [B],
    entropy_mean (detached).
    """
    m = mask.bool()
    lp, ent = logprobs(h, w, torch.where(m, y, -100), temperature=temperature, return_entropy=True,
                       grad_keep=grad_keep)
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
         old_logprobs, tis_cap: float | None, grad_keep: torch.Tensor | None = None) -> torch.Tensor:
    """The GRPO loss of ``oapl_kernels.grpo_loss`` (scale_rewards=True), a differentiable scalar."""
    lp = logprobs(h, w, torch.where(mask, y, -100), temperature=temperature, grad_keep=grad_keep)
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


def filter_keep(probs: torch.Tensor, targets: torch.Tensor, windows, block: int, eps: float) -> torch.Tensor:
    """Which logits-gradient entries gradient filtering keeps: bool [N, V] for softmax
    probabilities probs [N, V] of N scored rows with targets [N], chunked into row ``windows``
    [(r0, r1), ...]. Within a window, a block of ``block`` columns (from column 0) is kept when
    some row's probability there is >= eps or some row's target lies in it."""
    n, vocab = probs.shape
    keep = torch.zeros(n, vocab, dtype=torch.bool)
    for r0, r1 in windows:
        for b0 in range(0, vocab, block):
            b1 = min(vocab, b0 + block)
            hit = bool((probs[r0:r1, b0:b1] >= eps).any()) or bool(((targets[r0:r1] >= b0) & (targets[r0:r1] < b1)).any())
            keep[r0:r1, b0:b1] = hit
    return keep


def chunked_grads(h, w, y, grad_logp, *, temperature: float = 1.0, rows: int = 256):
    """dH [N, D], dW [V, D] of sum(grad_logp * logp) for h [N, D], w [V, D], targets y [N] (all
    scored), in the inputs' dtype (use float64 for a reference), the logits materialized
    ``rows`` rows at a time: the reference where the whole [N, V] logits would not fit."""
    inv = 1.0 / temperature
    d_hidden, d_weight = torch.zeros_like(h), torch.zeros_like(w)
    for r0 in range(0, h.shape[0], rows):
        r = slice(r0, r0 + rows)
        dz = -torch.softmax(h[r] @ w.T * inv, dim=-1) * grad_logp[r, None]
        dz[torch.arange(dz.shape[0]), y[r]] += grad_logp[r]
        dz *= inv
        d_hidden[r] = dz @ w
        d_weight += dz.T @ h[r]
    return d_hidden, d_weight


def chunked_logprobs(h, w, y, *, temperature: float = 1.0, rows: int = 256) -> torch.Tensor:
    """Token log-probs [N] of targets y [N] (all scored), ``rows`` rows of logits at a time."""
    out = [torch.log_softmax(h[r0 : r0 + rows] @ w.T / temperature, dim=-1)
           .gather(1, y[r0 : r0 + rows, None])[:, 0] for r0 in range(0, h.shape[0], rows)]
    return torch.cat(out)


def float64_leaves(*tensors):
    """Detached float64 copies that require grad, and detached originals that require grad."""
    return ([t.detach().double().requires_grad_() for t in tensors],
            [t.detach().clone().requires_grad_() for t in tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
